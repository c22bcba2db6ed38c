//! Weft's test bed: a real Kubernetes control plane (etcd, kube-apiserver and
//! kube-controller-manager, built from the official Go modules) on loopback, optionally a
//! real single node beside it ([`node`]), and helpers for the end-to-end tests that run
//! against them.
//!
//! ```text
//!  e2e/testbed (Go)  ──go build──▶  ~/.cache/weft/testbed/<key>/testbed  (multi-call binary)
//!                                          │
//!  TestBed::start ──certs, keys──▶ state dir ──spawn──▶ etcd ─▶ kube-apiserver ─▶ controller-manager
//!                                          │
//!                                   kubeconfig ──▶ kube::Client / kubectl
//! ```

pub mod binaries;
pub mod certs;
pub mod demo;
pub mod helm;
pub mod mesh;
pub mod node;
pub mod process;
pub mod shared;
pub mod testbed;

pub use binaries::{Binaries, KUBERNETES_VERSION};
pub use helm::{HELM_VERSION, Helm};
pub use testbed::{Mode, TestBed};

use std::path::PathBuf;

/// The repository's root directory (where `crds/` and `examples/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}
