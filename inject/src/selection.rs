//! Which pod creations the API server sends to the webhook: the label selectors of the
//! webhook registration's entries, in one place. The operator's registration is built from
//! [`entries`]; the unmeshed-pod audit asks [`selected`] whether the webhook was ever asked
//! about a pod, so that it never flags a pod the webhook is not even called for.
//!
//! Three entries, disjoint by construction:
//!
//! | entry | namespaces | pods |
//! | --- | --- | --- |
//! | `namespace.inject.weft.dev` | labelled `weft.dev/inject=enabled` | not labelled `weft.dev/inject=disabled` |
//! | `pod-label.inject.weft.dev` | not labelled enabled, not excluded | labelled `weft.dev/inject=enabled` |
//! | `pod-annotation.inject.weft.dev` (optional) | not labelled, not excluded | no `weft.dev/inject` label |
//!
//! With a namespace scope (the operator's `--webhook-namespace-scope`), every entry also
//! requires the namespace to carry that label, so the audit never flags a pod outside it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use crate::keys;

/// The name of the optional entry that lets pods opt in by annotation.
pub const ANNOTATION_ENTRY: &str = "pod-annotation.inject.weft.dev";

/// One entry of the registration, without its client config or policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The webhook entry's name.
    pub name: String,
    /// Its namespace selector, the namespace scope included.
    pub namespaces: Vec<LabelSelectorRequirement>,
    /// Its object selector, on the pod's labels.
    pub pods: LabelSelector,
}

/// The registration's entries: with `annotation_opt_in`, the third one too; namespaces
/// in `excluded` are never selected, and with `scope` (a label key and value) only
/// namespaces labelled with it are.
pub fn entries(
    annotation_opt_in: bool,
    excluded: &[String],
    scope: Option<(&str, &str)>,
) -> Vec<Entry> {
    let excluded: Vec<&str> = excluded.iter().map(String::as_str).collect();
    let not_excluded = req("kubernetes.io/metadata.name", "NotIn", &excluded);
    let mut out = vec![
        Entry {
            name: "namespace.inject.weft.dev".to_owned(),
            namespaces: vec![
                req(keys::INJECT, "In", &[keys::ENABLED]),
                not_excluded.clone(),
            ],
            pods: LabelSelector {
                match_expressions: Some(vec![req(keys::INJECT, "NotIn", &[keys::DISABLED])]),
                ..Default::default()
            },
        },
        Entry {
            name: "pod-label.inject.weft.dev".to_owned(),
            namespaces: vec![
                req(keys::INJECT, "NotIn", &[keys::ENABLED]),
                not_excluded.clone(),
            ],
            pods: LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    keys::INJECT.to_owned(),
                    keys::ENABLED.to_owned(),
                )])),
                ..Default::default()
            },
        },
    ];
    if annotation_opt_in {
        out.push(Entry {
            name: ANNOTATION_ENTRY.to_owned(),
            namespaces: vec![req(keys::INJECT, "DoesNotExist", &[]), not_excluded],
            pods: LabelSelector {
                match_expressions: Some(vec![req(keys::INJECT, "DoesNotExist", &[])]),
                ..Default::default()
            },
        });
    }
    if let Some((key, value)) = scope {
        for e in &mut out {
            e.namespaces.push(req(key, "In", &[value]));
        }
    }
    out
}

/// Whether the API server sends the creation of a pod labelled `pod_labels`, in namespace
/// `namespace` labelled `namespace_labels`, to the webhook registered with `entries`. The
/// API server labels every namespace `kubernetes.io/metadata.name=<name>`; that label is
/// implied here when the given labels lack it.
pub fn selected(
    entries: &[Entry],
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
    pod_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let mut ns = namespace_labels.cloned().unwrap_or_default();
    ns.entry("kubernetes.io/metadata.name".to_owned())
        .or_insert_with(|| namespace.to_owned());
    let empty = BTreeMap::new();
    let pod = pod_labels.unwrap_or(&empty);
    entries.iter().any(|e| {
        e.namespaces.iter().all(|r| requirement_matches(r, &ns)) && selector_matches(&e.pods, pod)
    })
}

fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.to_owned(),
        operator: op.to_owned(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
    }
}

fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && selector
            .match_expressions
            .iter()
            .flatten()
            .all(|r| requirement_matches(r, labels))
}

/// A label selector requirement as the API server evaluates it (`NotIn` also matches an
/// object without the key); an unknown operator matches nothing.
fn requirement_matches(r: &LabelSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    let listed = |v: &String| r.values.iter().flatten().any(|x| x == v);
    match r.operator.as_str() {
        "In" => value.is_some_and(listed),
        "NotIn" => !value.is_some_and(listed),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn the_entries_select_what_the_module_table_says() {
        let all = entries(true, &["kube-system".to_owned()], None);
        let labels_only = entries(false, &["kube-system".to_owned()], None);
        let enabled = labels(&[(keys::INJECT, keys::ENABLED)]);
        let disabled = labels(&[(keys::INJECT, keys::DISABLED)]);
        let none = labels(&[]);
        let other = labels(&[("app", "web")]);
        // (namespace, its labels, pod labels, selected with annotations, with labels only)
        let cases = [
            ("shop", &enabled, &none, true, true),
            ("shop", &enabled, &disabled, false, false),
            ("shop", &disabled, &enabled, true, true),
            // Annotations cannot be selected on: a namespace with any inject label is not
            // sent pods that only carry the annotation.
            ("shop", &disabled, &none, false, false),
            ("shop", &none, &none, true, false),
            ("shop", &none, &other, true, false),
            ("shop", &none, &enabled, true, true),
            (
                "shop",
                &none,
                &labels(&[(keys::INJECT, "yes")]),
                false,
                false,
            ),
            ("kube-system", &enabled, &none, false, false),
            ("kube-system", &none, &enabled, false, false),
        ];
        for (ns, ns_labels, pod, want_all, want_labels) in cases {
            let got = (
                selected(&all, ns, ns_labels.as_ref(), pod.as_ref()),
                selected(&labels_only, ns, ns_labels.as_ref(), pod.as_ref()),
            );
            assert_eq!(got, (want_all, want_labels), "{ns} {ns_labels:?} {pod:?}");
        }
    }

    #[test]
    fn with_a_scope_only_namespaces_carrying_its_label_are_selected() {
        let scoped = entries(true, &[], Some(("team", "a")));
        let enabled = labels(&[(keys::INJECT, keys::ENABLED)]);
        let enabled_in_a = labels(&[(keys::INJECT, keys::ENABLED), ("team", "a")]);
        let in_b = labels(&[("team", "b")]);
        let in_a = labels(&[("team", "a")]);
        let pod_enabled = labels(&[(keys::INJECT, keys::ENABLED)]);
        let none = labels(&[]);
        assert!(selected(
            &scoped,
            "shop",
            enabled_in_a.as_ref(),
            none.as_ref()
        ));
        assert!(selected(
            &scoped,
            "shop",
            in_a.as_ref(),
            pod_enabled.as_ref()
        ));
        assert!(selected(&scoped, "shop", in_a.as_ref(), none.as_ref()));
        assert!(!selected(&scoped, "shop", enabled.as_ref(), none.as_ref()));
        assert!(!selected(
            &scoped,
            "shop",
            in_b.as_ref(),
            pod_enabled.as_ref()
        ));
        assert!(!selected(&scoped, "shop", none.as_ref(), none.as_ref()));
    }
}
