//! The authorization matrix: identity × namespace × port × path × method ×
//! allow/deny/default, deny wins, dry run, and the normalization bypass list.

use super::*;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const PROM: &str = "spiffe://cluster.local/ns/monitoring/sa/prometheus";
const EVIL: &str = "spiffe://cluster.local/ns/shopping/sa/web";

fn authz(policies: serde_json::Value) -> Authorizer {
    let w: Vec<wire::AuthorizationConfig> = serde_json::from_value(policies).unwrap();
    Authorizer::from_wire(&w, "inbound.authorization").unwrap()
}

fn problems(policies: serde_json::Value) -> Vec<String> {
    let w: Vec<wire::AuthorizationConfig> = serde_json::from_value(policies).unwrap();
    Authorizer::from_wire(&w, "inbound.authorization").unwrap_err()
}

fn http(a: &Authorizer, identity: Option<&str>, port: u16, method: Method, path: &str) -> Verdict {
    let normal = normalize_path(path);
    a.decide(&Subject {
        identity,
        port,
        http: Some((&normal, &method)),
    })
}

fn allowed(a: &Authorizer, identity: Option<&str>, port: u16, method: Method, path: &str) -> bool {
    match http(a, identity, port, method, path) {
        Verdict::Allow | Verdict::DryRunDeny { .. } => true,
        Verdict::Deny { .. } => false,
    }
}

fn tcp(a: &Authorizer, identity: Option<&str>, port: u16) -> Verdict {
    a.decide(&Subject {
        identity,
        port,
        http: None,
    })
}

fn deny(policy: &str) -> Verdict {
    Verdict::Deny {
        policy: policy.into(),
    }
}

/// A typical policy: web may GET and POST /api on 8080; the monitoring namespace may GET
/// /metrics on 9090; nobody may touch /admin; everything else is denied.
fn shop() -> Authorizer {
    authz(serde_json::json!([{
        "name": "shop/api",
        "defaultAction": "deny",
        "rules": [
            {"action": "allow", "from": [{"identities": [WEB]}],
             "to": [{"ports": [8080], "paths": [{"prefix": "/api"}], "methods": ["GET", "POST"]}]},
            {"action": "allow",
             "from": [{"identityPrefixes": ["spiffe://cluster.local/ns/monitoring/"]}],
             "to": [{"ports": [9090], "paths": [{"exact": "/metrics"}], "methods": ["GET"]}]},
            {"action": "deny", "to": [{"paths": [{"prefix": "/admin"}]}]}
        ]
    }]))
}

#[test]
fn no_policy_allows_everything() {
    let a = authz(serde_json::json!([]));
    assert!(a.is_empty());
    assert_eq!(http(&a, None, 80, Method::DELETE, "/admin"), Verdict::Allow);
    assert_eq!(tcp(&a, None, 5432), Verdict::Allow);
}

#[test]
fn the_matrix_of_identity_namespace_port_path_and_method() {
    let a = shop();
    let g = Method::GET;
    // (identity, port, method, path, allowed)
    let cases: &[(Option<&str>, u16, Method, &str, bool)] = &[
        (Some(WEB), 8080, g.clone(), "/api/items", true),
        (Some(WEB), 8080, Method::POST, "/api", true),
        (Some(WEB), 8080, Method::DELETE, "/api/items", false), // method
        (Some(WEB), 9090, g.clone(), "/api/items", false),      // port
        (Some(WEB), 8080, g.clone(), "/apix", false),           // prefix boundary
        (Some(WEB), 8080, g.clone(), "/other", false),          // path: default deny
        (Some(CART), 8080, g.clone(), "/api/items", false),     // another SA
        (None, 8080, g.clone(), "/api/items", false),           // unauthenticated
        (Some(PROM), 9090, g.clone(), "/metrics", true),        // namespace prefix
        (Some(PROM), 9090, g.clone(), "/metrics/x", false),     // exact path
        (Some(PROM), 8080, g.clone(), "/metrics", false),       // port
        (Some(PROM), 9090, Method::POST, "/metrics", false),    // method
        (Some(EVIL), 8080, g.clone(), "/api/items", false),     // look-alike namespace
        (
            Some("spiffe://cluster.local/ns/monitoringx/sa/p"),
            9090,
            g.clone(),
            "/metrics",
            false,
        ),
        (Some(WEB), 8080, g.clone(), "/admin", false), // deny rule
    ];
    for (identity, port, method, path, want) in cases {
        assert_eq!(
            allowed(&a, *identity, *port, method.clone(), path),
            *want,
            "{identity:?} {port} {method} {path}"
        );
    }
}

#[test]
fn deny_wins_over_allow_across_policies() {
    let a = authz(serde_json::json!([
        {"name": "shop/open", "defaultAction": "allow",
         "rules": [{"action": "allow", "from": [{"identities": [WEB]}]}]},
        {"name": "shop/no-admin", "defaultAction": "allow",
         "rules": [{"action": "deny", "to": [{"paths": [{"prefix": "/admin"}]}]}]}
    ]));
    assert_eq!(
        http(&a, Some(WEB), 80, Method::GET, "/admin/users"),
        deny("shop/no-admin")
    );
    assert_eq!(http(&a, Some(WEB), 80, Method::GET, "/"), Verdict::Allow);
    // An allow in one policy lifts another policy's default deny.
    let a = authz(serde_json::json!([
        {"name": "shop/strict", "defaultAction": "deny"},
        {"name": "shop/web", "defaultAction": "allow",
         "rules": [{"action": "allow", "from": [{"identities": [WEB]}]}]}
    ]));
    assert_eq!(http(&a, Some(WEB), 80, Method::GET, "/"), Verdict::Allow);
    assert_eq!(
        http(&a, Some(CART), 80, Method::GET, "/"),
        deny("shop/strict")
    );
}

#[test]
fn defaults_allow_or_deny_what_no_rule_matches() {
    let allow = authz(serde_json::json!([{"name": "a/b", "defaultAction": "allow",
        "rules": [{"action": "deny", "from": [{"unauthenticated": true}]}]}]));
    assert_eq!(
        http(&allow, Some(CART), 80, Method::GET, "/"),
        Verdict::Allow
    );
    assert_eq!(http(&allow, None, 80, Method::GET, "/"), deny("a/b"));
    let closed = authz(serde_json::json!([{"name": "a/b", "defaultAction": "deny"}]));
    assert_eq!(http(&closed, Some(CART), 80, Method::GET, "/"), deny("a/b"));
    assert_eq!(tcp(&closed, Some(CART), 5432), deny("a/b"));
}

#[test]
fn unauthenticated_sources_match_only_plain_text_clients() {
    let a = authz(serde_json::json!([{"name": "a/b", "defaultAction": "deny",
        "rules": [{"action": "allow", "from": [{"unauthenticated": true}],
                   "to": [{"paths": [{"exact": "/healthz"}]}]}]}]));
    assert!(allowed(&a, None, 80, Method::GET, "/healthz"));
    assert!(!allowed(&a, Some(WEB), 80, Method::GET, "/healthz"));
    assert!(!allowed(&a, None, 80, Method::GET, "/"));
}

#[test]
fn normalization_bypasses_get_through_zero_times() {
    let a = shop();
    let attempts = [
        "/admin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/%61%64%6D%69%6E",
        "/admin/..",
        "/admin/../admin",
        "/x/../admin",
        "/api/../admin",
        "/api/..%2F../admin",
        "///admin//users",
        "/admin/./users",
        "/%2e/admin",
        "/%2E%2E/admin",
        "/admin/",
        "/admin;x",
        "/ADMIN",
        "/Admin/users",
        "/%41DMIN",
        "//ADMIN/./x",
    ];
    let mut bypasses = Vec::new();
    for path in attempts {
        let normal = normalize_path(path);
        // Every spelling that means /admin (or below) must meet the deny rule; the one
        // that means something else must not be allowed by the /api rule either.
        let lower = normal.to_ascii_lowercase();
        // An application may treat paths without regard to case: /ADMIN counts as /admin.
        if allowed(&a, Some(WEB), 8080, Method::GET, path)
            && (lower == "/admin" || lower.starts_with("/admin/"))
        {
            bypasses.push(path);
        }
    }
    assert_eq!(bypasses, Vec::<&str>::new(), "bypasses");
    // `/admin/..` is the root, which no rule allows: denied by the default.
    assert!(!allowed(&a, Some(WEB), 8080, Method::GET, "/admin/.."));
    // `%2F` is data, not a separator (docs/policy.md says so): `..%2F..` is one segment
    // under /api, which is what the proxy judges and what the application receives.
    assert_eq!(normalize_path("/api/..%2F../admin"), "/api/..%2F../admin");
    // A deny rule meets every case of its paths, even where nothing else would deny.
    let open = authz(serde_json::json!([{"name": "a/b", "defaultAction": "allow",
    "rules": [
        {"action": "deny", "to": [{"paths": [{"exact": "/admin"}]}]},
        {"action": "deny", "to": [{"paths": [{"prefix": "/Internal"}]}]},
        {"action": "deny", "to": [{"paths": [{"regex": "/debug/[a-z]+"}]}]}
    ]}]));
    for path in [
        "/admin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/x/../admin",
        "/ADMIN",
        "/aDmIn",
        "/internal/x",
        "/INTERNAL",
        "/Debug/Vars",
        "/DEBUG/pprof",
    ] {
        assert_eq!(
            http(&open, Some(WEB), 80, Method::GET, path),
            deny("a/b"),
            "{path}"
        );
    }
    for path in ["/admins", "/internals", "/debug/", "/debug/x1"] {
        assert!(allowed(&open, Some(WEB), 80, Method::GET, path), "{path}");
    }
    // An allow rule opens exactly what it names: /API is not /api.
    assert!(allowed(&a, Some(WEB), 8080, Method::GET, "/api/orders"));
    assert_eq!(
        http(&a, Some(WEB), 8080, Method::GET, "/API/orders"),
        deny("shop/api")
    );
}

#[test]
fn opaque_connections_meet_ports_and_clients_only() {
    let a = authz(
        serde_json::json!([{"name": "db/pg", "defaultAction": "deny",
        "rules": [
            {"action": "allow", "from": [{"identities": [WEB]}], "to": [{"ports": [5432]}]},
            {"action": "allow", "from": [{"identities": [CART]}],
             "to": [{"ports": [5432], "paths": [{"prefix": "/"}]}]},
            {"action": "deny", "from": [{"identities": [PROM]}],
             "to": [{"methods": ["GET"]}]}
        ]}]),
    );
    assert_eq!(tcp(&a, Some(WEB), 5432), Verdict::Allow);
    assert_eq!(tcp(&a, Some(WEB), 5433), deny("db/pg"));
    // An allow rule with HTTP-only conditions does not open an opaque port...
    assert_eq!(tcp(&a, Some(CART), 5432), deny("db/pg"));
    // ...and a deny rule ignores them: fail closed.
    let b = authz(
        serde_json::json!([{"name": "db/pg", "defaultAction": "allow",
        "rules": [{"action": "deny", "from": [{"identities": [PROM]}],
                   "to": [{"methods": ["GET"]}]}]}]),
    );
    assert_eq!(tcp(&b, Some(PROM), 5432), deny("db/pg"));
    assert_eq!(tcp(&b, Some(WEB), 5432), Verdict::Allow);
}

#[test]
fn dry_run_policies_report_and_never_decide() {
    let a = authz(serde_json::json!([
        {"name": "shop/trial", "defaultAction": "deny", "dryRun": true,
         "rules": [{"action": "allow", "from": [{"identities": [WEB]}]},
                   {"action": "deny", "to": [{"paths": [{"prefix": "/admin"}]}]}]},
        {"name": "shop/live", "defaultAction": "allow",
         "rules": [{"action": "deny", "from": [{"unauthenticated": true}]}]}
    ]));
    assert_eq!(http(&a, Some(WEB), 80, Method::GET, "/"), Verdict::Allow);
    assert_eq!(
        http(&a, Some(CART), 80, Method::GET, "/"),
        Verdict::DryRunDeny {
            policy: "shop/trial".into()
        }
    );
    assert_eq!(
        http(&a, Some(WEB), 80, Method::GET, "/admin"),
        Verdict::DryRunDeny {
            policy: "shop/trial".into()
        }
    );
    // An enforcing denial is a denial, whatever the dry run says.
    assert_eq!(http(&a, None, 80, Method::GET, "/"), deny("shop/live"));
    // A dry-run allow does not lift an enforcing default deny.
    let b = authz(serde_json::json!([
        {"name": "x/closed", "defaultAction": "deny"},
        {"name": "x/trial", "defaultAction": "allow", "dryRun": true,
         "rules": [{"action": "allow", "from": [{"identities": [WEB]}]}]}
    ]));
    assert_eq!(http(&b, Some(WEB), 80, Method::GET, "/"), deny("x/closed"));
}

#[test]
fn bad_policies_are_refused_naming_each_field() {
    let p = problems(serde_json::json!([
        {"name": "a/b", "defaultAction": "deny", "rules": [
            {"action": "allow", "from": [
                {},
                {"identities": ["cluster.local/ns/a/sa/b", "spiffe://td/ns/a/sa/"]},
                {"identityPrefixes": ["spiffe://td/ns/shop", "spiffe://td"]}
            ]},
            {"action": "deny", "to": [{"ports": [0], "methods": ["get"],
                                       "paths": [{"regex": "(unclosed"}, {"exact": "admin"}]}]}
        ]},
        {"name": "a/b", "defaultAction": "allow"}
    ]));
    let want = [
        "inbound.authorization[0].rules[0].from[0]: matches no client",
        "inbound.authorization[0].rules[0].from[1].identities[0]",
        "inbound.authorization[0].rules[0].from[1].identities[1]",
        "inbound.authorization[0].rules[0].from[2].identityPrefixes[0]",
        "inbound.authorization[0].rules[0].from[2].identityPrefixes[1]",
        "inbound.authorization[0].rules[1].to[0].ports",
        "inbound.authorization[0].rules[1].to[0].paths[0].regex",
        "inbound.authorization[0].rules[1].to[0].paths[1].exact",
        "inbound.authorization[0].rules[1].to[0].methods[0]",
        "inbound.authorization[1].name",
    ];
    for w in want {
        assert!(p.iter().any(|p| p.starts_with(w)), "{w}: {p:#?}");
    }
    assert_eq!(p.len(), want.len(), "{p:#?}");
}

#[test]
fn strict_refuses_only_clients_without_an_identity() {
    assert!(mtls_refuses(MtlsMode::Strict, None));
    assert!(!mtls_refuses(MtlsMode::Strict, Some(WEB)));
    assert!(!mtls_refuses(MtlsMode::Permissive, None));
    assert!(!mtls_refuses(MtlsMode::Disabled, None));
}
