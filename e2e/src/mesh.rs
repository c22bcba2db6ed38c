//! Weft on a cluster: the images `make images` built, imported into the test bed's node,
//! and the chart installed with Helm — what the demo and the node's end-to-end tests share.
//!
//! ```text
//!  make images ─▶ ~/.cache/weft/images/out/*.tar ─▶ import_images(node) ─▶ containerd (k8s.io, pinned)
//!  install_weft ─▶ helm upgrade --install weft charts/weft -n weft-system --wait
//!              ─▶ operator Deployment available ─▶ webhook has its caBundle
//! ```

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{helm::Helm, node::Node};

/// The namespace the chart is installed into.
pub const NAMESPACE: &str = "weft-system";
/// The Helm release's name.
pub const RELEASE: &str = "weft";
/// Where the images come from (the chart's default repositories).
const REPOSITORY: &str = "ghcr.io/weft-mesh";
/// How long the chart's install may take, operator pods ready included.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

/// The reference of one of Weft's images at this workspace's version, e.g.
/// `image_ref("weft-proxy")` is `ghcr.io/weft-mesh/weft-proxy:0.1.0`.
pub fn image_ref(name: &str) -> String {
    format!("{REPOSITORY}/{name}:{}", env!("CARGO_PKG_VERSION"))
}

/// The image archives `make images` writes (`images/build`; see docs/images.md).
#[derive(Clone, Debug)]
pub struct ImageArchives {
    /// `weft-proxy.tar`: the sidecar and its init container.
    pub proxy: PathBuf,
    /// `weft-operator.tar`: the control plane.
    pub operator: PathBuf,
    /// `weft-demo-app.tar`: the demo's and the node tests' application.
    pub demo_app: PathBuf,
}

impl ImageArchives {
    /// Finds the archives in `$WEFT_IMAGES_DIR/out` (default `~/.cache/weft/images/out`),
    /// or says to build them.
    pub fn find() -> anyhow::Result<Self> {
        let dir = std::env::var_os("WEFT_IMAGES_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/weft/images"))
            })
            .context("neither WEFT_IMAGES_DIR nor HOME is set")?
            .join("out");
        let archives = ImageArchives {
            proxy: dir.join("weft-proxy.tar"),
            operator: dir.join("weft-operator.tar"),
            demo_app: dir.join("weft-demo-app.tar"),
        };
        for archive in archives.all() {
            if !archive.1.is_file() {
                bail!(
                    "{} is missing: build the images first with `make images` (docs/images.md)",
                    archive.1.display()
                );
            }
        }
        Ok(archives)
    }

    /// Each archive with the image reference it holds.
    fn all(&self) -> [(String, &Path); 3] {
        [
            (image_ref("weft-proxy"), &self.proxy),
            (image_ref("weft-operator"), &self.operator),
            (image_ref("weft-demo-app"), &self.demo_app),
        ]
    }
}

/// Imports Weft's images into the node's runtime, pinned against image garbage collection.
pub fn import_images(node: &Node, archives: &ImageArchives) -> anyhow::Result<()> {
    for (reference, archive) in archives.all() {
        let started = Instant::now();
        node.import(archive, &reference)?;
        tracing::info!(image = %reference, elapsed = ?started.elapsed(), "image imported");
    }
    Ok(())
}

/// A Service `name` in `ns`, port 80 (named `http`) to port 8080 of the pods matching
/// `selector` (flow-style YAML without braces: `app: web, version: web-v1`), ending in
/// `---` so manifests can follow.
pub fn service_manifest(ns: &str, name: &str, selector: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
spec:
  selector: {{{selector}}}
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
"#
    )
}

/// A cluster reached through a kubeconfig and a `kubectl` binary.
#[derive(Clone, Debug)]
pub struct Cluster {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

impl Cluster {
    /// A cluster of `kubeconfig`, driven with the `kubectl` at that path.
    pub fn new(kubeconfig: PathBuf, kubectl: PathBuf) -> Self {
        Cluster {
            kubeconfig,
            kubectl,
        }
    }

    /// The test bed's control plane the node belongs to, with the test bed's `kubectl`.
    pub fn of_node(node: &Node) -> Self {
        let bed = node.testbed();
        Cluster::new(bed.kubeconfig(), bed.binaries().component("kubectl"))
    }

    /// The kubeconfig file.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A `kubectl` command for this cluster.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// Runs `kubectl ARGS`; its stdout, or an error carrying its stderr.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        output(self.kubectl().args(args))
    }

    /// `kubectl apply -f -` with `yaml` on stdin.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let mut child = self
            .kubectl()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl's stdin")?
            .write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl apply: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Waits until `what` (`deploy/web-v1`, `statefulset/db`) has rolled out.
    pub fn wait_rollout(&self, ns: &str, what: &str, timeout: Duration) -> anyhow::Result<()> {
        self.run(&[
            "-n",
            ns,
            "rollout",
            "status",
            what,
            &format!("--timeout={}s", timeout.as_secs().max(1)),
        ])
        .with_context(|| format!("{ns}/{what} did not roll out within {timeout:?}"))?;
        Ok(())
    }
}

/// Runs `cmd`; its stdout, or an error with both streams.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs (or upgrades) Weft from `charts/weft` with `helm upgrade --install`, plus the
/// `--set` values in `set`, and returns once the operator is available and the webhook
/// carries its `caBundle` (so pods created from then on are injected).
pub fn install_weft(
    cluster: &Cluster,
    helm: &Helm,
    helm_home: &Path,
    set: &[&str],
) -> anyhow::Result<()> {
    let chart = crate::repo_root().join("charts/weft");
    let mut cmd = helm.command(helm_home, cluster.kubeconfig());
    cmd.args(["upgrade", "--install", RELEASE])
        .arg(&chart)
        .args(["--namespace", NAMESPACE, "--create-namespace", "--wait"])
        .arg(format!("--timeout={}s", INSTALL_TIMEOUT.as_secs()));
    for value in set {
        cmd.args(["--set", value]);
    }
    output(&mut cmd).context("helm install")?;
    cluster.wait_rollout(NAMESPACE, "deploy/weft-operator", INSTALL_TIMEOUT)?;
    let webhook = format!("{RELEASE}-injector");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ca = cluster.run(&[
            "get",
            "mutatingwebhookconfiguration",
            &webhook,
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ])?;
        if !ca.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the webhook {webhook} has no caBundle a minute after the operator became available: see `kubectl -n {NAMESPACE} logs deploy/weft-operator`"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `helm uninstall` of the release; waits until Helm has removed its objects.
pub fn uninstall_weft(cluster: &Cluster, helm: &Helm, helm_home: &Path) -> anyhow::Result<()> {
    output(helm.command(helm_home, cluster.kubeconfig()).args([
        "uninstall",
        RELEASE,
        "--namespace",
        NAMESPACE,
        "--wait",
    ]))
    .context("helm uninstall")?;
    Ok(())
}
