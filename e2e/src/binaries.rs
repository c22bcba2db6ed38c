//! Locating, and building when missing, the test bed's Kubernetes binaries.
//!
//! One multi-call Go binary (`e2e/testbed`) holds etcd, kube-apiserver,
//! kube-controller-manager, kubectl and the node's kube-scheduler, kubelet and kube-proxy. It is cached outside the clone, under a key
//! derived from the Go sources and the Go version, so a fresh clone on a warm machine
//! does not rebuild, and a change to the pinned version does.

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// The Kubernetes version the test bed runs; `e2e/testbed/go.mod` pins the same one.
pub const KUBERNETES_VERSION: &str = "v1.34.4";

/// The components the multi-call binary answers to, each linked beside it.
const COMPONENTS: [&str; 7] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
];

/// The built test-bed binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// Returns the cached binaries, building them first if they are missing.
    ///
    /// Concurrent callers (two test runs) wait on a file lock instead of building twice.
    pub fn ensure() -> anyhow::Result<Self> {
        let src = crate::repo_root().join("e2e/testbed");
        let go = go_command();
        let key = source_key(&src, &go)?;
        let dir = cache_root().join(key);
        let bin = dir.join("testbed");
        if bin.exists() {
            return Ok(Binaries { dir });
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = fs::File::create(dir.join(".lock"))?;
        lock.lock().context("locking the test-bed build")?;
        if !bin.exists() {
            build(&go, &src, &bin)?;
        }
        for name in COMPONENTS {
            let link = dir.join(name);
            if !link.exists() {
                std::os::unix::fs::symlink("testbed", &link)
                    .with_context(|| format!("linking {}", link.display()))?;
            }
        }
        Ok(Binaries { dir })
    }

    /// The directory holding `testbed` and a link per component (put it on `PATH` to get
    /// the matching `kubectl`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of one component: `etcd`, `kube-apiserver`, `kube-controller-manager`,
    /// `kube-scheduler`, `kubelet`, `kube-proxy` or `kubectl`.
    pub fn component(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Where built binaries are kept: `$WEFT_TESTBED_CACHE`, else `~/.cache/weft/testbed`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEFT_TESTBED_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("weft/testbed")
}

/// The `go` command: `$GO`, else `/usr/local/go/bin/go`, else `go` on `PATH`.
pub(crate) fn go_command() -> PathBuf {
    if let Some(go) = std::env::var_os("GO") {
        return PathBuf::from(go);
    }
    let usual = Path::new("/usr/local/go/bin/go");
    if usual.exists() {
        usual.to_path_buf()
    } else {
        PathBuf::from("go")
    }
}

/// A key that changes whenever the Go sources, the pinned versions or the Go toolchain do.
fn source_key(src: &Path, go: &Path) -> anyhow::Result<String> {
    let mut hasher = DefaultHasher::new();
    let mut files: Vec<PathBuf> = fs::read_dir(src)
        .with_context(|| format!("reading {}", src.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "go")
                || p.file_name()
                    .is_some_and(|n| n == "go.mod" || n == "go.sum")
        })
        .collect();
    files.sort();
    for f in &files {
        f.file_name().hash(&mut hasher);
        fs::read(f)?.hash(&mut hasher);
    }
    let version = Command::new(go)
        .arg("version")
        .output()
        .with_context(|| format!("running `{} version`: is Go installed?", go.display()))?;
    version.stdout.hash(&mut hasher);
    Ok(format!("{KUBERNETES_VERSION}-{:016x}", hasher.finish()))
}

fn build(go: &Path, src: &Path, out: &Path) -> anyhow::Result<()> {
    let version = KUBERNETES_VERSION;
    let minor = version.split('.').nth(1).unwrap_or("34");
    let mut ldflags = vec!["-s".to_owned(), "-w".to_owned()];
    for pkg in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        for (k, v) in [
            ("gitVersion", version),
            ("gitMajor", "1"),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
            ("buildDate", "2026-01-01T00:00:00Z"),
        ] {
            ldflags.push(format!("-X {pkg}.{k}={v}"));
        }
    }
    let tmp = out.with_extension("tmp");
    tracing::info!(src = %src.display(), "building the test bed's Kubernetes binaries (cold: several minutes)");
    let status = Command::new(go)
        .current_dir(src)
        .args(["build", "-trimpath", "-buildvcs=false", "-ldflags"])
        .arg(ldflags.join(" "))
        .arg("-o")
        .arg(&tmp)
        .arg(".")
        .status()
        .with_context(|| format!("running {}", go.display()))?;
    if !status.success() {
        bail!("go build of the test bed failed ({status})");
    }
    fs::rename(&tmp, out)?;
    Ok(())
}
