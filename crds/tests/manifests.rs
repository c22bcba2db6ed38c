//! The committed CRD manifests are exactly what the Rust types generate.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{fs, path::Path};

#[test]
fn committed_manifests_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, crd) in weft_crds::all() {
        let want = weft_crds::to_yaml(&crd).unwrap();
        let have = fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(
            have == want,
            "crds/{file} is stale: run `cargo run -p weft-crds --bin weft-crdgen` and commit the result"
        );
    }
}

#[test]
fn the_chart_carries_the_same_manifests() {
    // Helm installs the chart's copy; `kubectl apply -f crds/` the top-level one. Users of
    // either must get the same schema.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chart = dir.join("../charts/weft/crds");
    let mut in_chart: Vec<String> = fs::read_dir(&chart)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    in_chart.sort();
    let mut ours: Vec<String> = weft_crds::all()
        .into_iter()
        .map(|(f, _)| f.to_owned())
        .collect();
    ours.sort();
    assert_eq!(
        in_chart, ours,
        "charts/weft/crds/ holds other files than crds/"
    );
    for file in &ours {
        let top = fs::read(dir.join(file)).unwrap();
        let copy = fs::read(chart.join(file)).unwrap();
        assert!(
            top == copy,
            "charts/weft/crds/{file} differs from crds/{file}: run `cargo run -p weft-crds --bin weft-crdgen`"
        );
    }
}

#[test]
fn every_schema_field_is_documented() {
    // `kubectl explain` prints these descriptions; an undocumented field is a user stuck.
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let here = format!("{path}.{name}");
                let skip = path.ends_with(".metadata")
                    || here.ends_with(".metadata")
                    || here.ends_with(".apiVersion")
                    || here.ends_with(".kind");
                if sub.get("description").is_none()
                    && !skip
                    && !path.contains("selector")
                    && !path.contains("conditions")
                {
                    missing.push(here.clone());
                }
                walk(&here, sub, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for (_, crd) in weft_crds::all() {
        for version in &crd.spec.versions {
            let schema = serde_json::to_value(&version.schema).unwrap();
            walk(
                &crd.spec.names.kind,
                &schema["openAPIV3Schema"],
                &mut missing,
            );
        }
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
}

#[test]
fn the_types_round_trip_the_examples() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        let kind = serde_yaml::from_str::<serde_yaml::Value>(&text).unwrap()["kind"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let ok = match kind.as_str() {
            "Route" => serde_yaml::from_str::<weft_crds::Route>(&text).map(|_| ()),
            "Policy" => serde_yaml::from_str::<weft_crds::Policy>(&text).map(|_| ()),
            "Breaker" => serde_yaml::from_str::<weft_crds::Breaker>(&text).map(|_| ()),
            other => panic!("{}: unexpected kind {other}", path.display()),
        };
        ok.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(seen >= 6, "only {seen} examples");
}
