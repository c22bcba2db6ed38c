//! Injecting into (and removing from) Kubernetes manifests as users keep them: YAML or
//! JSON, one or many documents, Pods and every workload with a pod template, and Lists.
//!
//! Documents with nothing to change are written back byte for byte; a changed document is
//! re-serialized (keys keep their order). The injection itself is the webhook's function.

use k8s_openapi::api::core::v1::PodSpec;
use kube_meta::ObjectMeta;
use serde_yaml::Value;
use weft_inject::{self as inject, InjectConfig, Skip};

mod kube_meta {
    pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
}

/// Inject or remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Add the proxy.
    Inject,
    /// Remove what injection added.
    Uninject,
}

/// What happened to one pod template, for the summary on stderr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `kind/name` of the object holding the template.
    pub object: String,
    /// `injected`, `uninjected`, `unchanged`, or why it was skipped.
    pub result: String,
}

/// Why a manifest could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A document is not valid YAML or JSON.
    #[error("document {index}: {source}")]
    Parse {
        /// 1-based position of the document.
        index: usize,
        /// The parser's error.
        #[source]
        source: serde_yaml::Error,
    },
    /// A pod template does not have the shape of one.
    #[error("{object}: pod template does not parse: {reason}")]
    Template {
        /// `kind/name` of the object.
        object: String,
        /// The parser's error.
        reason: String,
    },
    /// A pod opted in but cannot be injected.
    #[error("{object}: {source}")]
    Inject {
        /// `kind/name` of the object.
        object: String,
        /// Why.
        #[source]
        source: inject::InjectError,
    },
    /// Re-serializing failed.
    #[error("writing document {index}: {source}")]
    Write {
        /// 1-based position of the document.
        index: usize,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
}

/// Processes a whole input (YAML stream or a JSON document).
pub fn process(
    input: &str,
    action: Action,
    cfg: &InjectConfig,
) -> Result<(String, Vec<Report>), ManifestError> {
    let mut reports = Vec::new();
    if input.trim_start().starts_with('{') {
        let mut doc: Value = serde_yaml::from_str(input)
            .map_err(|source| ManifestError::Parse { index: 1, source })?;
        if !walk(&mut doc, action, cfg, &mut reports)? {
            return Ok((input.to_owned(), reports));
        }
        let json: serde_json::Value = serde_yaml::from_value(doc)
            .map_err(|source| ManifestError::Parse { index: 1, source })?;
        let mut out = serde_json::to_string_pretty(&json)
            .map_err(|source| ManifestError::Write { index: 1, source })?;
        out.push('\n');
        return Ok((out, reports));
    }
    let mut out = String::with_capacity(input.len() + 2048);
    for (i, (separator, body)) in split_documents(input).into_iter().enumerate() {
        out.push_str(separator);
        let mut doc: Value = serde_yaml::from_str(body).map_err(|source| ManifestError::Parse {
            index: i + 1,
            source,
        })?;
        if doc.is_null() || !walk(&mut doc, action, cfg, &mut reports)? {
            out.push_str(body);
            continue;
        }
        let text = serde_yaml::to_string(&doc).map_err(|source| ManifestError::Parse {
            index: i + 1,
            source,
        })?;
        out.push_str(&text);
    }
    Ok((out, reports))
}

/// Splits a YAML stream into (separator line, document text) pairs; the first separator
/// is empty unless the stream starts with `---`.
fn split_documents(input: &str) -> Vec<(&str, &str)> {
    let mut docs = Vec::new();
    let mut sep_start = 0;
    let mut sep_end = 0;
    let mut pos = 0;
    for line in input.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            docs.push((&input[sep_start..sep_end], &input[sep_end..pos]));
            sep_start = pos;
            sep_end = pos + line.len();
        }
        pos += line.len();
    }
    docs.push((&input[sep_start..sep_end], &input[sep_end..]));
    // A stream that starts with `---` yields an empty first document: drop it.
    if docs.len() > 1 && docs[0].0.is_empty() && docs[0].1.trim().is_empty() {
        let (_, empty) = docs.remove(0);
        if empty.is_empty() {
            return docs;
        }
        docs.insert(0, ("", empty));
    }
    docs
}

/// Finds the pod templates in one object; returns whether anything changed.
fn walk(
    doc: &mut Value,
    action: Action,
    cfg: &InjectConfig,
    reports: &mut Vec<Report>,
) -> Result<bool, ManifestError> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_owned();
    let namespace = doc
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_owned();
    let object = format!("{}/{name}", kind.to_lowercase());
    match kind.as_str() {
        "Pod" => template(doc, &object, &namespace, action, cfg, reports),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => {
            match doc.get_mut("spec").and_then(|s| s.get_mut("template")) {
                Some(t) => template(t, &object, &namespace, action, cfg, reports),
                None => Ok(false),
            }
        }
        "CronJob" => match doc
            .get_mut("spec")
            .and_then(|s| s.get_mut("jobTemplate"))
            .and_then(|s| s.get_mut("spec"))
            .and_then(|s| s.get_mut("template"))
        {
            Some(t) => template(t, &object, &namespace, action, cfg, reports),
            None => Ok(false),
        },
        k if k == "List" || k.ends_with("List") => {
            let mut changed = false;
            if let Some(items) = doc.get_mut("items").and_then(Value::as_sequence_mut) {
                for item in items {
                    changed |= walk(item, action, cfg, reports)?;
                }
            }
            Ok(changed)
        }
        _ => Ok(false),
    }
}

/// Injects into (or removes from) one pod template: a mapping with `metadata` and `spec`.
fn template(
    t: &mut Value,
    object: &str,
    namespace: &str,
    action: Action,
    cfg: &InjectConfig,
    reports: &mut Vec<Report>,
) -> Result<bool, ManifestError> {
    let bad = |reason: String| ManifestError::Template {
        object: object.to_owned(),
        reason,
    };
    let mut meta: ObjectMeta = match t.get("metadata") {
        Some(m) => serde_yaml::from_value(m.clone()).map_err(|e| bad(e.to_string()))?,
        None => ObjectMeta::default(),
    };
    let mut spec: PodSpec = match t.get("spec") {
        Some(s) => serde_yaml::from_value(s.clone()).map_err(|e| bad(e.to_string()))?,
        None => return Ok(false),
    };
    let mut report = |result: String| {
        reports.push(Report {
            object: object.to_owned(),
            result,
        })
    };
    if action == Action::Inject {
        for warning in inject::pod_metadata_warnings(&meta) {
            report(format!("warning: {warning}"));
        }
    }
    let changed = match action {
        Action::Inject => match inject::decide(&meta, &spec, namespace, true, cfg) {
            Err(Skip::AlreadyInjected) => {
                report("unchanged (already injected)".to_owned());
                false
            }
            Err(skip) => {
                report(format!("skipped ({skip})"));
                false
            }
            Ok(()) => {
                inject::inject(&mut meta, &mut spec, cfg).map_err(|source| {
                    ManifestError::Inject {
                        object: object.to_owned(),
                        source,
                    }
                })?;
                report("injected".to_owned());
                true
            }
        },
        Action::Uninject => {
            let removed = inject::uninject(&mut meta, &mut spec);
            report(
                if removed {
                    "uninjected"
                } else {
                    "unchanged (not injected)"
                }
                .to_owned(),
            );
            removed
        }
    };
    if changed {
        let map = t
            .as_mapping_mut()
            .ok_or_else(|| bad("not a mapping".to_owned()))?;
        let meta = serde_yaml::to_value(&meta).map_err(|e| bad(e.to_string()))?;
        let spec = serde_yaml::to_value(&spec).map_err(|e| bad(e.to_string()))?;
        if meta.as_mapping().is_some_and(|m| m.is_empty()) {
            map.remove("metadata");
        } else {
            map.insert(Value::from("metadata"), meta);
        }
        map.insert(Value::from("spec"), spec);
    }
    Ok(changed)
}
