//! Locating, and building when missing, the Helm binary the chart tests run.
//!
//! Helm comes from the Go module proxy (`go install helm.sh/helm/v3/cmd/helm@<version>`),
//! checked against the Go checksum database like every module, and is cached beside the
//! Kubernetes binaries under a key of the Helm and Go versions, so a warm machine never
//! rebuilds it.
//!
//! Helm 3, not Helm 4: Helm 3 upgrades with a three-way merge patch, which leaves alone
//! the fields the operator writes into the chart's MutatingWebhookConfiguration (its
//! `caBundle`, by server-side apply). Helm 4 installs by server-side apply itself, and a
//! later `helm upgrade` that changes a field the operator also applied (such as the
//! `failurePolicy`) stops on a field-manager conflict unless the user forces it.

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// The Helm release the tests run (`helm.sh/helm/v3` on the Go module proxy).
pub const HELM_VERSION: &str = "v3.22.0";

/// The Helm module path whose `cmd/helm` is built.
const HELM_MODULE: &str = "helm.sh/helm/v3";

/// The Kubernetes version Helm assumes without a cluster (`helm template`, `helm lint`):
/// Helm's Makefile derives it from the client-go it requires (v0.37.0 for v3.22.0 → 1.37);
/// without it a plain build assumes 1.20 and refuses charts that need newer.
const HELM_K8S_VERSION: (&str, &str) = ("1", "37");

/// A built `helm` binary.
#[derive(Clone, Debug)]
pub struct Helm {
    bin: PathBuf,
}

impl Helm {
    /// Returns the cached binary, building it first if it is missing (cold: a few
    /// minutes). Concurrent callers wait on a file lock instead of building twice.
    pub fn ensure() -> anyhow::Result<Self> {
        let go = crate::binaries::go_command();
        let dir = crate::binaries::cache_root().join(cache_key(&go)?);
        let bin = dir.join("helm");
        if bin.exists() {
            return Ok(Helm { bin });
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = fs::File::create(dir.join(".lock"))?;
        lock.lock().context("locking the Helm build")?;
        if !bin.exists() {
            build(&go, &dir)?;
        }
        Ok(Helm { bin })
    }

    /// The path of the `helm` binary.
    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// A `helm` command whose caches, config and data live under `home` (so tests leave
    /// nothing in the user's Helm directories), talking to the cluster of `kubeconfig`.
    pub fn command(&self, home: &Path, kubeconfig: &Path) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .env("KUBECONFIG", kubeconfig);
        cmd
    }
}

/// A key that changes with the Helm version and the Go toolchain.
fn cache_key(go: &Path) -> anyhow::Result<String> {
    let version = Command::new(go)
        .arg("version")
        .output()
        .with_context(|| format!("running `{} version`: is Go installed?", go.display()))?;
    let mut hasher = DefaultHasher::new();
    HELM_MODULE.hash(&mut hasher);
    HELM_K8S_VERSION.hash(&mut hasher);
    version.stdout.hash(&mut hasher);
    Ok(format!("helm-{HELM_VERSION}-{:016x}", hasher.finish()))
}

fn build(go: &Path, dir: &Path) -> anyhow::Result<()> {
    let gobin = dir.join("gobin.tmp");
    // As Helm's own Makefile: `helm version` reports the release instead of
    // "v3.22+unreleased", and the default Kubernetes version is client-go's.
    let (major, minor) = HELM_K8S_VERSION;
    let mut ldflags = format!("-s -w -X {HELM_MODULE}/internal/version.version={HELM_VERSION}");
    for pkg in ["pkg/lint/rules", "pkg/chartutil"] {
        ldflags.push_str(&format!(
            " -X {HELM_MODULE}/{pkg}.k8sVersionMajor={major} -X {HELM_MODULE}/{pkg}.k8sVersionMinor={minor}"
        ));
    }
    tracing::info!(
        version = HELM_VERSION,
        "building helm from the Go module proxy (cold: a few minutes)"
    );
    let status = Command::new(go)
        .current_dir(dir)
        .env("GOBIN", &gobin)
        // Outside any module: `go install pkg@version` builds with Helm's own go.mod.
        .env("GO111MODULE", "on")
        // Static, as Helm's releases are; and no C toolchain needed.
        .env("CGO_ENABLED", "0")
        .args(["install", "-trimpath", "-ldflags", &ldflags])
        .arg(format!("{HELM_MODULE}/cmd/helm@{HELM_VERSION}"))
        .status()
        .with_context(|| format!("running {}", go.display()))?;
    if !status.success() {
        bail!("go install of helm {HELM_VERSION} failed ({status})");
    }
    fs::rename(gobin.join("helm"), dir.join("helm"))?;
    let _ = fs::remove_dir(&gobin);
    Ok(())
}
