//! `weft-operator`: the control plane. Its controllers are tracked in their own issues.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("weft-operator: not built yet (see the operator issues)")
}
