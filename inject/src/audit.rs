//! Finding pods that opted in but run without the proxy: created while the webhook was
//! unreachable (with `failurePolicy: Ignore`), or before their namespace opted in. Works
//! on metadata alone, so it can scan a cluster cheaply.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{InjectConfig, OptIn, keys};

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

/// Pods (by metadata) that opted in, are not excluded, and have no proxy.
/// `namespace_labels` maps each namespace to its labels.
pub fn unmeshed<'a>(
    pods: impl IntoIterator<Item = &'a ObjectMeta>,
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
    cfg: &InjectConfig,
) -> Vec<Unmeshed> {
    let mut out = Vec::new();
    for meta in pods {
        let namespace = meta.namespace.clone().unwrap_or_default();
        if cfg.excluded_namespaces.contains(&namespace) {
            continue;
        }
        if meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(keys::PROXY_VERSION))
        {
            continue;
        }
        let ns_in = super::namespace_opted_in(namespace_labels.get(&namespace));
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

/// Lists the pods (metadata only, in pages of 500 so that one answer stays small on a large
/// cluster) and namespaces of the cluster and returns those that opted in but run without
/// the proxy. Used by the operator's audit loop and by `kubectl weft check`.
#[cfg(feature = "cluster")]
pub async fn scan(client: &kube::Client, cfg: &InjectConfig) -> Result<Vec<Unmeshed>, kube::Error> {
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
    let mut params = ListParams::default().limit(500);
    loop {
        let page = pods.list(&params).await?;
        metas.extend(page.items.into_iter().map(|p| p.metadata));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    Ok(unmeshed(&metas, &labels, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let found: Vec<(String, &str)> = unmeshed(&pods, &ns, &InjectConfig::default())
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
}
