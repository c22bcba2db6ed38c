//! The mesh as separate processes: a `weft-operator` process and `weft-proxy` processes
//! subscribed to it with pod-bound tokens, each in its own process group and killed with
//! it when dropped.
//!
//! `weft-proxy` and `kubectl-weft` are other packages' binaries, found next to the test's
//! own directory in the target dir: `cargo test --workspace` builds them (run
//! `cargo build -p weft-proxy -p kubectl-weft` first when testing this package alone).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use anyhow::Context;
use k8s_openapi::api::{
    core::v1::{Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{ResourceExt, api::PostParams};
use serde_json::json;
use weft_e2e::{
    process::{self, Lifetime},
    shared::{self, eventually},
};

use super::mesh::{Bed, WAIT};

/// A binary built by another package of the workspace, in this target dir, unless
/// `WEFT_TEST_BIN_<NAME>` (`WEFT_TEST_BIN_KUBECTL_WEFT`) names another: in a target dir
/// shared by several worktrees, `target/debug/<name>` is whoever built last.
pub fn sibling_binary(name: &str) -> PathBuf {
    let var = format!("WEFT_TEST_BIN_{}", name.replace('-', "_").to_uppercase());
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace`, or `cargo build -p weft-proxy -p kubectl-weft` first",
        path.display()
    );
    path
}

/// A free loopback address (bound, read, released).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child process in its own process group, killed (with its group) on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let child = process::spawn(cmd, &log, Lifetime::Attached).unwrap();
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// SIGKILL: no shutdown path runs, as when a node dies or the OOM killer strikes.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// The last lines of the process's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} log ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        process::stop_group(self.pid(), Duration::from_secs(5));
        let _ = self.child.try_wait();
    }
}

/// The operator as its own process, watching only the test's namespace, without identity:
/// its push server speaks plain text, for proxies given no trust root.
pub fn start_operator(bed: &Bed, push: SocketAddr, admin: SocketAddr, dir: &Path, n: u32) -> Proc {
    start_operator_with(bed, push, admin, free_addr(), dir, n, &["--no-identity"])
}

/// The `weft-operator` command every operator process of these tests starts from: the
/// bed's kubeconfig, push, admin and identity endpoints on the given loopback addresses
/// (never the default 0.0.0.0:15012: replicas in one test would collide on it), its Lease
/// (identity `operator-<n>`) and its watch in namespace `ns`. The webhook flags are the
/// caller's.
pub fn operator_command(
    ns: &str,
    push: SocketAddr,
    admin: SocketAddr,
    identity: SocketAddr,
    n: u32,
) -> Command {
    // `WEFT_TEST_OPERATOR_BIN` overrides it, as in tests/chart.rs: in a target dir shared
    // by several worktrees, `target/debug/weft-operator` is whoever built last.
    let bin = std::env::var_os("WEFT_TEST_OPERATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_weft-operator")));
    let mut cmd = Command::new(bin);
    cmd.env("KUBECONFIG", shared::testbed().kubeconfig())
        .args(["--push-addr", &push.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--identity-addr", &identity.to_string()])
        .args(["--lease-namespace", ns])
        .args(["--identity", &format!("operator-{n}")])
        .args(["--lease-duration", "5s"])
        .args(["--watch-namespace", ns]);
    cmd
}

/// Like [`start_operator`] with identity on: serving the identity endpoint on `identity`
/// (loopback) and the push server over TLS from the mesh root, with
/// `extra` arguments after the rig's own. Its trust root Secret is in the bed's namespace
/// (`--lease-namespace`).
pub fn start_operator_with(
    bed: &Bed,
    push: SocketAddr,
    admin: SocketAddr,
    identity: SocketAddr,
    dir: &Path,
    n: u32,
    extra: &[&str],
) -> Proc {
    let mut cmd = operator_command(&bed.ns, push, admin, identity, n);
    cmd.arg("--no-webhook").args(extra);
    Proc::spawn(&format!("operator-{n}"), cmd, dir)
}

/// Waits for the mesh's trust root that `operator` generated (`ca.crt` of its Secret
/// `weft-identity` in the bed's namespace), as an installer reads it, and writes it to
/// `path` for proxies to verify the operator against.
pub async fn write_trust_root(bed: &Bed, operator: &Proc, path: &Path) {
    let secrets = bed.api::<Secret>();
    let ca = eventually(WAIT, || async {
        let s = secrets.get("weft-identity").await?;
        Ok(s.data
            .and_then(|d| d.get("ca.crt").cloned())
            .context("no ca.crt")?
            .0)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    std::fs::write(path, &ca).unwrap();
}

/// An operator process with identity on, the addresses it serves, and the mesh's trust
/// root written to a file.
pub struct IdentityOperator {
    /// The process (killed on drop).
    pub proc: Proc,
    /// Its push server (TLS from the mesh root).
    pub push: SocketAddr,
    /// Its admin endpoint.
    pub admin: SocketAddr,
    /// Its identity endpoint.
    pub identity: SocketAddr,
    /// The mesh's trust root (PEM), `ca.crt` in the test's directory.
    pub trust_root: PathBuf,
}

impl IdentityOperator {
    /// Starts operator 1 with its identity endpoint certified for `dns_name` and `extra`
    /// flags, and waits for its trust root.
    pub async fn start(bed: &Bed, dir: &Path, dns_name: &str, extra: &[&str]) -> Self {
        let (push, admin, identity) = (free_addr(), free_addr(), free_addr());
        let mut flags = vec!["--identity-dns-names", dns_name];
        flags.extend(extra);
        let proc = start_operator_with(bed, push, admin, identity, dir, 1, &flags);
        let trust_root = dir.join("ca.crt");
        write_trust_root(bed, &proc, &trust_root).await;
        IdentityOperator {
            proc,
            push,
            admin,
            identity,
            trust_root,
        }
    }

    /// Proxy flags to get certificates from this operator's identity endpoint, verified
    /// as `dns_name` against the trust root file.
    pub fn proxy_identity(&self, dns_name: &str) -> ProxyIdentity {
        ProxyIdentity {
            addr: self.identity,
            server_name: dns_name.to_owned(),
            trust_root: self.trust_root.clone(),
            inline: false,
        }
    }
}

/// The identity flags of a proxy process: the operator's identity endpoint, the DNS name
/// its certificate carries, and the trust root file (PEM) it is verified against.
#[derive(Clone, Debug)]
pub struct ProxyIdentity {
    pub addr: SocketAddr,
    pub server_name: String,
    pub trust_root: PathBuf,
    /// Pass the root's PEM in `WEFT_TRUST_ROOTS`, as the injector does, instead of the file.
    pub inline: bool,
}

/// Optional parts of a [`ProxyProc`].
#[derive(Clone, Debug, Default)]
pub struct ProxyOptions {
    /// An inbound listener (`--inbound-forward`) to this application address.
    pub app: Option<SocketAddr>,
    /// Where that inbound listener listens (default: a free loopback address).
    pub inbound_listen: Option<SocketAddr>,
    /// Identity on (`--identity-addr` and friends): mutual TLS with meshed peers.
    pub identity: Option<ProxyIdentity>,
    /// Without identity, a trust root file and the operator's server name
    /// (`--trust-root-file`, `--operator-server-name`): the config stream over TLS only.
    pub operator_root: Option<(PathBuf, String)>,
}

/// A `weft-proxy` process for `pod`, subscribed to the operator at `push`, with a forward
/// listener to `service` (a config name), an admin listener, and optionally an inbound
/// listener to the pod's application.
pub struct ProxyProc {
    pub proc: Proc,
    /// The forward listener: every connection goes to the service.
    pub forward: SocketAddr,
    /// The admin listener (`/config`, `/metrics`).
    pub admin: SocketAddr,
    /// The inbound listener (`--inbound-forward`): every connection goes to the pod's
    /// application as inbound traffic, where the pod's rate limit applies.
    pub inbound: Option<SocketAddr>,
}

impl ProxyProc {
    pub async fn start(bed: &Bed, push: SocketAddr, pod: &Pod, service: &str, dir: &Path) -> Self {
        Self::start_with_app(bed, push, pod, service, dir, None).await
    }

    /// Like [`ProxyProc::start`], with an inbound listener to `app` when given.
    pub async fn start_with_app(
        bed: &Bed,
        push: SocketAddr,
        pod: &Pod,
        service: &str,
        dir: &Path,
        app: Option<SocketAddr>,
    ) -> Self {
        let options = ProxyOptions {
            app,
            ..ProxyOptions::default()
        };
        Self::start_with(bed, push, pod, service, dir, &options).await
    }

    /// Like [`ProxyProc::start`], with `options`.
    pub async fn start_with(
        bed: &Bed,
        push: SocketAddr,
        pod: &Pod,
        service: &str,
        dir: &Path,
        options: &ProxyOptions,
    ) -> Self {
        let name = pod.name_any();
        let token = dir.join(format!("token-{name}"));
        std::fs::write(&token, bed.token(pod).await).unwrap();
        let (forward, admin) = (free_addr(), free_addr());
        // `WEFT_TEST_PROXY_BIN` overrides it, like `WEFT_TEST_OPERATOR_BIN`: in a target
        // dir shared by several worktrees, `target/debug/weft-proxy` is whoever built last.
        let bin = std::env::var_os("WEFT_TEST_PROXY_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| sibling_binary("weft-proxy"));
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .args(["--operator-addr", &push.to_string()])
            .args(["--pod-namespace", &bed.ns])
            .args(["--pod-name", &name])
            .arg("--token-file")
            .arg(&token)
            .arg("--no-transparent")
            .args(["--forward", &format!("{forward}={service}")])
            .args(["--admin-addr", &admin.to_string()]);
        let inbound = options.app.map(|app| {
            let listen = options.inbound_listen.unwrap_or_else(free_addr);
            cmd.args(["--inbound-forward", &format!("{listen}={app}")]);
            listen
        });
        if let Some(id) = &options.identity {
            cmd.args(["--identity-addr", &id.addr.to_string()])
                .args(["--identity-server-name", &id.server_name]);
            if id.inline {
                cmd.env(
                    "WEFT_TRUST_ROOTS",
                    std::fs::read_to_string(&id.trust_root).unwrap(),
                );
            } else {
                cmd.arg("--trust-root-file").arg(&id.trust_root);
            }
        }
        if let Some((root, server_name)) = &options.operator_root {
            cmd.arg("--trust-root-file")
                .arg(root)
                .args(["--operator-server-name", server_name]);
        }
        let proc = Proc::spawn(&format!("proxy-{name}"), cmd, dir);
        ProxyProc {
            proc,
            forward,
            admin,
            inbound,
        }
    }
}

impl ProxyProc {
    /// Waits until a request to the proxy's forward listener gets 200 `body` from the
    /// backend; on failure, panics with the proxy's and `operator`'s last log lines.
    pub async fn until_answered(&self, body: &str, operator: &Proc) {
        eventually(WAIT, || async {
            let (status, got) = super::mesh::http_get(self.forward, "/").await?;
            anyhow::ensure!(status == 200 && got == body, "{status} {got}");
            Ok(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", self.proc.log_tail(), operator.log_tail()));
    }
}

/// An operator process without identity (plain-text push) in the bed's namespace, and
/// Service `web` whose one endpoint is a backend answering `hello` on a test host.
pub struct PlainMesh {
    /// The operator (killed on drop).
    pub operator: Proc,
    /// Its push server.
    pub push: SocketAddr,
    /// Its admin endpoint.
    pub admin: SocketAddr,
    /// Service web's one endpoint.
    pub backend: SocketAddr,
    /// Where the backend lives (removed on drop).
    pub host: super::mesh::TestHost,
}

impl PlainMesh {
    /// Starts operator 1 (its log in `dir`), the backend and Service `web`.
    pub async fn start(bed: &Bed, dir: &Path) -> PlainMesh {
        let (push, admin) = (free_addr(), free_addr());
        let operator = start_operator(bed, push, admin, dir, 1);
        let (backend, host) = super::mesh::backend().await;
        service_to(bed, "web", backend).await;
        PlainMesh {
            operator,
            push,
            admin,
            backend,
            host,
        }
    }
}

/// A Service `name` (port 80) without a selector, whose one endpoint is `backend`.
pub async fn service_to(bed: &Bed, name: &str, backend: SocketAddr) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    bed.api::<Service>()
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "weft-test"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": backend.port()}],
        "endpoints": [{"addresses": [backend.ip().to_string()], "conditions": {"ready": true}}],
    }))
    .unwrap();
    bed.api::<EndpointSlice>()
        .create(&PostParams::default(), &slice)
        .await
        .unwrap();
}
