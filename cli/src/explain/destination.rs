//! The destination's side of `explain`: what the proxy of the pod a request reaches
//! decides — mutual TLS, authorization (every Policy selecting the pod), the rate limit —
//! computed by the proxy's own code (`weft_proxy::authz`) on that proxy's active config.
//!
//! ```text
//! client proxy /config: its certificate, the endpoint's expected identity ─┐
//! destination proxy /config: inbound { mtls, authorization, rateLimit } ────┼─▶ Decision
//! the request as it leaves the client (rewritten path, method, port) ──────┘
//! ```

use http::Method;
use serde::Serialize;
use weft_api::traffic::{MtlsMode, RateLimitPer};
use weft_proxy::authz::{Authorizer, Subject, Verdict, mtls_refuses, normal_path};

use super::ConfigDump;

/// How the request arrives at the destination, as the client's proxy sends it.
#[derive(Clone, Debug)]
pub struct Reach {
    /// The path after the client's rewrite.
    pub path: String,
    /// The method.
    pub method: Method,
    /// The endpoint's (workload) port, the port authorization rules name.
    pub port: Option<u16>,
    /// The identity the client expects of the endpoint; `None`: the client does not
    /// originate mutual TLS to it (unmeshed, or its Policy disables mTLS).
    pub endpoint_identity: Option<String>,
}

/// Where the destination's config came from, or why it was not read.
#[derive(Debug)]
pub enum DestinationView {
    /// Pod `namespace/name`'s proxy's active config.
    Read {
        /// `namespace/name`.
        pod: String,
        /// Its `/config`.
        dump: Box<ConfigDump>,
    },
    /// Not read, and why.
    NotRead(String),
}

/// The destination proxy's decision for one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// `namespace/name` of the destination pod.
    pub pod: String,
    /// Its proxy's config version.
    pub config_version: String,
    /// The client's mesh identity as the destination sees it; `None`: unauthenticated.
    pub client_identity: Option<String>,
    /// `strict`, `permissive` or `disabled` (the destination's inbound mode).
    pub mtls_mode: String,
    /// The Policies whose authorization applies there, in config order.
    pub policies: Vec<String>,
    /// `allowed` or `refused`.
    pub verdict: String,
    /// The status a refused request is answered with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The `weft-error` reason of a refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The Policy that refused (or, allowed, the dry-run one that would have).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Whether `policy` is a dry run: counted and logged, not enforced.
    pub dry_run: bool,
    /// The rate limit in force, described (`None`: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// The explanation, one line per stage.
    pub lines: Vec<String>,
}

fn mode_name(m: MtlsMode) -> &'static str {
    match m {
        MtlsMode::Strict => "strict",
        MtlsMode::Permissive => "permissive",
        MtlsMode::Disabled => "disabled",
    }
}

/// Decides as the destination's proxy would; `Err` when its config does not validate with
/// this CLI's proxy code.
pub fn decide(
    source: &ConfigDump,
    pod: &str,
    dest: &ConfigDump,
    reach: &Reach,
) -> Result<Decision, String> {
    let mut lines = vec![format!("pod {pod} (proxy config version {})", dest.version)];
    let source_id = source.identity.as_ref().and_then(|i| i.identity.clone());
    let dest_id = dest.identity.as_ref().and_then(|i| i.identity.clone());
    let inbound = dest.config.inbound.clone().unwrap_or_default();
    let mode = inbound.mtls.unwrap_or_default();
    let mut refused: Option<(u16, &str, Option<String>, String)> = None;
    // The client originates mutual TLS when it holds a certificate and the endpoint
    // carries an identity (the operator leaves it out for unmeshed pods and Disabled).
    let tls = source_id.is_some() && reach.endpoint_identity.is_some();
    let client_identity = if tls { source_id.clone() } else { None };
    lines.push(match (&source_id, &reach.endpoint_identity) {
        (Some(me), Some(them)) => {
            format!("transport: mutual TLS, the client as {me}, expecting {them}")
        }
        (None, _) => "transport: plain text (the client's proxy holds no mesh certificate): the client is unauthenticated".to_owned(),
        (Some(_), None) => "transport: plain text (the endpoint carries no identity: unmeshed, or its Policy disables mTLS): the client is unauthenticated".to_owned(),
    });
    if tls && dest_id.is_none() {
        refused = Some((
            502,
            "tls_handshake_failed",
            None,
            "the destination's proxy holds no certificate, so the client's mutual TLS handshake fails".to_owned(),
        ));
    }
    let set_by = if inbound.mtls.is_some() {
        "set by a Policy"
    } else {
        "the default: no Policy sets one"
    };
    lines.push(format!("mTLS mode {} ({set_by})", mode_name(mode)));
    if refused.is_none() && mode == MtlsMode::Strict && dest_id.is_none() {
        refused = Some((403, "mtls_required", None, "Strict, and the destination's proxy holds no certificate to terminate mutual TLS: every client is refused".to_owned()));
    } else if refused.is_none() && mtls_refuses(mode, client_identity.as_deref()) {
        refused = Some((
            403,
            "mtls_required",
            None,
            "Strict refuses plain text".to_owned(),
        ));
    }
    let authz =
        Authorizer::from_wire(&inbound.authorization, "inbound.authorization").map_err(|p| {
            format!(
                "the destination's authorization does not validate with this CLI's proxy code: {}",
                p.join("; ")
            )
        })?;
    let policies: Vec<String> = authz.names().map(str::to_owned).collect();
    let path = normal_path(&reach.path).into_owned();
    let verdict = authz.decide(&Subject {
        identity: client_identity.as_deref(),
        port: reach.port.unwrap_or(0),
        http: Some((&path, &reach.method)),
    });
    let mut dry_run = false;
    let mut policy = None;
    if policies.is_empty() {
        lines
            .push("authorization: no Policy selects this pod: every request is allowed".to_owned());
    } else {
        let which = format!("Policy {}", policies.join(", Policy "));
        match &verdict {
            Verdict::Allow => lines.push(format!(
                "authorization ({which}): ALLOWED for {} {path} on port {}",
                reach.method,
                reach.port.map_or("?".to_owned(), |p| p.to_string())
            )),
            Verdict::Deny { policy: p } => {
                lines.push(format!("authorization ({which}): DENIED by Policy {p}"));
                policy = Some(p.to_string());
                if refused.is_none() {
                    refused = Some((
                        403,
                        "forbidden",
                        Some(p.to_string()),
                        format!("denied by Policy {p}"),
                    ));
                }
            }
            Verdict::DryRunDeny { policy: p } => {
                lines.push(format!(
                    "authorization ({which}): allowed, but dry-run Policy {p} would deny it (counted and logged)"
                ));
                policy = Some(p.to_string());
                dry_run = true;
            }
        }
    }
    let rate_limit = inbound.rate_limit.as_ref().map(|r| {
        format!(
            "Policy {}: {} requests/s, burst {}, {}{}",
            r.name,
            r.requests_per_second,
            r.burst,
            match r.per {
                RateLimitPer::Workload => "one bucket for the workload",
                RateLimitPer::Client => "one bucket per client",
            },
            if r.dry_run {
                " (DRY RUN: counted, not refused)"
            } else {
                ""
            }
        )
    });
    match &rate_limit {
        Some(r) => lines.push(format!(
            "rate limit {r}; a request over it is answered 429 (weft-error: rate_limited): whether this one is depends on the traffic of the moment"
        )),
        None => lines.push("rate limit: none".to_owned()),
    }
    let (verdict, status, reason) = match &refused {
        Some((status, reason, p, why)) => {
            lines.push(format!(
                "verdict: REFUSED, {status} (weft-error: {reason}): {why}"
            ));
            if p.is_some() {
                policy.clone_from(p);
            }
            ("refused", Some(*status), Some((*reason).to_owned()))
        }
        None => {
            lines.push("verdict: allowed, on to the application".to_owned());
            ("allowed", None, None)
        }
    };
    Ok(Decision {
        pod: pod.to_owned(),
        config_version: dest.version.clone(),
        client_identity,
        mtls_mode: mode_name(mode).to_owned(),
        policies,
        verdict: verdict.to_owned(),
        status,
        reason,
        policy,
        dry_run,
        rate_limit,
        lines,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn dump(identity: Option<&str>, inbound: serde_json::Value) -> ConfigDump {
        serde_json::from_value(json!({
            "version": "7", "generation": 1,
            "identity": identity.map(|i| json!({"identity": i})),
            "config": {"apiVersion": "weft.dev/proxy/v1alpha1", "kind": "ProxyConfig", "services": [], "inbound": inbound}
        }))
        .unwrap()
    }

    fn reach(path: &str, identity: Option<&str>) -> Reach {
        Reach {
            path: path.to_owned(),
            method: Method::GET,
            port: Some(8080),
            endpoint_identity: identity.map(str::to_owned),
        }
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn deny_admin() -> serde_json::Value {
        json!({"authorization": [{"name": "shop/web", "defaultAction": "allow",
            "rules": [{"action": "deny", "to": [{"paths": [{"prefix": "/admin"}]}]}]}]})
    }

    #[test]
    fn a_deny_rule_refuses_its_paths_and_allows_the_rest() {
        let (src, dst) = (dump(Some(CLIENT), json!({})), dump(Some(WEB), deny_admin()));
        let d = decide(&src, "shop/web-0", &dst, &reach("/admin/users", Some(WEB))).unwrap();
        assert_eq!(
            (
                d.verdict.as_str(),
                d.status,
                d.reason.as_deref(),
                d.policy.as_deref()
            ),
            ("refused", Some(403), Some("forbidden"), Some("shop/web"))
        );
        assert_eq!(d.client_identity.as_deref(), Some(CLIENT));
        // The proxy's path normalization applies: `//admin/./x` is `/admin/x`.
        let d = decide(&src, "shop/web-0", &dst, &reach("//admin/./x", Some(WEB))).unwrap();
        assert_eq!(d.verdict, "refused");
        let d = decide(&src, "shop/web-0", &dst, &reach("/api", Some(WEB))).unwrap();
        assert_eq!(d.verdict, "allowed", "{d:#?}");
    }

    #[test]
    fn strict_refuses_plain_text_and_a_proxy_without_a_certificate_refuses_all() {
        let strict = json!({"mtls": "strict"});
        // The client has no certificate: plain text, refused.
        let d = decide(
            &dump(None, json!({})),
            "shop/web-0",
            &dump(Some(WEB), strict.clone()),
            &reach("/", Some(WEB)),
        )
        .unwrap();
        assert_eq!(
            (d.status, d.reason.as_deref()),
            (Some(403), Some("mtls_required"))
        );
        assert!(d.lines[1].starts_with("transport: plain text"), "{d:#?}");
        // Both have certificates: mutual TLS, allowed.
        let d = decide(
            &dump(Some(CLIENT), json!({})),
            "shop/web-0",
            &dump(Some(WEB), strict.clone()),
            &reach("/", Some(WEB)),
        )
        .unwrap();
        assert_eq!(d.verdict, "allowed", "{d:#?}");
        assert_eq!(d.mtls_mode, "strict");
        // The destination holds no certificate.
        let d = decide(
            &dump(None, json!({})),
            "shop/web-0",
            &dump(None, strict),
            &reach("/", None),
        )
        .unwrap();
        assert_eq!(d.reason.as_deref(), Some("mtls_required"));
        assert!(
            d.lines.last().unwrap().contains("every client is refused"),
            "{d:#?}"
        );
    }

    #[test]
    fn a_dry_run_policy_allows_and_says_it_would_deny_and_the_rate_limit_is_named() {
        let inbound = json!({
            "authorization": [{"name": "shop/audit", "defaultAction": "deny", "dryRun": true}],
            "rateLimit": {"name": "shop/limit", "requestsPerSecond": 5, "burst": 10, "per": "client"}
        });
        let d = decide(
            &dump(None, json!({})),
            "shop/web-0",
            &dump(None, inbound),
            &reach("/", None),
        )
        .unwrap();
        assert_eq!(d.verdict, "allowed");
        assert!(d.dry_run);
        assert_eq!(d.policy.as_deref(), Some("shop/audit"));
        assert_eq!(
            d.rate_limit.as_deref(),
            Some("Policy shop/limit: 5 requests/s, burst 10, one bucket per client")
        );
    }
}
