//! Weft onto the node with the shared installer (`weft_e2e::mesh`): one operator replica
//! (the node has two cores), the images imported, never pulled.

use weft_e2e::mesh::{self, Cluster};

use crate::Ctx;

pub use weft_e2e::mesh::{NAMESPACE, RELEASE, image_ref};

/// The operator pods' selector (the chart's `weft.selector`).
pub const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/name=weft,app.kubernetes.io/component=operator";

/// The operator's Deployment, as kubectl names it.
pub fn operator_deployment() -> String {
    format!("deploy/{RELEASE}-operator")
}

/// `helm install` of charts/weft; returns once the operator is available and the webhook
/// has its caBundle.
pub fn install_weft(ctx: &Ctx) -> anyhow::Result<()> {
    upgrade_weft(ctx, &[])
}

/// `helm upgrade` of the release to the node's values plus `set` (later `--set`s win, and
/// values not given return to the chart's defaults); returns as [`install_weft`] does.
pub fn upgrade_weft(ctx: &Ctx, set: &[&str]) -> anyhow::Result<()> {
    let mut values = vec![
        "operator.image.pullPolicy=Never",
        "proxy.image.pullPolicy=Never",
        "operator.replicas=1",
    ];
    values.extend_from_slice(set);
    mesh::install_weft(&cluster(ctx), &ctx.helm, &ctx.helm_home, &values)
}

/// `helm uninstall` of the release.
pub fn uninstall_weft(ctx: &Ctx) -> anyhow::Result<()> {
    mesh::uninstall_weft(&cluster(ctx), &ctx.helm, &ctx.helm_home)
}

fn cluster(ctx: &Ctx) -> Cluster {
    Cluster::of_node(ctx.node)
}
