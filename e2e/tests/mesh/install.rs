//! Weft onto the node: the image archives `make images` wrote, imported into the node's
//! containerd (pinned), and the chart installed and removed with Helm.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use weft_e2e::node::Node;

use crate::{Ctx, kube::eventually};

/// The chart's namespace.
pub const NAMESPACE: &str = "weft-system";
/// The release name.
pub const RELEASE: &str = "weft";
/// The operator pods' selector (the chart's `weft.selector`).
pub const OPERATOR_SELECTOR: &str = "app.kubernetes.io/name=weft,app.kubernetes.io/component=operator";

/// `ghcr.io/weft-mesh/<name>:<workspace version>`.
pub fn image_ref(name: &str) -> String {
    format!("ghcr.io/weft-mesh/{name}:{}", env!("CARGO_PKG_VERSION"))
}

/// The archives `images/build` writes.
pub struct ImageArchives {
    /// weft-proxy.
    pub proxy: PathBuf,
    /// weft-operator.
    pub operator: PathBuf,
    /// weft-demo-app (until the demo lands: absent, and the scenarios using it fail).
    pub demo_app: Option<PathBuf>,
}

impl ImageArchives {
    /// The archives under `$WEFT_IMAGES_DIR/out` (default `~/.cache/weft/images/out`).
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
            demo_app: Some(dir.join("weft-demo-app.tar")).filter(|p| p.exists()),
        };
        for a in [&archives.proxy, &archives.operator] {
            if !a.exists() {
                bail!("{} is missing: run `make images` first", a.display());
            }
        }
        Ok(archives)
    }
}

/// Imports Weft's and the demo's images into the node's containerd, pinned.
pub fn import_images(node: &Node, archives: &ImageArchives) -> anyhow::Result<()> {
    node.import(&archives.proxy, &image_ref("weft-proxy"))?;
    node.import(&archives.operator, &image_ref("weft-operator"))?;
    if let Some(demo) = &archives.demo_app {
        node.import(demo, &image_ref("weft-demo-app"))?;
    }
    Ok(())
}

/// `helm install` of charts/weft with the images imported (pull policy Never) and one
/// operator replica (the node has two cores); returns once the operator is available and
/// the webhook has its caBundle.
pub fn install_weft(ctx: &Ctx) -> anyhow::Result<()> {
    let chart = weft_e2e::repo_root().join("charts/weft");
    let out = ctx
        .helm
        .command(&ctx.helm_home, ctx.node.testbed().kubeconfig().as_path())
        .args(["install", RELEASE])
        .arg(&chart)
        .args([
            "-n",
            NAMESPACE,
            "--create-namespace",
            "--set",
            "operator.image.pullPolicy=Never",
            "--set",
            "proxy.image.pullPolicy=Never",
            "--set",
            "operator.replicas=1",
            "--wait",
            "--timeout",
            "180s",
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "helm install failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            ctx.kube.dump(NAMESPACE)
        );
    }
    eventually(Duration::from_secs(60), || {
        let hook = ctx
            .kube
            .json(&["get", "mutatingwebhookconfiguration", "weft-injector"])?;
        let has_ca = hook["webhooks"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|w| w["clientConfig"]["caBundle"].as_str().is_some_and(|c| !c.is_empty()));
        if has_ca {
            Ok(())
        } else {
            bail!("the webhook has no caBundle yet")
        }
    })
}

/// `helm uninstall` of the release.
pub fn uninstall_weft(ctx: &Ctx) -> anyhow::Result<()> {
    let out = ctx
        .helm
        .command(&ctx.helm_home, ctx.node.testbed().kubeconfig().as_path())
        .args(["uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "120s"])
        .output()?;
    if !out.status.success() {
        bail!(
            "helm uninstall failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
