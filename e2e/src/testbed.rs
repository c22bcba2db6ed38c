//! One running control plane: etcd, kube-apiserver and kube-controller-manager on
//! loopback ports chosen at start, with a state directory holding their PKI, data, logs
//! and a kubeconfig.
//!
//! Two test runs never collide (fresh ports and directories each time), and a run that
//! crashed is cleaned up by the next one ([`reap_stale`]).

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use crate::process::Lifetime as Mode;
use crate::{
    binaries::Binaries,
    certs::{self, files},
    process,
};

/// How long the control plane may take from spawn to `/readyz` ok.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// File in the state directory listing the process groups to stop, one per line.
const PIDS_FILE: &str = "pids";
/// File in the state directory naming the process that owns an attached test bed.
const OWNER_FILE: &str = "owner";

/// Where the API server listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serve {
    /// `127.0.0.1` only: enough for tests without a node.
    Loopback,
    /// The node's host address ([`crate::node::HOST_IP`]), reachable from pods.
    NodeHost,
}

/// A running test bed. Dropping it stops every process it started (unless detached).
pub struct TestBed {
    dir: PathBuf,
    binaries: Binaries,
    server: String,
    children: Vec<(String, Child)>,
    /// The API server's flags, to start it again ([`TestBed::start_apiserver`]).
    apiserver_args: Vec<String>,
    mode: Mode,
    remove_dir: bool,
}

impl TestBed {
    /// Starts a test bed whose state lives in a fresh directory under the system temp dir,
    /// stopped when dropped or when this process dies.
    pub fn start_attached() -> anyhow::Result<Self> {
        Self::start_attached_as(Serve::Loopback)
    }

    /// As [`TestBed::start_attached`], with the API server serving on the node's host
    /// address instead of loopback, so that a node's pods can reach it (see [`crate::node`]).
    pub fn start_attached_for_node() -> anyhow::Result<Self> {
        Self::start_attached_as(Serve::NodeHost)
    }

    fn start_attached_as(serve: Serve) -> anyhow::Result<Self> {
        let root = attached_root();
        fs::create_dir_all(&root)?;
        reap_stale(&root);
        // Written under a hidden name and renamed, so that a concurrent run's
        // `reap_stale` never sees the directory without its owner.
        let name = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        let staging = root.join(format!(".{name}"));
        fs::create_dir_all(&staging)?;
        fs::write(staging.join(OWNER_FILE), std::process::id().to_string())?;
        let dir = root.join(name);
        fs::rename(&staging, &dir)?;
        let keep = std::env::var_os("WEFT_TESTBED_KEEP").is_some();
        let mut bed = Self::start_in(dir, Mode::Attached, serve)?;
        bed.remove_dir = !keep;
        Ok(bed)
    }

    /// Starts a test bed in `dir` (emptied first) that keeps running after this process
    /// exits, until [`stop_dir`] is called on the same directory.
    pub fn start_detached(dir: &Path) -> anyhow::Result<Self> {
        stop_dir(dir)?;
        fs::create_dir_all(dir)?;
        Self::start_in(dir.to_path_buf(), Mode::Detached, Serve::Loopback)
    }

    /// As [`TestBed::start_detached`], serving on the node's host address (see
    /// [`TestBed::start_attached_for_node`]).
    pub fn start_detached_for_node(dir: &Path) -> anyhow::Result<Self> {
        stop_dir(dir)?;
        fs::create_dir_all(dir)?;
        Self::start_in(dir.to_path_buf(), Mode::Detached, Serve::NodeHost)
    }

    fn start_in(dir: PathBuf, mode: Mode, serve: Serve) -> anyhow::Result<Self> {
        // Ports are found free here and bound by the components a moment later; a test
        // running beside this one can take one in between (seen in CI: etcd's peer port).
        // A start that lost that race starts again, with new ports.
        let mut attempt = 1;
        loop {
            match Self::start_once(dir.clone(), mode, serve) {
                Err(e)
                    if attempt < START_ATTEMPTS
                        && format!("{e:#}").contains("address already in use") =>
                {
                    tracing::warn!(
                        attempt,
                        error = %format!("{e:#}"),
                        "a port was taken before a component bound it; starting again with new ports"
                    );
                    stop_dir(&dir)?;
                    fs::create_dir_all(&dir)?;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_once(dir: PathBuf, mode: Mode, serve: Serve) -> anyhow::Result<Self> {
        let binaries = Binaries::ensure()?;
        let started = Instant::now();
        certs::write_pki(&dir)?;
        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let api_port = free_port()?;
        let host = match serve {
            Serve::Loopback => "127.0.0.1",
            Serve::NodeHost => crate::node::HOST_IP,
        };
        let server = format!("https://{host}:{api_port}");
        write_kubeconfig(&dir, &server)?;

        let mut bed = TestBed {
            dir,
            binaries,
            server,
            children: Vec::new(),
            apiserver_args: Vec::new(),
            mode,
            remove_dir: false,
        };
        let d = bed.dir.clone();
        let p = |name: &str| d.join(name).display().to_string();

        bed.spawn(
            "etcd",
            "etcd",
            &[
                format!("--data-dir={}", p("etcd")),
                format!("--listen-client-url=http://127.0.0.1:{etcd_client}"),
                format!("--listen-peer-url=http://127.0.0.1:{etcd_peer}"),
            ],
        )?;
        bed.apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
            format!("--bind-address={host}"),
            format!("--advertise-address={host}"),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", p("apiserver-certs")),
            format!("--tls-cert-file={}", p(files::SERVING_CERT)),
            format!("--tls-private-key-file={}", p(files::SERVING_KEY)),
            format!("--client-ca-file={}", p(files::CA_CERT)),
            format!("--service-account-key-file={}", p(files::SA_PUB)),
            format!("--service-account-signing-key-file={}", p(files::SA_KEY)),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--service-cluster-ip-range=198.19.0.0/16".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        match serve {
            // No pod network: the `kubernetes` Service gets no endpoints.
            Serve::Loopback => bed
                .apiserver_args
                .push("--endpoint-reconciler-type=none".into()),
            // Pods reach the API server through the `kubernetes` Service; the API server
            // reaches the kubelet (logs, exec, port-forward) with the admin credentials and
            // checks the kubelet's serving certificate against the test bed's CA.
            Serve::NodeHost => bed.apiserver_args.extend([
                format!("--kubelet-client-certificate={}", p(files::ADMIN_CERT)),
                format!("--kubelet-client-key={}", p(files::ADMIN_KEY)),
                format!("--kubelet-certificate-authority={}", p(files::CA_CERT)),
                "--kubelet-preferred-address-types=InternalIP".into(),
            ]),
        }
        bed.spawn(
            "kube-apiserver",
            "kube-apiserver",
            &bed.apiserver_args.clone(),
        )?;
        bed.wait_ready(started)?;
        bed.spawn(
            "kube-controller-manager",
            "kube-controller-manager",
            &[
                format!("--kubeconfig={}", p("kubeconfig")),
                "--secure-port=0".into(),
                "--leader-elect=false".into(),
                format!("--service-account-private-key-file={}", p(files::SA_KEY)),
                format!("--root-ca-file={}", p(files::CA_CERT)),
                "--use-service-account-credentials=false".into(),
                "--concurrent-deployment-syncs=2".into(),
                "--concurrent-replicaset-syncs=2".into(),
                "--v=1".into(),
            ],
        )?;
        tracing::info!(server = %bed.server, dir = %bed.dir.display(), elapsed = ?started.elapsed(), "test bed ready");
        Ok(bed)
    }

    /// Starts `component` as the child named `name` (its log is `<name>.log`).
    fn spawn(&mut self, name: &str, component: &str, args: &[String]) -> anyhow::Result<()> {
        let mut cmd = Command::new(self.binaries.component(component));
        cmd.args(args);
        let log = self.dir.join(format!("{name}.log"));
        let child = process::spawn(cmd, &log, self.mode)?;
        self.children.push((name.to_owned(), child));
        self.write_pids()
    }

    fn write_pids(&self) -> anyhow::Result<()> {
        let pids: String = self
            .children
            .iter()
            .map(|(_, c)| format!("{}\n", c.id()))
            .collect();
        fs::write(self.dir.join(PIDS_FILE), pids)?;
        Ok(())
    }

    /// Stops the child named `name` (SIGTERM, then SIGKILL), leaving the others running.
    fn stop_child(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("no running {name}"))?;
        let (_, mut child) = self.children.remove(i);
        if let Ok(pid) = i32::try_from(child.id()) {
            process::stop_group(pid, Duration::from_secs(10));
        }
        let _ = child.wait();
        self.write_pids()
    }

    /// Stops the API server, leaving etcd and the controller manager running: clients'
    /// watches break, as when a control-plane node restarts.
    pub fn stop_apiserver(&mut self) -> anyhow::Result<()> {
        self.stop_child("kube-apiserver")
    }

    /// Starts the API server again, on the same port with the same flags, and waits for
    /// `/readyz`.
    pub fn start_apiserver(&mut self) -> anyhow::Result<()> {
        let args = self.apiserver_args.clone();
        self.spawn("kube-apiserver", "kube-apiserver", &args)?;
        self.wait_ready(Instant::now())
    }

    /// Starts a second API server on the same etcd (as in a highly available control
    /// plane) on a fresh port, waits for its `/readyz` and returns its URL. Stop it with
    /// [`TestBed::stop_second_apiserver`].
    pub fn start_second_apiserver(&mut self) -> anyhow::Result<String> {
        let port = free_port()?;
        let url = format!("https://127.0.0.1:{port}");
        let mut args: Vec<String> = self
            .apiserver_args
            .iter()
            .filter(|a| !a.starts_with("--secure-port=") && !a.starts_with("--cert-dir="))
            .cloned()
            .collect();
        args.push(format!("--secure-port={port}"));
        args.push(format!(
            "--cert-dir={}",
            self.dir.join("apiserver-2-certs").display()
        ));
        self.spawn("kube-apiserver-2", "kube-apiserver", &args)?;
        self.wait_ready_at(Instant::now(), Some(&url), "kube-apiserver-2")?;
        Ok(url)
    }

    /// Stops the API server started by [`TestBed::start_second_apiserver`].
    pub fn stop_second_apiserver(&mut self) -> anyhow::Result<()> {
        self.stop_child("kube-apiserver-2")
    }

    /// Polls `/readyz` until it answers `ok`, failing early (with the log tail) when a
    /// component exits.
    fn wait_ready(&mut self, started: Instant) -> anyhow::Result<()> {
        self.wait_ready_at(started, None, "kube-apiserver")
    }

    /// As [`TestBed::wait_ready`], for the API server at `url` (the kubeconfig's when
    /// `None`) whose log is `<log>.log`.
    fn wait_ready_at(
        &mut self,
        started: Instant,
        url: Option<&str>,
        log: &str,
    ) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut last_error = String::new();
        while started.elapsed() < READY_TIMEOUT {
            for (name, child) in &mut self.children {
                if let Some(status) = child.try_wait()? {
                    let log = self.dir.join(format!("{name}.log"));
                    bail!(
                        "{name} exited ({status}) before the API server was ready; last log lines:\n{}",
                        tail(&log, 30)
                    );
                }
            }
            match rt.block_on(self.readyz_at(url)) {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last_error = body,
                Err(e) => last_error = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "{log} not ready after {READY_TIMEOUT:?}: {last_error}\nlast log lines:\n{}",
            tail(&self.dir.join(format!("{log}.log")), 30)
        )
    }

    async fn readyz_at(&self, url: Option<&str>) -> anyhow::Result<String> {
        let client = self.client_at(url).await?;
        let req = http::Request::get("/readyz").body(Vec::new())?;
        Ok(client.request_text(req).await?)
    }

    /// A client for the test bed's API server, authenticated as an administrator.
    ///
    /// Create one per tokio runtime: a client's connections belong to the runtime it was
    /// first used on.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        self.client_at(None).await
    }

    /// As [`TestBed::client`], for the API server at `url` (such as the second one)
    /// instead of the kubeconfig's.
    pub async fn client_at(&self, url: Option<&str>) -> anyhow::Result<kube::Client> {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig())?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        if let Some(url) = url {
            config.cluster_url = url.parse()?;
        }
        Ok(kube::Client::try_from(config)?)
    }

    /// The kubeconfig file that `kubectl` and [`TestBed::client`] use.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The state directory (PKI, etcd data, logs, kubeconfig).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The test bed's binaries (put [`Binaries::dir`] on `PATH` for the matching kubectl).
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// A `kubectl` command of the test bed's version, pointed at this test bed.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.binaries.component("kubectl"));
        cmd.env("KUBECONFIG", self.kubeconfig());
        cmd
    }

    /// The last `lines` lines of one component's log, for failure messages.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        tail(&self.dir.join(format!("{component}.log")), lines)
    }

    /// Stops every component (SIGTERM, then SIGKILL after a grace period).
    pub fn stop(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            if let Ok(pid) = i32::try_from(child.id()) {
                process::stop_group(pid, Duration::from_secs(10));
            }
            let _ = child.wait();
        }
        self.children.clear();
        let _ = fs::remove_file(self.dir.join(PIDS_FILE));
        if self.remove_dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        if self.mode == Mode::Attached {
            self.stop();
        }
    }
}

/// Stops the processes of a test bed whose state is in `dir` (started detached, or left
/// by a crashed run) and removes the directory.
pub fn stop_dir(dir: &Path) -> anyhow::Result<()> {
    if let Ok(pids) = fs::read_to_string(dir.join(PIDS_FILE)) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            process::stop_group(pid, Duration::from_secs(10));
        }
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// Where attached test beds keep their state.
fn attached_root() -> PathBuf {
    std::env::temp_dir().join("weft-testbed")
}

/// Cleans up after test beds whose owning process is gone (a crashed or killed run).
pub fn reap_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let owner = fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let orphaned = match owner {
            Some(pid) => !process::alive(pid),
            None => true,
        };
        if orphaned {
            tracing::info!(dir = %dir.display(), "removing a test bed left by an earlier run");
            let _ = stop_dir(&dir);
        }
    }
}

/// How many times a start that lost a race for a port is tried in all.
const START_ATTEMPTS: u32 = 3;

/// A loopback port free right now (a race with other binders is accepted: ports come from
/// the ephemeral range and each start picks new ones).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

fn write_kubeconfig(dir: &Path, server: &str) -> anyhow::Result<()> {
    let p = |name: &str| dir.join(name).display().to_string();
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "weft-testbed", "cluster": {
            "server": server,
            "certificate-authority": p(files::CA_CERT),
        }}],
        "users": [{"name": "weft-admin", "user": {
            "client-certificate": p(files::ADMIN_CERT),
            "client-key": p(files::ADMIN_KEY),
        }}],
        "contexts": [{"name": "weft-testbed", "context": {
            "cluster": "weft-testbed", "user": "weft-admin", "namespace": "default",
        }}],
        "current-context": "weft-testbed",
    });
    fs::write(dir.join("kubeconfig"), serde_yaml::to_string(&config)?)?;
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
