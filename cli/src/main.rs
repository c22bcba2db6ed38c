//! `kubectl-weft`: the kubectl plugin (in progress).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("kubectl weft: not built yet")
}
