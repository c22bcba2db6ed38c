//! `weft-proxy`: the sidecar. The data-plane core is tracked in its own issue.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("weft-proxy: not built yet (see the proxy-core issue)")
}
