//! From an AdmissionReview to its answer, without I/O: parse (garbage gets a well-formed
//! error review, never a panic), then admit (decide, inject, diff into a JSONPatch).

use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::DynamicObject,
    core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};

use crate::inject::{self, InjectConfig, InjectError, Skip};

/// What happened to one admission request; the metric label says the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The pod got the proxy.
    Injected,
    /// The pod was left alone, and why.
    Skipped(Skip),
    /// The pod opted in but cannot be injected; admission denied with the reason.
    Denied(InjectError),
    /// Not a pod creation (the webhook only registers for those, but says yes to others).
    Ignored,
    /// The request could not be read.
    Invalid(String),
}

impl Outcome {
    /// A short stable label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped(s) => s.as_str(),
            Outcome::Denied(_) => "denied",
            Outcome::Ignored => "ignored",
            Outcome::Invalid(_) => "invalid",
        }
    }
}

/// Parses a request body. On failure returns the review to send back: well-formed, with
/// `allowed: false` and the reason.
pub fn parse(
    body: &[u8],
) -> Result<AdmissionRequest<DynamicObject>, Box<(AdmissionReview<DynamicObject>, Outcome)>> {
    let invalid = |reason: String| {
        Box::new((
            AdmissionResponse::invalid(&reason).into_review(),
            Outcome::Invalid(reason),
        ))
    };
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("not an AdmissionReview: {e}")))?;
    review
        .try_into()
        .map_err(|_| invalid("AdmissionReview without a request".to_owned()))
}

/// The namespace a request is about.
pub fn namespace(req: &AdmissionRequest<DynamicObject>) -> String {
    req.namespace
        .clone()
        .or_else(|| {
            req.object
                .as_ref()
                .and_then(|o| o.metadata.namespace.clone())
        })
        .unwrap_or_else(|| "default".to_owned())
}

/// Answers one request. `namespace_opted_in` is whether the pod's namespace carries
/// `weft.dev/inject=enabled`.
pub fn admit(
    req: &AdmissionRequest<DynamicObject>,
    namespace_opted_in: bool,
    cfg: &InjectConfig,
) -> (AdmissionReview<DynamicObject>, Outcome) {
    let allow = AdmissionResponse::from(req);
    let is_pod_create = req.kind.kind == "Pod"
        && req.kind.group.is_empty()
        && req.operation == Operation::Create
        && req.sub_resource.is_none();
    let Some(object) = req.object.as_ref().filter(|_| is_pod_create) else {
        return (allow.into_review(), Outcome::Ignored);
    };
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(pod) => pod,
        // Not ours to judge: the API server validates pods. Let it through unchanged.
        Err(e) => {
            let reason = format!("pod does not parse: {e}");
            return (allow.into_review(), Outcome::Invalid(reason));
        }
    };
    let ns = namespace(req);
    let mut meta = pod.metadata.clone();
    let mut spec = pod.spec.clone().unwrap_or_default();
    if let Err(skip) = inject::decide(&meta, &spec, &ns, namespace_opted_in, cfg) {
        return (allow.into_review(), Outcome::Skipped(skip));
    }
    if let Err(e) = inject::inject(&mut meta, &mut spec, cfg) {
        return (allow.deny(e.to_string()).into_review(), Outcome::Denied(e));
    }
    let injected = Pod {
        metadata: meta,
        spec: Some(spec),
        status: pod.status.clone(),
    };
    let patch = match (serde_json::to_value(&pod), serde_json::to_value(&injected)) {
        (Ok(before), Ok(after)) => json_patch::diff(&before, &after),
        (Err(e), _) | (_, Err(e)) => {
            let reason = format!("pod does not serialize: {e}");
            return (allow.into_review(), Outcome::Invalid(reason));
        }
    };
    match allow.clone().with_patch(patch) {
        Ok(resp) => (resp.into_review(), Outcome::Injected),
        Err(e) => (allow.into_review(), Outcome::Invalid(format!("patch: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn review(object: Value, namespace: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "admin"},
                "object": object,
                "dryRun": false,
            }
        }))
        .unwrap()
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "annotations": annotations},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]}
        })
    }

    fn respond(body: &[u8], ns_opted_in: bool) -> (Value, Outcome) {
        let (review, outcome) = match parse(body) {
            Ok(req) => admit(&req, ns_opted_in, &InjectConfig::default()),
            Err(answer) => *answer,
        };
        (serde_json::to_value(review).unwrap(), outcome)
    }

    #[test]
    fn injects_an_opted_in_pod_with_a_json_patch_that_applies() {
        let object = pod(json!({"weft.dev/inject": "enabled"}));
        let (answer, outcome) = respond(&review(object.clone(), "shop"), false);
        assert_eq!(outcome, Outcome::Injected);
        let resp = &answer["response"];
        assert_eq!(resp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(resp["allowed"], true);
        assert_eq!(resp["patchType"], "JSONPatch");
        // The patch bytes are JSON ops; apply them as the API server would.
        let raw: Vec<u8> = serde_json::from_value(resp["patch"].clone()).unwrap();
        let ops: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
        let mut patched =
            serde_json::to_value(serde_json::from_value::<Pod>(object).unwrap()).unwrap();
        json_patch::patch(&mut patched, &ops).unwrap();
        let inits = patched["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits[0]["name"], "weft-init");
        assert_eq!(inits[1]["name"], "weft-proxy");
        assert_eq!(inits[1]["restartPolicy"], "Always");
        assert_eq!(patched["metadata"]["labels"]["weft.dev/meshed"], "true");
    }

    #[test]
    fn leaves_other_pods_alone() {
        let (answer, outcome) = respond(&review(pod(json!({})), "shop"), false);
        assert_eq!(outcome, Outcome::Skipped(Skip::NotOptedIn));
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
    }

    #[test]
    fn garbage_gets_a_well_formed_error() {
        for body in [&b"not json"[..], b"{}", b"{\"request\": 5}", b"[]", b""] {
            let (answer, outcome) = respond(body, false);
            assert!(matches!(outcome, Outcome::Invalid(_)), "{outcome:?}");
            assert_eq!(answer["kind"], "AdmissionReview");
            assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
            assert_eq!(answer["response"]["allowed"], false);
            assert!(
                answer["response"]["status"]["message"]
                    .as_str()
                    .unwrap()
                    .len()
                    > 5
            );
        }
    }

    #[test]
    fn an_unparseable_pod_is_let_through_unchanged() {
        let object = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {"containers": "nope"}});
        let (answer, outcome) = respond(&review(object, "shop"), true);
        assert!(matches!(outcome, Outcome::Invalid(_)));
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
    }

    #[test]
    fn a_conflicting_pod_is_denied_with_the_reason() {
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "clash", "annotations": {"weft.dev/inject": "enabled"}},
            "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 15001}]}]}
        });
        let (answer, outcome) = respond(&review(object, "shop"), false);
        assert!(matches!(outcome, Outcome::Denied(_)));
        assert_eq!(answer["response"]["allowed"], false);
        let msg = answer["response"]["status"]["message"].as_str().unwrap();
        assert!(msg.contains("15001") && msg.contains("\"web\""), "{msg}");
    }
}
