//! The node's binaries that are not Kubernetes' own: containerd (with `ctr` and the runc
//! shim), crictl, CoreDNS and the pause program, built from the Go module proxy at pinned
//! versions and cached beside the Kubernetes binaries. kubelet, kube-proxy and
//! kube-scheduler live in the test bed's multi-call binary ([`crate::Binaries`]).
//!
//! runc is built too (with cgo and libseccomp, as upstream releases are), at the release
//! line containerd 2.2 is tested with; Debian's 1.1.5 is out of support. The CNI plugins
//! come from Debian (`containernetworking-plugins` 1.1.1, which speaks CNI 1.0.0):
//! building them would add minutes to a cold start for nothing tested.

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// containerd, `ctr` and `containerd-shim-runc-v2`. Kubernetes 1.34 supports containerd
/// 2.1.3 and later; v2.2 installs from the module proxy without a wrapper module.
pub const CONTAINERD_VERSION: &str = "v2.2.9";
/// `crictl`, the release line matching Kubernetes 1.34.
pub const CRICTL_VERSION: &str = "v1.34.0";
/// CoreDNS, serving `cluster.local` to pods.
pub const COREDNS_VERSION: &str = "v1.14.7";
/// runc, the release line containerd 2.2 is tested with.
pub const RUNC_VERSION: &str = "v1.3.7";
/// Debian's CNI plugins (package `containernetworking-plugins`).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Debian's static busybox (package `busybox-static`), the tests' container image.
pub const BUSYBOX: &str = "/bin/busybox";

/// One binary to build: its file name, the Go package, build tags, and whether it needs
/// cgo (runc's namespace setup is C; its seccomp support links libseccomp).
struct Target {
    name: &'static str,
    package: String,
    tags: &'static str,
    cgo: bool,
}

fn targets() -> Vec<Target> {
    let containerd =
        |cmd: &str| format!("github.com/containerd/containerd/v2/cmd/{cmd}@{CONTAINERD_VERSION}");
    // The btrfs, devmapper and zfs snapshotters need C headers; the node uses overlayfs.
    let ctd_tags = "no_btrfs no_devmapper no_zfs";
    vec![
        Target {
            name: "containerd",
            package: containerd("containerd"),
            tags: ctd_tags,
            cgo: false,
        },
        Target {
            name: "containerd-shim-runc-v2",
            package: containerd("containerd-shim-runc-v2"),
            tags: ctd_tags,
            cgo: false,
        },
        Target {
            name: "ctr",
            package: containerd("ctr"),
            tags: ctd_tags,
            cgo: false,
        },
        Target {
            name: "crictl",
            package: format!("sigs.k8s.io/cri-tools/cmd/crictl@{CRICTL_VERSION}"),
            tags: "",
            cgo: false,
        },
        Target {
            name: "coredns",
            package: format!("github.com/coredns/coredns@{COREDNS_VERSION}"),
            tags: "",
            cgo: false,
        },
        Target {
            name: "runc",
            package: format!("github.com/opencontainers/runc@{RUNC_VERSION}"),
            tags: "seccomp",
            cgo: true,
        },
    ]
}

/// The built node binaries.
#[derive(Clone, Debug)]
pub struct NodeBinaries {
    dir: PathBuf,
}

impl NodeBinaries {
    /// Returns the cached binaries, building the missing ones first (one `go` command at a
    /// time; concurrent callers wait on a file lock).
    pub fn ensure() -> anyhow::Result<Self> {
        let pause_src = crate::repo_root().join("e2e/pause");
        let go = crate::binaries::go_command();
        let key = key(&pause_src, &go)?;
        let dir = crate::binaries::cache_root().join(format!("node-{key}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = fs::File::create(dir.join(".lock"))?;
        lock.lock().context("locking the node binaries' build")?;
        for target in targets() {
            let out = dir.join(target.name);
            if out.exists() {
                continue;
            }
            tracing::info!(package = %target.package, "building a node binary (cold: minutes)");
            let gobin = dir.join(".gobin");
            fs::create_dir_all(&gobin)?;
            let mut cmd = Command::new(&go);
            cmd.env("GOBIN", &gobin)
                .env("CGO_ENABLED", if target.cgo { "1" } else { "0" })
                .args([
                    "install",
                    "-trimpath",
                    "-buildvcs=false",
                    "-ldflags",
                    "-s -w",
                ]);
            if !target.tags.is_empty() {
                cmd.args(["-tags", target.tags]);
            }
            run(cmd.arg(&target.package), &target.package)?;
            fs::rename(gobin.join(target.name), &out)
                .with_context(|| format!("moving {} into the cache", target.name))?;
        }
        let pause = dir.join("pause");
        if !pause.exists() {
            let tmp = dir.join("pause.tmp");
            let mut cmd = Command::new(&go);
            cmd.current_dir(&pause_src)
                .env("CGO_ENABLED", "0")
                .args([
                    "build",
                    "-trimpath",
                    "-buildvcs=false",
                    "-ldflags",
                    "-s -w",
                    "-o",
                ])
                .arg(&tmp)
                .arg(".");
            run(&mut cmd, "pause")?;
            fs::rename(&tmp, &pause)?;
        }
        Ok(NodeBinaries { dir })
    }

    /// The path of one binary: `containerd`, `containerd-shim-runc-v2`, `ctr`, `crictl`,
    /// `coredns`, `runc` or `pause`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The directory holding them (on containerd's `PATH`, so it finds its shim).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running go for {what}"))?;
    if !status.success() {
        bail!("building {what} failed ({status})");
    }
    Ok(())
}

/// A key that changes with the pinned versions, the pause program and the Go toolchain.
fn key(pause_src: &Path, go: &Path) -> anyhow::Result<String> {
    let mut hasher = DefaultHasher::new();
    for t in targets() {
        t.package.hash(&mut hasher);
        t.tags.hash(&mut hasher);
        t.cgo.hash(&mut hasher);
    }
    for name in ["main.go", "go.mod"] {
        let path = pause_src.join(name);
        fs::read(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .hash(&mut hasher);
    }
    let version = Command::new(go)
        .arg("version")
        .output()
        .with_context(|| format!("running `{} version`: is Go installed?", go.display()))?;
    version.stdout.hash(&mut hasher);
    Ok(format!("{:016x}", hasher.finish()))
}
