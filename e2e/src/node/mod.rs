//! A real single Kubernetes node on this machine: containerd with runc and the CNI
//! plugins, kubelet, kube-proxy (iptables mode), kube-scheduler and CoreDNS, beside the
//! test bed's control plane, which then serves on the node's host address.
//!
//! ```text
//!   up:  lock ─▶ sweep leftovers ─▶ build/find binaries ─▶ guard + bridge + cgroup root
//!        ─▶ control plane ─▶ containerd ─▶ import images ─▶ kube-scheduler, kubelet
//!        ─▶ node Ready ─▶ kube-proxy ─▶ CoreDNS Ready
//!   down: stop kubelet & co ─▶ remove pods (crictl) ─▶ stop containerd ─▶ sweep
//! ```
//!
//! Addresses (all inside 198.18.0.0/15, kept from leaving the machine by [`host`]'s
//! guard): the bridge [`BRIDGE`] holds [`HOST_IP`], pods get [`POD_CIDR`], Services
//! [`SERVICE_CIDR`], cluster DNS is [`DNS_IP`]. One node per machine: its state lives in
//! [`node_root`] and a lock file serializes `up` and `down`.

pub mod build;
pub mod host;
pub mod image;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Node as KubeNode};
use kube::Api;
use serde_json::json;

pub use build::NodeBinaries;

use crate::{
    certs::files,
    process::{self, Lifetime},
    testbed::TestBed,
};

/// The node's name (its kubelet's hostname override).
pub const NODE_NAME: &str = "weft-node";
/// This machine's address on the pod bridge: the pods' gateway, the kubelet's and the
/// API server's address.
pub const HOST_IP: &str = "198.18.240.1";
/// The pods' addresses (host-local IPAM on the bridge).
pub const POD_CIDR: &str = "198.18.240.0/24";
/// Prefix length of [`POD_CIDR`].
pub(crate) const POD_PREFIX_LEN: u8 = 24;
/// Service cluster IPs (the API server's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "198.19.0.0/16";
/// CoreDNS's Service address.
pub const DNS_IP: &str = "198.19.0.10";
/// The range nothing may send out of this machine (RFC 2544's benchmarking range).
pub const GUARDED_RANGE: &str = "198.18.0.0/15";
/// The pod bridge.
pub const BRIDGE: &str = "weft0";
/// The kubelet's cgroup root, in every hierarchy.
pub const CGROUP_ROOT: &str = "weft-node";
/// The CNI network's name.
pub const CNI_NETWORK: &str = "weft";
/// The pod sandbox image, built here from `e2e/pause`.
pub const PAUSE_IMAGE: &str = "weft.test/pause:1";
/// A general-purpose test image: Debian's static busybox (`sh`, `wget`, `nslookup`,
/// `httpd`, `nc`, …).
pub const TEST_IMAGE: &str = "weft.test/busybox:1.35.0";
/// CoreDNS's image.
pub const COREDNS_IMAGE: &str = "weft.test/coredns:v1.14.7";
/// The kubelet's port on [`HOST_IP`].
const KUBELET_PORT: u16 = 10250;

/// How long the node may take to report Ready, and CoreDNS to become available.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Where the node keeps its state: `$WEFT_NODE_ROOT`, else `/var/lib/weft-node`.
pub fn node_root() -> PathBuf {
    std::env::var_os("WEFT_NODE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/weft-node"))
}

/// The machine-wide lock: one node per machine.
fn lock_path() -> PathBuf {
    PathBuf::from("/run/weft-node.lock")
}

/// File in the node root naming who owns the node: `attached <pid>` or `detached <dir>`.
const OWNER_FILE: &str = "owner";
/// File in the node root listing the node's process groups.
const PIDS_FILE: &str = "pids";
/// File in the node root holding the path of the kube-proxy binary (for its `--cleanup`).
const KUBE_PROXY_FILE: &str = "kube-proxy-binary";

/// A running node and its control plane. Dropping an attached node removes everything.
pub struct Node {
    bed: Option<TestBed>,
    root: PathBuf,
    bins: NodeBinaries,
    children: Vec<(String, Child)>,
    mode: Lifetime,
    _lock: fs::File,
}

impl Node {
    /// Brings up a control plane and the node, both stopped and removed when the node is
    /// dropped or this process dies (tests). Waits while another run holds the node.
    pub fn start_attached() -> anyhow::Result<Self> {
        Self::start(Lifetime::Attached, None)
    }

    /// Brings up a control plane (state in `dir`) and the node, left running after this
    /// process exits until [`down`] (`weft-testbed up --node`). Replaces a node already up.
    pub fn start_detached(dir: &Path) -> anyhow::Result<Self> {
        Self::start(Lifetime::Detached, Some(dir))
    }

    fn start(mode: Lifetime, dir: Option<&Path>) -> anyhow::Result<Self> {
        let started = Instant::now();
        let lock = acquire_lock()?;
        let root = node_root();
        if mode == Lifetime::Attached
            && let Ok(owner) = fs::read_to_string(root.join(OWNER_FILE))
            && let Some(dir) = owner.strip_prefix("detached ")
            && pids_alive(&root)
        {
            bail!(
                "a node started by `weft-testbed up --node` (state in {}) is running; stop it with `weft-testbed down` first",
                dir.trim()
            );
        }
        sweep(&root)?;
        if let Some(dir) = dir {
            crate::testbed::stop_dir(dir)?;
        }

        let bins = NodeBinaries::ensure()?;
        // The guard goes in before anything can send from a pod address.
        let external = host::external_interfaces()?;
        host::install_guard(None, &external)?;
        tracing::info!(guarded = ?external, range = GUARDED_RANGE, "egress guard installed");
        host::setup_bridge()?;
        host::create_cgroup_root()?;
        for sub in [
            "containerd",
            "cni/net.d",
            "cni/ipam",
            "kubelet",
            "pod-logs",
            "images",
        ] {
            fs::create_dir_all(root.join(sub))?;
        }
        let owner = match dir {
            Some(d) => format!("detached {}", d.display()),
            None => format!("attached {}", std::process::id()),
        };
        fs::write(root.join(OWNER_FILE), owner)?;

        let bed = match dir {
            Some(d) => {
                fs::create_dir_all(d)?;
                TestBed::start_detached_for_node(d)?
            }
            None => TestBed::start_attached_for_node()?,
        };
        let mut node = Node {
            bed: Some(bed),
            root,
            bins,
            children: Vec::new(),
            mode,
            _lock: lock,
        };
        if let Err(e) = node.bring_up(started) {
            let logs = node.failure_logs();
            node.stop();
            return Err(e.context(logs));
        }
        Ok(node)
    }

    fn bring_up(&mut self, started: Instant) -> anyhow::Result<()> {
        let kube_bins = self.testbed().binaries().clone();
        fs::write(
            self.root.join(KUBE_PROXY_FILE),
            kube_bins.component("kube-proxy").display().to_string(),
        )?;
        self.write_configs()?;

        let ctd_config = self.root.join("containerd/config.toml");
        let mut containerd = Command::new(self.bins.path("containerd"));
        containerd
            .arg("--config")
            .arg(&ctd_config)
            .env("PATH", self.path_env());
        self.spawn("containerd", containerd)?;
        self.wait_for("containerd", Duration::from_secs(30), |node| {
            let out = node.ctr().arg("version").output()?;
            if out.status.success() {
                Ok(())
            } else {
                bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
            }
        })?;
        self.import_images()?;

        let kubeconfig = self.testbed().kubeconfig();
        let mut scheduler = Command::new(kube_bins.component("kube-scheduler"));
        scheduler
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["--leader-elect=false", "--secure-port=0", "--v=1"]);
        self.spawn("kube-scheduler", scheduler)?;

        let mut kubelet = Command::new(kube_bins.component("kubelet"));
        kubelet
            .arg(format!(
                "--config={}",
                self.root.join("kubelet.json").display()
            ))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--root-dir={}",
                self.root.join("kubelet").display()
            ))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={HOST_IP}"))
            .arg("--v=1")
            .env("PATH", self.path_env());
        self.spawn("kubelet", kubelet)?;
        let rt = runtime()?;
        let client = rt.block_on(self.testbed().client())?;
        self.wait_for("node Ready", READY_TIMEOUT, |_| {
            let node = rt.block_on(Api::<KubeNode>::all(client.clone()).get(NODE_NAME))?;
            let ready = node
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Ready");
            match ready {
                Some(c) if c.status == "True" => Ok(()),
                Some(c) => bail!("Ready={} ({})", c.status, c.message.unwrap_or_default()),
                None => bail!("no Ready condition yet"),
            }
        })?;

        let mut proxy = Command::new(kube_bins.component("kube-proxy"));
        proxy
            .arg(format!(
                "--config={}",
                self.root.join("kube-proxy.json").display()
            ))
            .arg("--v=1")
            .env("PATH", self.path_env());
        self.spawn("kube-proxy", proxy)?;

        let manifest = self.root.join("coredns.json");
        fs::write(&manifest, serde_json::to_vec_pretty(&coredns_manifest())?)?;
        let out = self
            .testbed()
            .kubectl()
            .arg("apply")
            .arg("-f")
            .arg(&manifest)
            .output()?;
        if !out.status.success() {
            bail!(
                "applying CoreDNS: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.wait_for("CoreDNS available", READY_TIMEOUT, |_| {
            let d = rt.block_on(
                Api::<Deployment>::namespaced(client.clone(), "kube-system").get("coredns"),
            )?;
            let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            if ready >= 1 {
                Ok(())
            } else {
                bail!("CoreDNS has no ready replica yet")
            }
        })?;
        tracing::info!(node = NODE_NAME, elapsed = ?started.elapsed(), "node ready");
        Ok(())
    }

    /// `PATH` for the node's daemons: the node binaries (containerd finds its shim there),
    /// then the system's (runc, iptables, mount).
    fn path_env(&self) -> String {
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.bins.dir().display()
        )
    }

    fn socket(&self) -> PathBuf {
        self.root.join("containerd/containerd.sock")
    }

    /// A `ctr` command talking to the node's containerd, in the `k8s.io` namespace.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new(self.bins.path("ctr"));
        cmd.arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"]);
        cmd
    }

    /// A `crictl` command talking to the node's containerd.
    pub fn crictl(&self) -> Command {
        crictl(&self.bins, &self.socket())
    }

    /// The control plane the node belongs to.
    pub fn testbed(&self) -> &TestBed {
        self.bed
            .as_ref()
            .unwrap_or_else(|| unreachable!("the test bed is only taken when stopping"))
    }

    /// The node's state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn spawn(&mut self, name: &str, cmd: Command) -> anyhow::Result<()> {
        let log = self.testbed().dir().join(format!("{name}.log"));
        let child = process::spawn(cmd, &log, self.mode)?;
        self.children.push((name.to_owned(), child));
        let pids: String = self
            .children
            .iter()
            .map(|(_, c)| format!("{}\n", c.id()))
            .collect();
        fs::write(self.root.join(PIDS_FILE), pids)?;
        Ok(())
    }

    /// Polls `check` until it succeeds, failing early when a node process exits.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            for (name, child) in &mut self.children {
                if let Some(status) = child.try_wait()? {
                    bail!("{name} exited ({status}) while waiting for {what}");
                }
            }
            match check(self) {
                Ok(()) => return Ok(()),
                Err(e) if start.elapsed() > timeout => {
                    return Err(e.context(format!("{what}: not after {timeout:?}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    fn failure_logs(&self) -> String {
        let Some(bed) = &self.bed else {
            return String::new();
        };
        let mut text = String::from("the node did not come up; last log lines:");
        for name in ["containerd", "kubelet", "kube-proxy", "kube-scheduler"] {
            text.push_str(&format!("\n--- {name}\n{}", bed.log_tail(name, 15)));
        }
        text
    }

    fn import_images(&self) -> anyhow::Result<()> {
        let busybox_links: Vec<(String, String)> = {
            let out = Command::new(build::BUSYBOX).arg("--list").output()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|a| !a.is_empty() && *a != "busybox")
                .map(|a| (format!("/bin/{a}"), "busybox".to_owned()))
                .collect()
        };
        let specs = [
            image::ImageSpec {
                reference: PAUSE_IMAGE.to_owned(),
                files: vec![(self.bins.path("pause"), "/pause".to_owned())],
                links: Vec::new(),
                entrypoint: vec!["/pause".to_owned()],
                cmd: Vec::new(),
            },
            image::ImageSpec {
                reference: TEST_IMAGE.to_owned(),
                files: vec![(PathBuf::from(build::BUSYBOX), "/bin/busybox".to_owned())],
                links: busybox_links,
                entrypoint: Vec::new(),
                cmd: vec!["sh".to_owned()],
            },
            image::ImageSpec {
                reference: COREDNS_IMAGE.to_owned(),
                files: vec![(self.bins.path("coredns"), "/coredns".to_owned())],
                links: Vec::new(),
                entrypoint: vec!["/coredns".to_owned()],
                cmd: Vec::new(),
            },
        ];
        for (i, spec) in specs.iter().enumerate() {
            let archive = self.root.join(format!("images/{i}.tar"));
            image::write_archive(spec, &self.root.join("images/work"), &archive)?;
            self.import(&archive, &spec.reference)?;
        }
        Ok(())
    }

    /// Imports an OCI archive into the `k8s.io` namespace and pins the image, so the
    /// kubelet's image garbage collection never removes it.
    pub fn import(&self, archive: &Path, reference: &str) -> anyhow::Result<()> {
        let out = self
            .ctr()
            .args(["images", "import", "--platform", "linux/amd64"])
            .arg(archive)
            .output()?;
        if !out.status.success() {
            bail!(
                "importing {reference}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let out = self
            .ctr()
            .args([
                "images",
                "label",
                reference,
                "io.cri-containerd.pinned=pinned",
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "pinning {reference}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn write_configs(&self) -> anyhow::Result<()> {
        let root = self.root.display().to_string();
        let sock = self.socket().display().to_string();
        let containerd = format!(
            r#"version = 3
root = "{root}/containerd/root"
state = "{root}/containerd/state"
# NRI would listen on a machine-wide socket; the node needs none.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins.'io.containerd.internal.v1.opt']
  path = "{root}/containerd/opt"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  # Pod sandboxes ask for oom_score_adj -998; this machine refuses lowering it ("nsexec:
  # failed to update /proc/self/oom_score_adj: Permission denied"). Restricted, containerd
  # clamps it to its own.
  restrict_oom_score_adj = true
  # Keeps pods' network namespaces under the state directory, so `down` finds them all.
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{root}/containerd/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni}"]
    conf_dir = "{root}/cni/net.d"

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
            runc = self.bins.path("runc").display(),
            cni = build::CNI_BIN_DIR,
        );
        fs::write(self.root.join("containerd/config.toml"), containerd)?;

        let cni = json!({
            "cniVersion": "1.0.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{
                            "subnet": POD_CIDR,
                            "rangeStart": "198.18.240.10",
                            "gateway": HOST_IP,
                        }]],
                        // Pods get no default route: nothing outside the test bed's
                        // ranges is reachable from them at all.
                        "routes": [{"dst": GUARDED_RANGE}],
                        "dataDir": format!("{root}/cni/ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        fs::write(
            self.root.join("cni/net.d/10-weft.conflist"),
            serde_json::to_vec_pretty(&cni)?,
        )?;

        let bed_dir = self.testbed().dir().to_path_buf();
        let p = |name: &str| bed_dir.join(name).display().to_string();
        let kubelet = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": HOST_IP,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "tlsCertFile": p(files::KUBELET_CERT),
            "tlsPrivateKeyFile": p(files::KUBELET_KEY),
            "authentication": {
                "x509": {"clientCAFile": p(files::CA_CERT)},
                "anonymous": {"enabled": false},
                "webhook": {"enabled": false},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": format!("unix://{sock}"),
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{CGROUP_ROOT}"),
            // This machine's cgroups are v1 (hybrid); the kubelet refuses them unless told.
            "failCgroupV1": false,
            "clusterDNS": [DNS_IP],
            "clusterDomain": "cluster.local",
            // No host resolver for pods: nothing resolves off the machine.
            "resolvConf": "",
            "podLogsDir": format!("{root}/pod-logs"),
            "registerNode": true,
            "serializeImagePulls": false,
            // The disk is shared and often past the default 10-15% thresholds; a test
            // node must not evict its pods or delete the images built here.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "maxPods": 110,
            "protectKernelDefaults": false,
            "localStorageCapacityIsolation": true,
        });
        fs::write(
            self.root.join("kubelet.json"),
            serde_json::to_vec_pretty(&kubelet)?,
        )?;

        let kubeconfig = self.testbed().kubeconfig().display().to_string();
        let proxy = json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": kubeconfig},
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": POD_CIDR,
            "bindAddress": HOST_IP,
            "healthzBindAddress": format!("127.0.0.1:{}", crate::testbed::free_port()?),
            "metricsBindAddress": format!("127.0.0.1:{}", crate::testbed::free_port()?),
            // NodePorts only on the node's bridge address, never on an external interface.
            "nodePortAddresses": [format!("{HOST_IP}/32")],
            // Leave the machine's conntrack sysctls alone.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        });
        fs::write(
            self.root.join("kube-proxy.json"),
            serde_json::to_vec_pretty(&proxy)?,
        )?;
        Ok(())
    }

    /// Stops the node and its control plane and removes everything the node created.
    pub fn stop(&mut self) {
        for name in ["kubelet", "kube-proxy", "kube-scheduler"] {
            self.stop_child(name);
        }
        if self.children.iter().any(|(n, _)| n == "containerd") {
            remove_pods(&self.bins, &self.socket());
        }
        self.stop_child("containerd");
        if let Err(e) = sweep(&self.root) {
            tracing::warn!(error = %format!("{e:#}"), "cleaning up the node");
        }
        if let Some(mut bed) = self.bed.take() {
            bed.stop();
            if self.mode == Lifetime::Detached {
                let _ = crate::testbed::stop_dir(bed.dir());
            }
        }
    }

    fn stop_child(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.children.remove(i);
            if let Ok(pid) = i32::try_from(child.id()) {
                process::stop_group(pid, Duration::from_secs(10));
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.mode == Lifetime::Attached && self.bed.is_some() {
            self.stop();
        }
    }
}

fn crictl(bins: &NodeBinaries, socket: &Path) -> Command {
    let mut cmd = Command::new(bins.path("crictl"));
    let endpoint = format!("unix://{}", socket.display());
    cmd.args([
        "--runtime-endpoint",
        &endpoint,
        "--image-endpoint",
        &endpoint,
    ])
    .args(["--timeout", "30s"]);
    cmd
}

/// Stops and removes every pod sandbox through the CRI, so CNI releases their addresses
/// and veths before containerd stops.
fn remove_pods(bins: &NodeBinaries, socket: &Path) {
    if socket.exists() {
        let _ = crictl(bins, socket)
            .args(["rmp", "--all", "--force"])
            .output();
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn acquire_lock() -> anyhow::Result<fs::File> {
    let path = lock_path();
    let file = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            tracing::info!(lock = %path.display(), "another run holds the node; waiting");
            file.lock().context("waiting for the node lock")?;
        }
        Err(fs::TryLockError::Error(e)) => return Err(e).context("locking the node"),
    }
    Ok(file)
}

/// Whether a process listed in the node's pids file is still alive.
fn pids_alive(root: &Path) -> bool {
    fs::read_to_string(root.join(PIDS_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .any(process::alive)
}

/// Removes a node and its control plane (`weft-testbed down`): takes the lock, stops a
/// detached node's processes and removes everything a node creates, whatever state an
/// earlier run left. Idempotent.
pub fn down(dir: Option<&Path>) -> anyhow::Result<()> {
    let _lock = acquire_lock()?;
    let root = node_root();
    if let Ok(owner) = fs::read_to_string(root.join(OWNER_FILE))
        && let Some(pid) = owner
            .strip_prefix("attached ")
            .and_then(|p| p.trim().parse::<i32>().ok())
        && process::alive(pid)
    {
        bail!("the node belongs to a running test (pid {pid}); it goes when that test ends");
    }
    sweep(&root)?;
    if let Some(dir) = dir {
        crate::testbed::stop_dir(dir)?;
    }
    Ok(())
}

/// Removes everything a node creates, from whatever state it is in: processes, pods and
/// shims, cgroups, mounts (network namespaces among them), kube-proxy's and CNI's
/// iptables state, the guard, the bridge and routes, and the state directory.
pub fn sweep(root: &Path) -> anyhow::Result<()> {
    let pids: Vec<i32> = fs::read_to_string(root.join(PIDS_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .collect();
    for pid in pids.iter().rev() {
        process::stop_group(*pid, Duration::from_secs(10));
    }
    host::kill_shims(root);
    host::remove_cgroups()?;
    host::unmount_under(root)?;
    if let Ok(kube_proxy) = fs::read_to_string(root.join(KUBE_PROXY_FILE)) {
        let _ = Command::new(kube_proxy.trim())
            .args(["--cleanup", "--v=0"])
            .output();
    }
    host::remove_chains(&["KUBE-", "CNI-"]);
    host::remove_cni_leftovers(CNI_NETWORK);
    host::remove_bridge();
    host::remove_guard();
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    Ok(())
}

/// CoreDNS as the cluster's DNS: answers for `cluster.local` (and reverse lookups of
/// cluster addresses) from the API server, and forwards nothing anywhere.
fn coredns_manifest() -> serde_json::Value {
    let corefile = "\
.:53 {
    errors
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
    loadbalance
}
";
    let labels = json!({"k8s-app": "kube-dns"});
    json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": "coredns", "namespace": "kube-system"}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": "system:coredns"},
             "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                 "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                 "verbs": ["list", "watch"]},
             ]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "system:coredns"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": "system:coredns"},
             "subjects": [{"kind": "ServiceAccount", "name": "coredns",
                           "namespace": "kube-system"}]},
            {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "coredns", "namespace": "kube-system"},
             "data": {"Corefile": corefile}},
            {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
             "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "priorityClassName": "system-cluster-critical",
                        "containers": [{
                            "name": "coredns",
                            "image": COREDNS_IMAGE,
                            "imagePullPolicy": "Never",
                            "args": ["-conf", "/etc/coredns/Corefile"],
                            "ports": [
                                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": "/ready", "port": 8181},
                                "periodSeconds": 2,
                            },
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                        }],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
             }},
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
             "spec": {
                "selector": labels,
                "clusterIP": DNS_IP,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
             }},
        ],
    })
}
