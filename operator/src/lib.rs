//! `weft-operator`: Weft's control plane.
//!
//! ```text
//!  watches (Services, EndpointSlices, Pods, Routes, Policies, Breakers)
//!      └─▶ index (sans-IO model of the mesh) ─▶ per-proxy config ─▶ push server ─▶ proxies
//!  API server ──AdmissionReview──▶ webhook ─▶ inject (pure: pod + settings → JSONPatch)
//! ```

pub mod ca;
pub mod https;
pub mod identity;
pub mod index;
pub mod mesh;
pub mod metrics;
pub mod push;
pub mod rate;
pub mod readiness;
pub mod status;
pub mod webhook;

/// Sidecar injection, a pure function the webhook calls; it lives in `weft-inject` so that
/// `kubectl weft` shares it without linking the operator.
pub use weft_inject as inject;
