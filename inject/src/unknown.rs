//! `weft.dev/` annotations that Weft does not read: most likely typos
//! (`weft.dev/opaque-port`), which would otherwise do nothing, silently. They are warned
//! about, not refused: a pod may carry an annotation of another Weft version.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::keys;

/// A `weft.dev/` annotation that Weft does not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownAnnotation {
    /// The annotation's key.
    pub key: String,
    /// The known key within a few edits of it, which it most likely meant.
    pub likely: Option<&'static str>,
}

impl std::fmt::Display for UnknownAnnotation {
    /// The warning: what the annotation does (nothing) and what it likely meant.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = &self.key;
        match self.likely {
            Some(known) => write!(
                f,
                "annotation {key} is not one Weft reads, so it does nothing; did you mean {known}?"
            ),
            None => write!(
                f,
                "annotation {key} is not one Weft reads, so it does nothing (docs/injection.md lists them)"
            ),
        }
    }
}

/// The `weft.dev/` annotations in a pod's `annotations` that Weft does not read, in key
/// order.
pub fn unknown_annotations(
    annotations: Option<&BTreeMap<String, String>>,
) -> Vec<UnknownAnnotation> {
    unknown_among(annotations, &keys::POD_ANNOTATIONS)
}

/// The `weft.dev/` annotations in `annotations` that are not among `known` (those Weft
/// reads on this kind of object), in key order, each with the known key it likely meant.
pub fn unknown_among(
    annotations: Option<&BTreeMap<String, String>>,
    known: &[&'static str],
) -> Vec<UnknownAnnotation> {
    annotations
        .into_iter()
        .flat_map(BTreeMap::keys)
        .filter(|key| key.starts_with("weft.dev/") && !known.contains(&key.as_str()))
        .map(|key| UnknownAnnotation {
            key: key.clone(),
            likely: closest(key, known),
        })
        .collect()
}

/// The warnings a pod's metadata earns: one per `weft.dev/` annotation Weft does not read
/// ([`unknown_annotations`]), and one for a `weft.dev/inject` that says neither `enabled`
/// nor `disabled` ([`inject_value_problem`]).
pub fn pod_metadata_warnings(meta: &ObjectMeta) -> Vec<String> {
    unknown_annotations(meta.annotations.as_ref())
        .iter()
        .map(ToString::to_string)
        .chain(inject_value_problem(meta))
        .collect()
}

/// Why the pod's `weft.dev/inject` (its annotation, else its label: the one the opt-in
/// rule reads) does nothing, if it says neither `enabled` nor `disabled`: Istio's
/// `"true"` and `"false"` opt nothing in, and nothing out.
pub fn inject_value_problem(meta: &ObjectMeta) -> Option<String> {
    fn get(map: &Option<BTreeMap<String, String>>) -> Option<&str> {
        map.as_ref()
            .and_then(|m| m.get(keys::INJECT))
            .map(String::as_str)
    }
    let (kind, value) = match (get(&meta.annotations), get(&meta.labels)) {
        (Some(v), _) => ("annotation", v),
        (None, Some(v)) => ("label", v),
        (None, None) => return None,
    };
    (value != keys::ENABLED && value != keys::DISABLED).then(|| {
        format!(
            "{kind} {}: {value:?} is neither {} nor {}, so it opts the pod neither in nor out",
            keys::INJECT,
            keys::ENABLED,
            keys::DISABLED
        )
    })
}

/// The known annotation within a few edits of `key`, if any: a typo's intended key.
fn closest(key: &str, known: &[&'static str]) -> Option<&'static str> {
    known
        .iter()
        .map(|known| (edits(key, known), *known))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, known)| known)
}

/// Levenshtein distance between `a` and `b`, by bytes (keys are ASCII). Annotation keys
/// are at most 316 bytes (Kubernetes' limit), so the one row stays small.
fn edits(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warnings(keys: &[&str]) -> Vec<String> {
        let map = keys
            .iter()
            .map(|k| (k.to_string(), "x".to_owned()))
            .collect();
        pod_metadata_warnings(&ObjectMeta {
            annotations: Some(map),
            ..ObjectMeta::default()
        })
    }

    #[test]
    fn known_and_foreign_annotations_get_no_warning() {
        let mut all: Vec<&str> = keys::POD_ANNOTATIONS
            .into_iter()
            .filter(|k| *k != keys::INJECT)
            .collect();
        all.extend([
            "kubectl.kubernetes.io/default-container",
            "example.com/weft.dev",
        ]);
        assert_eq!(warnings(&all), Vec::<String>::new());
        assert_eq!(
            pod_metadata_warnings(&ObjectMeta::default()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_typo_is_named_with_the_key_it_likely_meant() {
        assert_eq!(
            warnings(&[
                "weft.dev/opaque-port",
                "weft.dev/app-idle-timout",
                "weft.dev/something-else"
            ]),
            [
                "annotation weft.dev/app-idle-timout is not one Weft reads, so it does nothing; did you mean weft.dev/app-idle-timeout?",
                "annotation weft.dev/opaque-port is not one Weft reads, so it does nothing; did you mean weft.dev/opaque-ports?",
                "annotation weft.dev/something-else is not one Weft reads, so it does nothing (docs/injection.md lists them)",
            ]
        );
    }

    /// A `weft.dev/` key added to `keys.rs` but not to [`keys::POD_ANNOTATIONS`] would be
    /// warned about on every pod that uses it.
    #[test]
    fn every_weft_annotation_in_keys_is_known() {
        let source = include_str!("keys.rs");
        for line in source.lines() {
            let Some((_, value)) = line.split_once("&str = \"weft.dev/") else {
                continue;
            };
            let key = format!("weft.dev/{}", value.trim_end_matches("\";"));
            if key == keys::MESHED_LABEL {
                continue; // a label
            }
            assert!(keys::POD_ANNOTATIONS.contains(&key.as_str()), "{key}");
        }
    }

    #[test]
    fn an_inject_value_neither_enabled_nor_disabled_is_named() {
        let meta = |annotation: Option<&str>, label: Option<&str>| ObjectMeta {
            annotations: annotation
                .map(|v| BTreeMap::from([(keys::INJECT.to_owned(), v.to_owned())])),
            labels: label.map(|v| BTreeMap::from([(keys::INJECT.to_owned(), v.to_owned())])),
            ..ObjectMeta::default()
        };
        for fine in [
            meta(None, None),
            meta(Some("enabled"), None),
            meta(Some("disabled"), Some("true")),
            meta(None, Some("disabled")),
        ] {
            assert_eq!(inject_value_problem(&fine), None, "{fine:?}");
        }
        assert_eq!(
            inject_value_problem(&meta(Some("false"), None)).as_deref(),
            Some(
                "annotation weft.dev/inject: \"false\" is neither enabled nor disabled, so it opts the pod neither in nor out"
            )
        );
        assert_eq!(
            pod_metadata_warnings(&meta(None, Some("true"))),
            [
                "label weft.dev/inject: \"true\" is neither enabled nor disabled, so it opts the pod neither in nor out"
            ]
        );
    }

    #[test]
    fn namespaces_and_services_are_judged_by_their_own_keys() {
        let map = |keys: &[&str]| -> BTreeMap<String, String> {
            keys.iter()
                .map(|k| (k.to_string(), "x".to_owned()))
                .collect()
        };
        let on_service = unknown_among(
            Some(&map(&[
                "weft.dev/opaque-ports",
                "weft.dev/opaque-port",
                "weft.dev/inject",
            ])),
            &keys::SERVICE_ANNOTATIONS,
        );
        assert_eq!(
            on_service,
            [
                UnknownAnnotation {
                    key: "weft.dev/inject".to_owned(),
                    likely: None
                },
                UnknownAnnotation {
                    key: "weft.dev/opaque-port".to_owned(),
                    likely: Some(keys::OPAQUE_PORTS)
                },
            ]
        );
        // A pod's key on a Namespace does nothing there either.
        let on_namespace = unknown_among(
            Some(&map(&["weft.dev/visible-namespace", "weft.dev/mesh-http1"])),
            &keys::NAMESPACE_ANNOTATIONS,
        );
        assert_eq!(
            on_namespace
                .iter()
                .map(|u| (u.key.as_str(), u.likely))
                .collect::<Vec<_>>(),
            [
                ("weft.dev/mesh-http1", None),
                ("weft.dev/visible-namespace", Some(keys::VISIBLE_NAMESPACES)),
            ]
        );
    }

    #[test]
    fn edits_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edits("", ""), 0);
        assert_eq!(edits("abc", "abc"), 0);
        assert_eq!(edits("abc", "ab"), 1);
        assert_eq!(edits("ab", "abc"), 1);
        assert_eq!(edits("abc", "axc"), 1);
        assert_eq!(edits("kitten", "sitting"), 3);
    }
}
