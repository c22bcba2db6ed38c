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
    let mut allow = AdmissionResponse::from(req);
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
    // Shown to whoever created the pod (kubectl prints them), whatever the outcome: a
    // misspelt annotation otherwise does nothing, silently.
    let warnings = inject::pod_metadata_warnings(&pod.metadata);
    if !warnings.is_empty() {
        allow.warnings = Some(warnings);
    }
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
    use crate::inject::Skip;
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
    fn a_misspelt_annotation_is_warned_about_whatever_the_outcome() {
        let typo = "annotation weft.dev/opaque-port is not one Weft reads, so it does nothing; did you mean weft.dev/opaque-ports?";
        for (annotations, want) in [
            (
                json!({"weft.dev/inject": "enabled", "weft.dev/opaque-port": "3306"}),
                Outcome::Injected,
            ),
            (
                json!({"weft.dev/opaque-port": "3306"}),
                Outcome::Skipped(Skip::NotOptedIn),
            ),
        ] {
            let (answer, outcome) = respond(&review(pod(annotations), "shop"), false);
            assert_eq!(outcome, want);
            assert_eq!(answer["response"]["allowed"], true);
            assert_eq!(answer["response"]["warnings"], json!([typo]), "{answer}");
        }
        let (answer, outcome) = respond(
            &review(
                pod(
                    json!({"weft.dev/inject": "enabled", "weft.dev/skip-inbound-port": "80", "weft.dev/skip-inbound-ports": "x"}),
                ),
                "shop",
            ),
            false,
        );
        assert!(matches!(outcome, Outcome::Denied(_)));
        assert_eq!(answer["response"]["allowed"], false);
        assert_eq!(
            answer["response"]["warnings"][0],
            "annotation weft.dev/skip-inbound-port is not one Weft reads, so it does nothing; did you mean weft.dev/skip-inbound-ports?"
        );
        let (answer, _) = respond(
            &review(pod(json!({"weft.dev/inject": "enabled"})), "shop"),
            false,
        );
        assert!(answer["response"].get("warnings").is_none(), "{answer}");
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

    /// A pod drawn from odd parts: annotations of every key the injector reads, with
    /// values good and bad; containers and init containers named as the injector's own or
    /// using its ports and user; probes; `hostNetwork`; labels.
    fn odd_pod(rng: &mut impl rand::Rng) -> Value {
        use rand::seq::IndexedRandom as _;
        fn pick<'a>(rng: &mut impl rand::Rng, list: &[&'a str]) -> &'a str {
            list.choose(rng).copied().unwrap_or_default()
        }
        let keys = [
            "weft.dev/inject",
            "weft.dev/inject",
            "weft.dev/proxy-version",
            "weft.dev/skip-inbound-ports",
            "weft.dev/skip-outbound-ports",
            "weft.dev/skip-outbound-cidrs",
            "weft.dev/opaque-ports",
            "weft.dev/inbound-loopback-ports",
            "weft.dev/access-log",
            "weft.dev/mesh-http1",
            "weft.dev/trace-collector",
            "weft.dev/trace-sampling",
            "weft.dev/rewrite-probes",
            "weft.dev/proxy-cpu-request",
            "weft.dev/proxy-cpu-limit",
            "weft.dev/proxy-memory-request",
            "weft.dev/proxy-memory-limit",
            "weft.dev/app-idle-timeout",
            "weft.dev/upstream-idle-timeout",
            "weft.dev/http1-idle-timeout",
            "weft.dev/http2-idle-timeout",
            "weft.dev/proxy-log-level",
            "weft.dev/opaque-port",
            "kubectl.kubernetes.io/default-container",
        ];
        let values = [
            "3s",
            "0s",
            "1.5s",
            "enabled",
            "enabled",
            "disabled",
            "",
            "80",
            "80,443",
            "1-65535",
            "0",
            "65536",
            "443-80",
            "8080,,9090",
            "abc",
            "198.18.0.0/15",
            "::1/128",
            "300.1.1.1/8",
            "true",
            "false",
            "json",
            "debug",
            "warn,weft_proxy=debug",
            "sessions",
            "mux",
            "127.0.0.1:4317",
            "collector:4317",
            "0.5",
            "1.5",
            "-1",
            "100m",
            "1Gi",
            "lots",
            "web",
            "weft-proxy",
            " 80 ",
            "é",
            "80\n443",
        ];
        let mut annotations = serde_json::Map::new();
        if rng.random_bool(0.5) {
            annotations.insert("weft.dev/inject".to_owned(), json!("enabled"));
        }
        for _ in 0..rng.random_range(0..4) {
            annotations.insert(pick(rng, &keys).to_owned(), json!(pick(rng, &values)));
        }
        // The injector's own names, rarely: a pod holding one is skipped or refused.
        let names = [
            "web",
            "web",
            "web",
            "web",
            "web",
            "web",
            "side",
            "side",
            "side",
            "side",
            "side",
            "side",
            "app",
            "app",
            "app",
            "app",
            "istio-proxy",
            "istio-proxy",
            "weft-proxy",
            "weft-init",
        ];
        let ports = [80, 8080, 15001, 4143, 4191, 9090, 0, 65535];
        let container = |rng: &mut _| {
            let mut c = json!({"name": pick(rng, &names), "image": "nginx"});
            if rand::Rng::random_bool(rng, 0.5) {
                let port = *ports.choose(rng).unwrap_or(&80);
                c["ports"] = json!([{"containerPort": port, "name": "http"}]);
            }
            match rand::Rng::random_range(rng, 0..5) {
                0 => c["readinessProbe"] = json!({"httpGet": {"path": "/ready", "port": "http"}}),
                1 => c["livenessProbe"] = json!({"httpGet": {"path": "/live", "port": 8080}}),
                2 => c["startupProbe"] = json!({"tcpSocket": {"port": 80}}),
                3 => c["securityContext"] = json!({"runAsUser": 2102}),
                _ => {}
            }
            c
        };
        let containers: Vec<Value> = (0..rng.random_range(1..4))
            .map(|_| container(rng))
            .collect();
        let mut spec = json!({"containers": containers});
        if rng.random_bool(0.2) {
            let inits: Vec<Value> = (0..rng.random_range(1..3))
                .map(|_| container(rng))
                .collect();
            spec["initContainers"] = json!(inits);
        }
        if rng.random_bool(0.1) {
            spec["hostNetwork"] = json!(true);
        }
        let mut labels = serde_json::Map::new();
        if rng.random_bool(0.1) {
            labels.insert(
                "weft.dev/meshed".to_owned(),
                json!(pick(rng, &["true", "false"])),
            );
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "annotations": annotations, "labels": labels},
            "spec": spec,
        })
    }

    /// The admission answer's JSONPatch applied to `object` as the API server would.
    fn patched(object: &Value, answer: &Value) -> Value {
        let raw: Vec<u8> = serde_json::from_value(answer["response"]["patch"].clone()).unwrap();
        let ops: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
        let mut patched =
            serde_json::to_value(serde_json::from_value::<Pod>(object.clone()).unwrap()).unwrap();
        json_patch::patch(&mut patched, &ops).unwrap();
        patched
    }

    /// Generated pods ([`odd_pod`]), in namespaces opted in or not: every one gets a
    /// well-formed answer, never a panic. An injected pod's patch applies and gives a pod
    /// with one proxy and one init container of the injector's and the meshed label, and
    /// that pod admitted again is left alone (injection is idempotent); a denied one says
    /// why; any other is allowed unchanged. Seeded (`WEFT_FUZZ_SEED`, default 1),
    /// `WEFT_FUZZ_CASES` pods (default 500).
    #[test]
    fn generated_pods_get_a_well_formed_answer_and_an_injection_applies_once() {
        use rand::SeedableRng as _;
        let seed = std::env::var("WEFT_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let cases = std::env::var("WEFT_FUZZ_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(500);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
        for case in 0..cases {
            let object = odd_pod(&mut rng);
            let opted_in = rand::Rng::random_bool(&mut rng, 0.3);
            let ctx = format!("seed {seed}, case {case}, namespace opted in {opted_in}: {object}");
            let (answer, outcome) = respond(&review(object.clone(), "shop"), opted_in);
            *outcomes.entry(outcome.as_str().to_owned()).or_default() += 1;
            let resp = &answer["response"];
            assert_eq!(resp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002", "{ctx}");
            // The one unknown key odd pods carry is warned about, and so is a
            // `weft.dev/inject` neither enabled nor disabled; nothing else.
            let misspelt = object["metadata"]["annotations"]
                .get("weft.dev/opaque-port")
                .is_some();
            let meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
                serde_json::from_value(object["metadata"].clone())
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let odd_inject = inject::inject_value_problem(&meta).is_some();
            let warned = resp["warnings"].as_array().map_or(0, Vec::len);
            assert_eq!(
                warned,
                usize::from(misspelt) + usize::from(odd_inject),
                "{ctx}: {resp}"
            );
            match &outcome {
                Outcome::Injected => {
                    assert_eq!(resp["allowed"], true, "{ctx}");
                    let pod = patched(&object, &answer);
                    let parsed: Pod = serde_json::from_value(pod.clone())
                        .unwrap_or_else(|e| panic!("{ctx}: the patched pod does not parse: {e}"));
                    let spec = parsed.spec.unwrap_or_default();
                    let all: Vec<&str> = spec
                        .containers
                        .iter()
                        .chain(spec.init_containers.iter().flatten())
                        .map(|c| c.name.as_str())
                        .collect();
                    for ours in ["weft-proxy", "weft-init"] {
                        let n = all.iter().filter(|n| **n == ours).count();
                        assert_eq!(n, 1, "{ctx}: {ours} × {n} in {all:?}");
                    }
                    assert_eq!(
                        pod["metadata"]["labels"]["weft.dev/meshed"], "true",
                        "{ctx}"
                    );
                    let (_, again) = respond(&review(pod, "shop"), opted_in);
                    assert_eq!(again, Outcome::Skipped(Skip::AlreadyInjected), "{ctx}");
                }
                Outcome::Denied(e) => {
                    assert_eq!(resp["allowed"], false, "{ctx}");
                    let msg = resp["status"]["message"].as_str().unwrap_or_default();
                    assert_eq!(msg, e.to_string(), "{ctx}");
                    assert!(msg.len() > 10, "{ctx}: {msg:?}");
                }
                Outcome::Skipped(_) | Outcome::Ignored | Outcome::Invalid(_) => {
                    assert_eq!(resp["allowed"], true, "{ctx}: {outcome:?}");
                    assert!(resp.get("patch").is_none(), "{ctx}: {outcome:?}");
                }
            }
        }
        eprintln!("seed {seed}: {cases} pods; outcomes {outcomes:?}");
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
