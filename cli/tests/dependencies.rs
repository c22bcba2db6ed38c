//! `kubectl weft` links only what a kubectl plugin needs: injection comes from the small
//! `weft-inject` crate, never from the operator with its servers and certificate code.
//! It does link the proxy's library, on purpose: `explain` runs the proxy's own config
//! validation and route matching on a proxy's active config, so that what it explains is
//! what the proxy does (a second implementation could drift). The proxy's servers are
//! linked but never started by the plugin.

use std::process::Command;

#[test]
fn the_cli_does_not_link_the_operator_or_any_server() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            env!("CARGO_PKG_NAME"),
            "-e",
            "normal,features",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The tree is real (the check below cannot pass on an empty answer).
    assert!(
        tree.lines().any(|l| l.starts_with("weft-inject v")),
        "{tree}"
    );
    assert!(
        tree.lines().any(|l| l.starts_with("kube-client v")),
        "{tree}"
    );
    let forbidden: Vec<&str> = tree
        .lines()
        .filter(|l| l.starts_with("weft-operator ") || l.starts_with("weft-e2e "))
        .collect();
    assert!(
        forbidden.is_empty(),
        "kubectl weft links {forbidden:?}; injection belongs in weft-inject, wire types in weft-api, the operator in no plugin"
    );
}
