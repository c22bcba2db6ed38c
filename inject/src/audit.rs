//! Finding pods that opted in but run without the proxy: created while the webhook was
//! unreachable (with `failurePolicy: Ignore`), or before their namespace opted in. A pod
//! counts only if the webhook would inject it now: the registration selects it (the same
//! selectors, [`selection`]) and the webhook's own `decide` says inject, so the audit
//! never flags a host-network pod, or a pod the API server never sends to the webhook.
//! Works on metadata alone, so it can scan a cluster cheaply.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::PodSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use super::{InjectConfig, OptIn, selection};

/// A pod that should carry the proxy and does not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unmeshed {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// How it opted in: `pod` or `namespace`.
    pub opted_in_by: &'static str,
}

/// A pod carrying `weft.dev/` annotations that Weft does not read (misspelt, most likely).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Misannotated {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// Its annotations Weft does not read.
    pub unknown: Vec<super::UnknownAnnotation>,
    /// Why its `weft.dev/inject` does nothing, if it says neither `enabled` nor `disabled`.
    pub inject_value: Option<String>,
}

/// The pods (by metadata) with `weft.dev/` annotations Weft does not read. The webhook
/// warns whoever creates such a pod, but for a pod a controller creates (a Deployment's)
/// that warning reaches only the controller.
pub fn misannotated<'a>(pods: impl IntoIterator<Item = &'a ObjectMeta>) -> Vec<Misannotated> {
    pods.into_iter()
        .filter_map(|meta| {
            let unknown = super::unknown_annotations(meta.annotations.as_ref());
            let inject_value = super::inject_value_problem(meta);
            (!unknown.is_empty() || inject_value.is_some()).then(|| Misannotated {
                namespace: meta.namespace.clone().unwrap_or_default(),
                name: meta.name.clone().unwrap_or_default(),
                unknown,
                inject_value,
            })
        })
        .collect()
}

/// What one [`scan`] of the cluster's pods found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Pods that opted in but run without the proxy ([`unmeshed`]).
    pub unmeshed: Vec<Unmeshed>,
    /// Pods with `weft.dev/` annotations Weft does not read ([`misannotated`]).
    pub misannotated: Vec<Misannotated>,
}

/// Pods (by metadata) that the webhook would have injected and that have no proxy: the
/// registration selects them ([`selection::selected`] over `entries`) and the webhook's own
/// [`decide`](super::decide) says inject. `namespace_labels` maps each namespace to its
/// labels. The pods must be ones that do not use the host network (the webhook never
/// injects those; [`scan`] lists only such pods): metadata does not say.
pub fn unmeshed<'a>(
    pods: impl IntoIterator<Item = &'a ObjectMeta>,
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
    entries: &[selection::Entry],
    cfg: &InjectConfig,
) -> Vec<Unmeshed> {
    let mut out = Vec::new();
    // Not host-network, no containers known: decide() then judges by metadata alone
    // (exclusion, the version annotation, opt-in), as the webhook does.
    let spec = PodSpec::default();
    for meta in pods {
        let namespace = meta.namespace.clone().unwrap_or_default();
        let labels = namespace_labels.get(&namespace);
        if !selection::selected(entries, &namespace, labels, meta.labels.as_ref()) {
            continue;
        }
        let ns_in = super::namespace_opted_in(labels);
        if super::decide(meta, &spec, &namespace, ns_in, cfg).is_err() {
            continue;
        }
        let opted_in_by = match super::opt_in(meta, ns_in) {
            OptIn::Pod => "pod",
            OptIn::Namespace => "namespace",
            OptIn::OptedOut | OptIn::No => continue,
        };
        out.push(Unmeshed {
            namespace,
            name: meta.name.clone().unwrap_or_default(),
            opted_in_by,
        });
    }
    out
}

/// Lists the pods that do not use the host network (metadata only, field selector
/// `spec.hostNetwork=false`, in pages of 500 so that one answer stays small on a large
/// cluster) and the namespaces of the cluster, and returns those that the webhook, as
/// registered with `entries` ([`selection::entries`], or a live registration's), would
/// have injected but run without the proxy, and those of them (injected or not) with
/// annotations Weft does not read. Used by the operator's audit loop and by
/// `kubectl weft check`.
#[cfg(feature = "cluster")]
pub async fn scan(
    client: &kube::Client,
    cfg: &InjectConfig,
    entries: &[selection::Entry],
) -> Result<Scan, kube::Error> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kube::{
        Api,
        api::{ListParams, PartialObjectMeta},
    };

    let namespaces = Api::<PartialObjectMeta<Namespace>>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let labels: BTreeMap<String, BTreeMap<String, String>> = namespaces
        .items
        .into_iter()
        .filter_map(|n| Some((n.metadata.name?, n.metadata.labels.unwrap_or_default())))
        .collect();
    let pods = Api::<PartialObjectMeta<Pod>>::all(client.clone());
    let mut metas = Vec::new();
    let mut params = ListParams::default()
        .fields("spec.hostNetwork=false")
        .limit(500);
    loop {
        let page = pods.list(&params).await?;
        metas.extend(page.items.into_iter().map(|p| p.metadata));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    Ok(Scan {
        unmeshed: unmeshed(&metas, &labels, entries, cfg),
        misannotated: misannotated(&metas),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;

    fn meta(
        ns: &str,
        name: &str,
        annotations: &[(&str, &str)],
        labels: &[(&str, &str)],
    ) -> ObjectMeta {
        let map = |pairs: &[(&str, &str)]| {
            (!pairs.is_empty()).then(|| {
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
        };
        ObjectMeta {
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            annotations: map(annotations),
            labels: map(labels),
            ..Default::default()
        }
    }

    #[test]
    fn finds_pods_with_annotations_weft_does_not_read() {
        let pods = [
            meta("shop", "typo", &[("weft.dev/opaque-port", "3306")], &[]),
            meta("shop", "fine", &[(keys::OPAQUE_PORTS, "3306")], &[]),
            meta("shop", "foreign", &[("example.com/x", "1")], &[]),
        ];
        assert_eq!(
            misannotated(&pods),
            [Misannotated {
                namespace: "shop".into(),
                name: "typo".into(),
                unknown: vec![crate::UnknownAnnotation {
                    key: "weft.dev/opaque-port".into(),
                    likely: Some(keys::OPAQUE_PORTS),
                }],
                inject_value: None,
            }]
        );
    }

    #[test]
    fn finds_opted_in_pods_without_the_proxy() {
        let pods = [
            meta("shop", "meshed", &[(keys::PROXY_VERSION, "0.1.0")], &[]),
            meta("shop", "missed", &[], &[]),
            meta("shop", "out", &[(keys::INJECT, keys::DISABLED)], &[]),
            meta("plain", "annotated", &[(keys::INJECT, keys::ENABLED)], &[]),
            meta("plain", "labelled", &[], &[(keys::INJECT, keys::ENABLED)]),
            meta("plain", "ignored", &[], &[]),
            meta("kube-system", "dns", &[(keys::INJECT, keys::ENABLED)], &[]),
        ];
        let ns = BTreeMap::from([
            (
                "shop".to_owned(),
                BTreeMap::from([(keys::INJECT.to_owned(), keys::ENABLED.to_owned())]),
            ),
            ("plain".to_owned(), BTreeMap::new()),
        ]);
        let entries = selection::entries(true, &InjectConfig::default().excluded_namespaces, None);
        let found: Vec<(String, &str)> = unmeshed(&pods, &ns, &entries, &InjectConfig::default())
            .into_iter()
            .map(|u| (format!("{}/{}", u.namespace, u.name), u.opted_in_by))
            .collect();
        assert_eq!(
            found,
            [
                ("shop/missed".to_owned(), "namespace"),
                ("plain/annotated".to_owned(), "pod"),
                ("plain/labelled".to_owned(), "pod"),
            ]
        );
    }

    /// The pods the webhook is never asked about are not flagged: an annotated pod in a
    /// namespace labelled `disabled` (annotations cannot be selected on), and any pod
    /// opted in by annotation alone when the registration has no annotation entry.
    #[test]
    fn pods_the_webhook_is_never_sent_are_not_flagged() {
        let pods = [
            meta("off", "annotated", &[(keys::INJECT, keys::ENABLED)], &[]),
            meta("off", "labelled", &[], &[(keys::INJECT, keys::ENABLED)]),
            meta("plain", "annotated", &[(keys::INJECT, keys::ENABLED)], &[]),
        ];
        let ns = BTreeMap::from([
            (
                "off".to_owned(),
                BTreeMap::from([(keys::INJECT.to_owned(), keys::DISABLED.to_owned())]),
            ),
            ("plain".to_owned(), BTreeMap::new()),
        ]);
        let cfg = InjectConfig::default();
        let names = |annotation_opt_in: bool| -> Vec<String> {
            let entries = selection::entries(annotation_opt_in, &cfg.excluded_namespaces, None);
            unmeshed(&pods, &ns, &entries, &cfg)
                .into_iter()
                .map(|u| format!("{}/{}", u.namespace, u.name))
                .collect()
        };
        assert_eq!(names(true), ["off/labelled", "plain/annotated"]);
        assert_eq!(names(false), ["off/labelled"]);
    }
}
