//! `weft-operator`: the control plane binary.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("weft-operator: not built yet (see the operator issues)")
}
