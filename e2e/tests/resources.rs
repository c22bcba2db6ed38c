//! Weft's CRDs against the test bed's real API server: they install and establish, the
//! examples are accepted, invalid resources are rejected with a message naming the field,
//! and `kubectl explain` and `kubectl get` show what users need.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, fs};

use kube::{Api, Client, ResourceExt, api::DynamicObject};
use weft_e2e::{
    repo_root,
    shared::{self, FIELD_MANAGER},
};

/// Creates one object the way `kubectl create` does: strict field validation, so unknown
/// fields are rejected instead of silently pruned.
async fn apply(
    client: &Client,
    ns: &str,
    obj: &DynamicObject,
) -> Result<DynamicObject, kube::Error> {
    let types = obj.types.clone().unwrap_or_default();
    let plural = format!("{}s", types.kind.to_lowercase()).replace("policys", "policies");
    let url = format!(
        "/apis/{}/namespaces/{ns}/{plural}?fieldValidation=Strict&fieldManager={FIELD_MANAGER}",
        types.api_version
    );
    let body = serde_json::to_vec(obj).expect("objects serialize");
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(body)
        .expect("a valid request");
    client.request::<DynamicObject>(req).await
}

async fn setup(prefix: &str) -> (Client, String) {
    let client = shared::client().await.expect("client for the test bed");
    shared::install_crds(&client).await.expect("CRDs install");
    let ns = shared::namespace(&client, prefix).await.expect("namespace");
    (client, ns)
}

#[tokio::test]
async fn crds_install_and_become_established() {
    let client = shared::client().await.unwrap();
    shared::install_crds(&client).await.unwrap();
    let api = Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(client);
    for name in ["routes.weft.dev", "policies.weft.dev", "breakers.weft.dev"] {
        let crd = api.get(name).await.unwrap();
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            assert!(
                conditions
                    .iter()
                    .any(|c| c.type_ == wanted && c.status == "True"),
                "{name}: condition {wanted} not True in {conditions:?}"
            );
        }
    }
}

#[tokio::test]
async fn every_example_is_accepted() {
    let (client, ns) = setup("examples").await;
    let mut per_kind: BTreeMap<String, usize> = BTreeMap::new();
    let mut files: Vec<_> = fs::read_dir(repo_root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for path in files {
        let text = fs::read_to_string(&path).unwrap();
        let obj: DynamicObject = serde_yaml::from_str(&text).unwrap();
        let kind = obj
            .types
            .as_ref()
            .map(|t| t.kind.clone())
            .unwrap_or_default();
        let created = apply(&client, &ns, &obj)
            .await
            .unwrap_or_else(|e| panic!("{} was rejected: {e}", path.display()));
        assert_eq!(created.name_any(), obj.name_any());
        // What the API server stored is what the user wrote, plus defaults.
        assert_eq!(created.data["spec"]["service"], obj.data["spec"]["service"]);
        *per_kind.entry(kind).or_default() += 1;
    }
    for kind in ["Route", "Policy", "Breaker"] {
        assert!(
            per_kind.get(kind).copied().unwrap_or(0) >= 2,
            "want at least two {kind} examples, have {per_kind:?}"
        );
    }
}

#[tokio::test]
async fn defaults_are_applied_by_the_api_server() {
    let (client, ns) = setup("defaults").await;
    let obj: DynamicObject = serde_yaml::from_str(
        r#"
apiVersion: weft.dev/v1alpha1
kind: Route
metadata: {name: defaults}
spec:
  service: {name: reviews}
  rules:
    - backends: [{name: reviews}]
      retries: {}
"#,
    )
    .unwrap();
    let stored = apply(&client, &ns, &obj).await.unwrap();
    let rule = &stored.data["spec"]["rules"][0];
    assert_eq!(rule["backends"][0]["weight"], 1);
    assert_eq!(rule["retries"]["attempts"], 2);
    assert_eq!(
        rule["retries"]["retryOn"],
        serde_json::json!(["connect-failure", "refused-stream", "unavailable"])
    );
    // The typed client sees the same resource.
    let typed = Api::<weft_crds::Route>::namespaced(client, &ns)
        .get("defaults")
        .await
        .unwrap();
    assert_eq!(typed.spec.rules[0].backends[0].weight, 1);
}

/// One invalid resource and what the API server must say about it.
struct Invalid {
    kind: &'static str,
    spec: &'static str,
    /// The field the message must name.
    field: &'static str,
    /// A fragment of the explanation.
    says: &'static str,
}

async fn assert_rejected(case: Invalid) {
    let (client, ns) = setup("invalid").await;
    let doc = format!(
        "apiVersion: weft.dev/v1alpha1\nkind: {}\nmetadata: {{name: bad}}\nspec:\n{}",
        case.kind,
        case.spec
            .lines()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let obj: DynamicObject = serde_yaml::from_str(&doc)
        .unwrap_or_else(|e| panic!("test case does not parse as YAML: {e}\n{doc}"));
    match apply(&client, &ns, &obj).await {
        Ok(_) => panic!("accepted an invalid {}:\n{doc}", case.kind),
        Err(kube::Error::Api(status)) => {
            assert!(
                status.code == 422 || status.code == 400,
                "want 422 or 400, got {}: {}",
                status.code,
                status.message
            );
            assert!(
                status.message.contains(case.field),
                "message does not name {:?}: {}",
                case.field,
                status.message
            );
            assert!(
                status.message.contains(case.says),
                "message does not say {:?}: {}",
                case.says,
                status.message
            );
        }
        Err(other) => panic!("unexpected error: {other}"),
    }
}

macro_rules! rejects {
    ($($name:ident: $kind:literal, $field:literal, $says:literal, $spec:literal;)+) => {$(
        #[tokio::test]
        async fn $name() {
            assert_rejected(Invalid { kind: $kind, spec: $spec, field: $field, says: $says }).await;
        }
    )+};
}

rejects! {
    rejects_negative_weight: "Route", "spec.rules[0].backends[0].weight", "greater than or equal to 0",
        "service: {name: reviews}\nrules:\n- backends: [{name: a, weight: -1}, {name: b}]";
    rejects_percentage_over_100: "Route", "spec.rules[0].fault.abort.percentage", "less than or equal to 100",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  fault: {abort: {httpStatus: 503, percentage: 150}}";
    rejects_unknown_match_type: "Route", "spec.rules[0].matches[0].headers[0].type", "supported values: \"Exact\", \"RegularExpression\"",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  matches: [{headers: [{name: x-user, value: bob, type: Glob}]}]";
    rejects_exact_and_prefix_together: "Route", "spec.rules[0].matches[0].path", "exactly one of exact, prefix or regex",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  matches: [{path: {exact: /a, prefix: /b}}]";
    rejects_empty_path_match: "Route", "spec.rules[0].matches[0].path", "exactly one of exact, prefix or regex",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  matches: [{path: {}}]";
    rejects_duration_in_parsecs: "Route", "spec.rules[0].timeout", "should match",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  timeout: 10 parsecs";
    rejects_per_try_timeout_above_timeout: "Route", "spec.rules[0].perTryTimeout", "perTryTimeout must not exceed timeout",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  timeout: 1s\n  perTryTimeout: 1500ms";
    rejects_empty_backends: "Route", "spec.rules[0].backends", "at least 1 items",
        "service: {name: reviews}\nrules:\n- backends: []";
    rejects_all_zero_weights: "Route", "spec.rules[0].backends", "at least one backend must have a weight above 0",
        "service: {name: reviews}\nrules:\n- backends: [{name: a, weight: 0}, {name: b, weight: 0}]";
    rejects_unknown_field: "Route", "spec.rules[0].retrys", "unknown field",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  retrys: {attempts: 3}";
    rejects_too_many_retry_attempts: "Route", "spec.rules[0].retries.attempts", "less than or equal to 10",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  retries: {attempts: 50}";
    rejects_unknown_retry_condition: "Route", "spec.rules[0].retries.retryOn[0]", "supported values",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  retries: {retryOn: [whenever]}";
    rejects_backoff_base_above_max: "Route", "spec.rules[0].retries.backoff.base", "backoff.base must not exceed backoff.max",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  retries: {backoff: {base: 2s, max: 100ms}}";
    rejects_no_rules: "Route", "spec.rules", "at least 1 items",
        "service: {name: reviews}\nrules: []";
    rejects_bad_service_name: "Route", "spec.service.name", "should match",
        "service: {name: Reviews_Service}\nrules:\n- backends: [{name: a}]";
    rejects_port_out_of_range: "Route", "spec.service.port", "less than or equal to 65535",
        "service: {name: reviews, port: 70000}\nrules:\n- backends: [{name: a}]";
    rejects_empty_fault: "Route", "spec.rules[0].fault", "fault needs a delay, an abort, or both",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  fault: {}";
    rejects_prefix_rewrite_without_prefix_match: "Route", "spec.rules[0].rewrite.replacePrefixMatch", "needs every match to have a path prefix",
        "service: {name: reviews}\nrules:\n- backends: [{name: a}]\n  matches: [{path: {exact: /a}}]\n  rewrite: {replacePrefixMatch: /b}";
    rejects_too_many_backends: "Route", "spec.rules[0].backends", "must have at most 16 items",
        "service: {name: reviews}\nrules:\n- backends: [{name: a},{name: a},{name: a},{name: a},{name: a},{name: a},{name: a},{name: a},{name: a},{name: a},{name: a},{name: a},{name: a},{name: a},{name: a},{name: a},{name: a}]";
    rejects_unknown_mtls_mode: "Policy", "spec.mtls.mode", "supported values: \"Strict\", \"Permissive\", \"Disabled\"",
        "target: {service: payments}\nmtls: {mode: Sometimes}";
    rejects_policy_with_two_targets: "Policy", "spec.target", "exactly one of target.selector or target.service",
        "target: {service: payments, selector: {matchLabels: {app: payments}}}";
    rejects_unauthenticated_allow_under_strict_mtls: "Policy", "spec.rules", "mtls.mode Strict refuses unauthenticated clients",
        "target: {service: payments}\nrules: [{action: Allow, from: [{unauthenticated: true}]}]";
    rejects_empty_source: "Policy", "spec.rules[0].from[0]", "a source needs serviceAccounts",
        "target: {service: payments}\nrules: [{action: Allow, from: [{}]}]";
    rejects_bad_spiffe_id: "Policy", "spec.rules[0].from[0].spiffeIds[0]", "should match",
        "target: {service: payments}\nrules: [{action: Allow, from: [{spiffeIds: [\"http://evil/ns/x\"]}]}]";
    rejects_zero_rate: "Policy", "spec.rateLimit.requestsPerSecond", "greater than or equal to 1",
        "target: {service: payments}\nrateLimit: {requestsPerSecond: 0}";
    rejects_burst_below_rate: "Policy", "spec.rateLimit.burst", "burst must be at least requestsPerSecond",
        "target: {service: payments}\nrateLimit: {requestsPerSecond: 100, burst: 10}";
    rejects_empty_breaker: "Breaker", "spec", "a Breaker needs outlierDetection, connectionPool, or both",
        "service: {name: inventory}";
    rejects_ejection_percent_over_100: "Breaker", "spec.outlierDetection.maxEjectedPercent", "less than or equal to 100",
        "service: {name: inventory}\noutlierDetection: {maxEjectedPercent: 150}";
    rejects_base_ejection_above_max: "Breaker", "spec.outlierDetection.baseEjectionTime", "baseEjectionTime must not exceed maxEjectionTime",
        "service: {name: inventory}\noutlierDetection: {baseEjectionTime: 10m, maxEjectionTime: 1m}";
    rejects_empty_connection_pool: "Breaker", "spec.connectionPool", "connectionPool needs at least one limit",
        "service: {name: inventory}\nconnectionPool: {}";
    rejects_zero_max_connections: "Breaker", "spec.connectionPool.maxConnections", "greater than or equal to 1",
        "service: {name: inventory}\nconnectionPool: {maxConnections: 0}";
}

fn kubectl(args: &[&str]) -> String {
    let out = shared::testbed()
        .kubectl()
        .args(args)
        .output()
        .expect("running kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn kubectl_explain_prints_the_field_docs() {
    let (_client, _ns) = setup("explain").await;
    let rules = kubectl(&["explain", "route.spec.rules"]);
    assert!(
        rules.contains("Ordered rules; the first rule that matches a request handles it."),
        "{rules}"
    );
    assert!(rules.contains("perTryTimeout"), "{rules}");
    let breaker = kubectl(&["explain", "breaker.spec"]);
    assert!(
        breaker.contains("Circuit breaking for one Service"),
        "{breaker}"
    );
    assert!(breaker.contains("outlierDetection"), "{breaker}");
    let policy = kubectl(&["explain", "policy.spec.mtls.mode"]);
    assert!(policy.contains("Permissive"), "{policy}");
}

#[tokio::test]
async fn kubectl_get_shows_printer_columns_and_short_names() {
    let (client, ns) = setup("columns").await;
    let text = fs::read_to_string(repo_root().join("examples/route-canary.yaml")).unwrap();
    let obj: DynamicObject = serde_yaml::from_str(&text).unwrap();
    apply(&client, &ns, &obj).await.unwrap();
    let out = kubectl(&["get", "routes.weft.dev", "-n", &ns]);
    let header = out.lines().next().unwrap_or_default();
    for column in ["NAME", "SERVICE", "PORT", "RULES", "ACCEPTED", "AGE"] {
        assert!(header.contains(column), "no {column} column in {out}");
    }
    assert!(
        out.contains("reviews-canary") && out.contains("reviews") && out.contains("9080"),
        "{out}"
    );
    let short = kubectl(&["get", "wroute", "-n", &ns, "-o", "name"]);
    assert_eq!(short.trim(), "route.weft.dev/reviews-canary");
    let category = kubectl(&["get", "weft", "-n", &ns, "-o", "name"]);
    assert!(
        category.contains("route.weft.dev/reviews-canary"),
        "{category}"
    );
}
