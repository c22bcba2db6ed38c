//! Writes the CRD manifests under `crds/` and the Helm chart's copy in `charts/weft/crds/`
//! from the Rust types. `--check` exits non-zero when the committed files differ.

use std::{fs, path::PathBuf};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let check = std::env::args().any(|a| a == "--check");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    let chart = dir.join("../charts/weft/crds");
    for (file, crd) in weft_crds::all() {
        let yaml = weft_crds::to_yaml(&crd)?;
        for path in [dir.join(file), chart.join(file)] {
            let current = fs::read_to_string(&path).unwrap_or_default();
            if current == yaml {
                continue;
            }
            if check {
                stale.push(path.display().to_string());
            } else {
                fs::write(&path, &yaml).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    if !stale.is_empty() {
        bail!(
            "stale CRD manifests: {}; run `cargo run -p weft-crds --bin weft-crdgen`",
            stale.join(", ")
        );
    }
    Ok(())
}
