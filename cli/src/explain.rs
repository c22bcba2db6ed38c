//! `kubectl weft explain POD DESTINATION`: what that pod's proxy does with a request, step
//! by step, computed by the proxy's own code on the proxy's own active config, so it
//! explains what is enforced rather than what was intended.
//!
//! ```text
//! proxy /config (port-forward or --admin-url) ─▶ weft_proxy::config::Config::validate
//!   DESTINATION, --method, --header, --path ─▶ MatchInput ─▶ Route::find (and each earlier
//!                                              rule's entries, condition by condition)
//! operator /proxies (optional) ─▶ is the proxy in sync, what it does not enforce
//! proxy /metrics ─▶ each Breaker's ejected endpoints and pool refusals now
//! destination pod's proxy /config (--to-pod, or by endpoint address) ─▶ destination::decide
//!   (mTLS mode, every Policy's authorization, the rate limit)
//! ```
//!
//! The proxy answers `/config` to loopback peers only (it names every service, endpoint
//! and identity of the pod's view of the mesh). The API server's pod proxy connects from the
//! API server's address, so it is refused; a `kubectl port-forward` connects inside the
//! pod's network namespace, from loopback, and is authorized by the caller's RBAC
//! (`pods/portforward`) like `kubectl exec`. So `explain` runs `kubectl port-forward` for the
//! moment it reads `/config`, or reads `--admin-url` when given one.

use std::fmt::Write as _;

use anyhow::{Context, anyhow, bail};
use destination::{Decision, DestinationView, Reach};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::Deserialize;
use weft_api::{
    proxy_config::{ProxyConfig, ServiceConfig},
    proxy_status::ProxyRow,
    traffic::{MatchConfig, PathMatchConfig, RuleConfig, ValueMatchKind},
};
use weft_proxy::{
    config::Config,
    route::{
        matching::{MatchInput, RequestMatch},
        normalize::normalize_path,
    },
};

pub mod destination;

/// Flags of `kubectl weft explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The meshed pod whose proxy sends the request.
    pub pod: String,
    /// Where the request goes: a Service (`web`, `web.shop`, `web.shop.svc.cluster.local`),
    /// `host:port`, `ip:port`, or a URL (`http://web.shop/api?x=1`).
    pub destination: String,
    /// The pod's namespace (also the Service's, unless the destination names one).
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// The request's method.
    #[arg(short = 'X', long, default_value = "GET")]
    pub method: String,
    /// A request header, `name=value` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// The request's path (and query); overrides a URL's.
    #[arg(long)]
    pub path: Option<String>,
    /// The proxies' admin port.
    #[arg(long, default_value_t = 15021)]
    pub admin_port: u16,
    /// Read the proxy's `/config` from here (`http://127.0.0.1:PORT`, an existing
    /// port-forward) instead of running `kubectl port-forward`.
    #[arg(long)]
    pub admin_url: Option<String>,
    /// The operator's namespace (for its view of the proxy: in sync, enforced).
    #[arg(long, default_value = "weft-system")]
    pub operator_namespace: String,
    /// The operator's Service and admin port name, through the API server's service proxy.
    #[arg(long, default_value = crate::admin::DEFAULT_OPERATOR_SERVICE)]
    pub operator_service: String,
    /// Read the operator's admin endpoint directly (`http://host:port`) instead.
    #[arg(long)]
    pub operator_url: Option<String>,
    /// The destination pod whose proxy decides (mTLS, Policy, rate limit), in the
    /// destination's namespace (default: the pod whose address is the service's first
    /// endpoint, when one is found).
    #[arg(long, value_name = "POD")]
    pub to_pod: Option<String>,
    /// Read the destination proxy's `/config` from here (`http://127.0.0.1:PORT`) instead
    /// of running `kubectl port-forward`.
    #[arg(long, value_name = "URL")]
    pub to_admin_url: Option<String>,
    /// `text` or `json`.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: crate::check::Output,
}

/// The proxy's own certificate, as `/config` reports it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct IdentityDump {
    /// Its SPIFFE ID; `None` while the proxy holds no certificate.
    pub identity: Option<String>,
    /// Why it holds none.
    #[serde(default)]
    pub error: Option<String>,
}

/// `/config` as the proxy's admin serves it.
#[derive(Debug, Deserialize)]
pub struct ConfigDump {
    /// The version shown to users.
    pub version: String,
    /// How many configs this proxy process has accepted.
    pub generation: u64,
    /// The active config, as received.
    pub config: ProxyConfig,
    /// The proxy's certificate; `None` when identity is off (no `--identity-addr`).
    #[serde(default)]
    pub identity: Option<IdentityDump>,
}

/// The request to explain.
#[derive(Debug, Clone)]
pub struct Request {
    /// The destination host (name or IP) as given.
    pub host: String,
    /// The port, if given.
    pub port: Option<u16>,
    /// The method.
    pub method: Method,
    /// The headers.
    pub headers: HeaderMap,
    /// The path, as sent.
    pub path: String,
    /// The query, without `?`.
    pub query: Option<String>,
}

impl Request {
    /// Builds the request from the command line.
    pub fn from_args(
        destination: &str,
        method: &str,
        headers: &[String],
        path: Option<&str>,
    ) -> anyhow::Result<Request> {
        let rest = destination
            .strip_prefix("http://")
            .or_else(|| destination.strip_prefix("https://"))
            .unwrap_or(destination);
        let (authority, url_path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port = p
                    .parse()
                    .map_err(|_| anyhow!("{destination}: bad port {p}"))?;
                (h.trim_start_matches('[').trim_end_matches(']'), Some(port))
            }
            _ => (authority, None),
        };
        if host.is_empty() {
            bail!("{destination}: no host");
        }
        let target = path.unwrap_or(url_path);
        let target = if target.starts_with('/') {
            target.to_owned()
        } else {
            format!("/{target}")
        };
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (target, None),
        };
        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| anyhow!("bad method {method}"))?;
        let mut map = HeaderMap::new();
        for h in headers {
            let (k, v) = h
                .split_once('=')
                .or_else(|| h.split_once(':'))
                .ok_or_else(|| anyhow!("--header {h}: expected NAME=VALUE"))?;
            map.append(
                HeaderName::from_bytes(k.trim().as_bytes())
                    .map_err(|_| anyhow!("--header {h}: bad name"))?,
                HeaderValue::from_str(v.trim()).map_err(|_| anyhow!("--header {h}: bad value"))?,
            );
        }
        Ok(Request {
            host: host.to_owned(),
            port,
            method,
            headers: map,
            path,
            query,
        })
    }
}

/// The namespace of the operator's config of meshed pods that no Service lists
/// (`pods.<ns>` or `pods.<ns>.opaque`), if `name` is one.
fn pods_config_namespace(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(weft_api::proxy_config::PODS_CONFIG_PREFIX)?;
    let ns = rest.strip_suffix(".opaque").unwrap_or(rest);
    (!ns.contains('.')).then_some(ns)
}

/// The index of the service the proxy sends `req` to, and how it was found; `Err` says
/// why none.
pub fn resolve(
    cfg: &Config,
    raw: &ProxyConfig,
    namespace: &str,
    req: &Request,
) -> Result<(usize, String), String> {
    if let Ok(ip) = req.host.parse::<std::net::IpAddr>() {
        let port = req.port.unwrap_or(80);
        let addr = std::net::SocketAddr::new(ip, port);
        return match cfg.service_for_addr(addr) {
            Some((i, _)) => Ok((i, format!("cluster address {addr} belongs to it"))),
            None => Err(
                match cfg
                    .meshed_endpoint(addr)
                    .and_then(|(i, j)| cfg.services.get(i).map(|s| (s, s.endpoints.get(j))))
                {
                    Some((svc, endpoint)) => format!(
                        "no service of this proxy claims {addr}, but it is {} (identity {}): the connection goes to that pod alone, over mutual TLS when this proxy holds a certificate, {}, without Route, balancing, retries or Breaker",
                        match pods_config_namespace(&svc.name) {
                            Some(ns) => format!(
                                "a meshed pod of namespace {ns} declaring port {port}, which no Service lists"
                            ),
                            None => format!("a meshed endpoint of service {}", svc.name),
                        },
                        endpoint.and_then(|e| e.identity.as_deref()).unwrap_or("-"),
                        if svc.opaque || cfg.is_opaque_port(port) {
                            "as opaque TCP"
                        } else {
                            "HTTP detected as for that service"
                        }
                    ),
                    None => format!(
                        "no service of this proxy claims {addr}: the request is passed through to {addr} as is (label `passthrough`), without Route, retries or Breaker"
                    ),
                },
            ),
        };
    }
    let host = req
        .host
        .trim_end_matches('.')
        .trim_end_matches(".cluster.local")
        .trim_end_matches(".svc");
    let (name, ns) = host.split_once('.').unwrap_or((host, namespace));
    let base = format!("{name}.{ns}");
    let candidates: Vec<usize> = raw
        .services
        .iter()
        .enumerate()
        .filter(|(_, s)| pods_config_namespace(&s.name).is_none())
        .filter(|(_, s)| match req.port {
            Some(p) => s.name == format!("{base}.{p}"),
            None => {
                s.name == base
                    || s.name
                        .strip_prefix(&format!("{base}."))
                        .is_some_and(|p| p.parse::<u16>().is_ok())
            }
        })
        .map(|(i, _)| i)
        .collect();
    match candidates.as_slice() {
        [i] if raw.services[*i].addresses.is_empty() => Err(format!(
            "Service {ns}/{name} is headless: its name resolves to pod addresses, which the application dials itself, without balancing, Route, retries or Breaker; give one pod's address as the host to see how it is reached"
        )),
        [i] => Ok((
            *i,
            format!(
                "Service {ns}/{name}{}",
                req.port.map(|p| format!(" port {p}")).unwrap_or_default()
            ),
        )),
        [] => Err(format!(
            "this proxy's config has no service {base}{}: the Service does not exist, or the operator does not send it to this pod (a DNS name it cannot resolve fails in the application; a cluster IP it does not know is passed through)",
            req.port.map(|p| format!(" port {p}")).unwrap_or_default()
        )),
        many => Err(format!(
            "{base} has {} ports in this proxy's config ({}): give one, as {base}:PORT",
            many.len(),
            many.iter()
                .map(|i| raw.services[*i].name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn describe_path(p: &PathMatchConfig) -> String {
    match p {
        PathMatchConfig::Exact(v) => format!("path = {v}"),
        PathMatchConfig::Prefix(v) => format!("path prefix {v}"),
        PathMatchConfig::Regex(v) => format!("path ~ /{v}/"),
    }
}

/// Each condition of a match entry, described, with whether the proxy's matcher says the
/// request meets it. Each is compiled alone by the proxy's own `RequestMatch::from_wire`.
fn conditions(m: &MatchConfig, input: &MatchInput<'_>) -> Vec<(String, bool)> {
    let one =
        |c: MatchConfig| RequestMatch::from_wire(&c, "match").is_ok_and(|rm| rm.matches(input));
    let mut out = Vec::new();
    if let Some(p) = &m.path {
        out.push((
            describe_path(p),
            one(MatchConfig {
                path: Some(p.clone()),
                ..MatchConfig::default()
            }),
        ));
    }
    if let Some(me) = &m.method {
        out.push((
            format!("method {me}"),
            one(MatchConfig {
                method: Some(me.clone()),
                ..MatchConfig::default()
            }),
        ));
    }
    for h in &m.headers {
        let op = if h.kind == ValueMatchKind::Regex {
            "~"
        } else {
            "="
        };
        out.push((
            format!("header {} {op} {}", h.name, h.value),
            one(MatchConfig {
                headers: vec![h.clone()],
                ..MatchConfig::default()
            }),
        ));
    }
    for q in &m.query_params {
        let op = if q.kind == ValueMatchKind::Regex {
            "~"
        } else {
            "="
        };
        out.push((
            format!("query {} {op} {}", q.name, q.value),
            one(MatchConfig {
                query_params: vec![q.clone()],
                ..MatchConfig::default()
            }),
        ));
    }
    out
}

fn rule_name(r: &RuleConfig, i: usize) -> String {
    r.name.clone().unwrap_or_else(|| i.to_string())
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// What the operator says of the proxy, if it could be asked.
pub type OperatorView = Result<Option<ProxyRow>, String>;

/// The source proxy's counters (its `/metrics`), for live breaker state; `Err` says why
/// they were not read.
pub type Metrics = Result<Vec<crate::prom::Sample>, String>;

/// What `explain` found: the text, and the destination's decision when it was computed.
#[derive(Debug)]
pub struct Explanation {
    /// The explanation, one numbered step per stage.
    pub text: String,
    /// The destination proxy's decision (mTLS, authorization, rate limit).
    pub destination: Option<Decision>,
}

/// The explanation: one numbered step per stage a request meets, ending with what the
/// destination's proxy decides when `dest` was read.
pub fn explain(
    pod: &str,
    namespace: &str,
    dump: &ConfigDump,
    req: &Request,
    operator: &OperatorView,
    dest: &DestinationView,
    live: &Metrics,
) -> Result<Explanation, String> {
    let mut decision = None;
    let text = explain_text(
        pod,
        namespace,
        dump,
        req,
        operator,
        live,
        &mut |w, step, reach| {
            let _ = writeln!(w, "{step}. at the destination");
            match dest {
                DestinationView::NotRead(why) => {
                    let _ = writeln!(
                        w,
                        "   not read ({why}): what its Policy decides is not shown"
                    );
                }
                DestinationView::Read { pod, dump: d } => {
                    match destination::decide(dump, pod, d, reach) {
                        Ok(dec) => {
                            for l in &dec.lines {
                                let _ = writeln!(w, "   {l}");
                            }
                            decision = Some(dec);
                        }
                        Err(e) => {
                            let _ = writeln!(w, "   {e}");
                        }
                    }
                }
            }
        },
    )?;
    Ok(Explanation {
        text,
        destination: decision,
    })
}

/// A destination step writer: given the output, the step number and how the request
/// reaches the destination.
type DestinationStep<'a> = dyn FnMut(&mut String, usize, &Reach) + 'a;

fn explain_text(
    pod: &str,
    namespace: &str,
    dump: &ConfigDump,
    req: &Request,
    operator: &OperatorView,
    live: &Metrics,
    at_destination: &mut DestinationStep<'_>,
) -> Result<String, String> {
    let cfg = Config::validate(&dump.config).map_err(|e| format!("the proxy's active config does not validate with this CLI's proxy code (versions differ?): {e}"))?;
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(
        w,
        "{} {}{} from pod {namespace}/{pod}",
        req.method,
        req.host,
        req.port.map(|p| format!(":{p}")).unwrap_or_default()
    );
    let _ = writeln!(
        w,
        "  path {}{}",
        req.path,
        req.query
            .as_ref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        w,
        "proxy config version {} (generation {} of this proxy process)",
        dump.version, dump.generation
    );
    match operator {
        Ok(Some(row)) => {
            let v = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
            let state = if !row.connected {
                "DISCONNECTED from the operator: it runs its last good config"
            } else if row.rejected.is_some() {
                "REJECTED the operator's latest version: it runs its last good config"
            } else if row.in_sync {
                "in sync"
            } else {
                "STALE: it has not acknowledged the operator's latest version"
            };
            let _ = writeln!(
                w,
                "operator: acked version {}, desired {}: {state}",
                v(row.acked_version),
                v(row.desired_version)
            );
            if let Some(r) = &row.rejected {
                let _ = writeln!(w, "  rejected: {r}");
            }
            match &row.not_enforced {
                Some(list) if !list.is_empty() => {
                    for r in list {
                        let _ = writeln!(
                            w,
                            "  NOT PROGRAMMED on this proxy: {r} (the proxy lacks a feature it needs; see proxy-status)"
                        );
                    }
                }
                Some(_) => {}
                None => {
                    let _ = writeln!(w, "  the proxy does not report what it enforces");
                }
            }
        }
        Ok(None) => {
            let _ = writeln!(w, "operator: does not know this proxy (not connected)");
        }
        Err(e) => {
            let _ = writeln!(
                w,
                "operator: not asked ({e}); whether resources are Programmed here is unknown"
            );
        }
    }
    let step = std::cell::Cell::new(0usize);
    let mut next = |w: &mut String, title: &str| {
        step.set(step.get() + 1);
        let _ = writeln!(w, "{}. {title}", step.get());
    };
    next(w, "destination");
    let (i, why) = match resolve(&cfg, &dump.config, namespace, req) {
        Ok(found) => found,
        Err(why) => {
            let _ = writeln!(w, "   {why}");
            return Ok(o);
        }
    };
    let svc: &ServiceConfig = &dump.config.services[i];
    let _ = writeln!(w, "   service {} ({why})", svc.name);
    let _ = writeln!(
        w,
        "   addresses {}; protocol {}; balancer {}; {} endpoint(s)",
        if svc.addresses.is_empty() {
            "-".to_owned()
        } else {
            svc.addresses.join(", ")
        },
        json(&svc.protocol).trim_matches('"'),
        json(&svc.balancer).trim_matches('"'),
        svc.endpoints.len()
    );
    if svc.protocol == weft_api::proxy_config::Protocol::Opaque {
        let _ = writeln!(
            w,
            "   opaque: connections are forwarded as TCP; no HTTP stage below applies"
        );
        return Ok(o);
    }
    let normalized = normalize_path(&req.path).into_owned();
    let input = MatchInput {
        path: &normalized,
        query: req.query.as_deref(),
        method: &req.method,
        headers: &req.headers,
    };
    next(w, "route");
    let compiled = cfg.services[i].route.clone();
    if let (Some(route), Some(c)) = (&svc.route, &compiled) {
        let _ = writeln!(
            w,
            "   Route {} ({} rule(s)); path normalized to {normalized}",
            route.name,
            route.rules.len()
        );
        let found = c.find(&input);
        let chosen = found.map(|(_, rule, _)| &*rule.label);
        for (ri, r) in route.rules.iter().enumerate() {
            let name = rule_name(r, ri);
            if Some(name.as_str()) == chosen {
                match found.and_then(|(_, _, m)| m) {
                    None => {
                        let _ =
                            writeln!(w, "   rule {name}: MATCHES (no conditions: every request)");
                    }
                    Some(e) => {
                        let conds: Vec<String> = r
                            .matches
                            .get(e)
                            .map(|m| conditions(m, &input).into_iter().map(|(d, _)| d).collect())
                            .unwrap_or_default();
                        let _ = writeln!(
                            w,
                            "   rule {name}: MATCHES (entry {e}: {})",
                            if conds.is_empty() {
                                "no conditions".to_owned()
                            } else {
                                conds.join(", ")
                            }
                        );
                    }
                }
                let later = route.rules.len() - ri - 1;
                if later > 0 {
                    let _ = writeln!(
                        w,
                        "   ({later} later rule(s) not considered: the first match wins)"
                    );
                }
                let prefix = found.and_then(|(_, rule, m)| {
                    m.and_then(|m| rule.matches.get(m))
                        .and_then(|m| m.prefix().map(str::to_owned))
                });
                let rewrite = found
                    .and_then(|(_, rule, _)| rule.rewrite.as_ref())
                    .map(|rw| rw.apply(&normalized, prefix.as_deref()));
                let path = rewrite.clone().unwrap_or_else(|| normalized.clone());
                let first = rule_steps(
                    w,
                    &mut next,
                    Read {
                        raw: &dump.config,
                        live,
                    },
                    svc,
                    r,
                    &name,
                    rewrite,
                );
                let reach = reach_of(path, &req.method, first);
                at_destination(w, step.get() + 1, &reach);
                return Ok(o);
            }
            let _ = writeln!(w, "   rule {name}: no match");
            for (e, m) in r.matches.iter().enumerate() {
                let failed: Vec<String> = conditions(m, &input)
                    .into_iter()
                    .filter(|(_, ok)| !ok)
                    .map(|(d, _)| d)
                    .collect();
                let _ = writeln!(w, "     entry {e}: fails {}", failed.join(", "));
            }
        }
        // As the pipeline does: a request no rule takes goes on as if there were no Route.
        let _ = writeln!(
            w,
            "   no rule matches: the request goes to the service's own endpoints, as without a Route"
        );
    } else {
        let _ = writeln!(
            w,
            "   no Route: every request goes to the service's own endpoints"
        );
    }
    next(w, "timeouts and retries");
    let timeout = svc
        .timeout
        .as_ref()
        .map_or("none".to_owned(), ToString::to_string);
    let _ = writeln!(
        w,
        "   response timeout {timeout} (the service's); no retries without a Route"
    );
    let first = backends_and_breaker(
        w,
        &mut next,
        Read {
            raw: &dump.config,
            live,
        },
        svc,
        None,
    );
    let reach = reach_of(normalized, &req.method, first);
    at_destination(w, step.get() + 1, &reach);
    Ok(o)
}

/// How the request reaches its first endpoint (the port authorization sees, and the
/// identity the client expects there).
fn reach_of(path: String, method: &Method, first: Option<(String, Option<String>)>) -> Reach {
    let (port, endpoint_identity) = match first {
        Some((addr, id)) => (
            addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port()),
            id,
        ),
        None => (None, None),
    };
    Reach {
        path,
        method: method.clone(),
        port,
        endpoint_identity,
    }
}

/// The stages of the matched rule `r`, in the order a request meets them.
/// What the proxy said: its config, and its counters.
#[derive(Clone, Copy)]
struct Read<'a> {
    raw: &'a ProxyConfig,
    live: &'a Metrics,
}

fn rule_steps(
    w: &mut String,
    next: &mut impl FnMut(&mut String, &str),
    read: Read<'_>,
    svc: &ServiceConfig,
    r: &RuleConfig,
    name: &str,
    rewrite: Option<String>,
) -> Option<(String, Option<String>)> {
    if let Some(f) = &r.fault {
        next(w, "fault injection");
        if let Some(d) = &f.delay {
            let _ = writeln!(
                w,
                "   {}% of requests delayed {}",
                d.percentage, d.fixed_delay
            );
        }
        if let Some(a) = &f.abort {
            let _ = writeln!(
                w,
                "   {}% of requests answered {} by the proxy (weft-error: fault_injected), never sent",
                a.percentage, a.http_status
            );
        }
    }
    if rewrite.is_some() || r.request_headers.is_some() {
        next(w, "request edits");
        if let Some(to) = rewrite {
            let _ = writeln!(w, "   path rewritten to {to}");
        }
        if let Some(h) = &r.request_headers {
            edits(w, "request", h);
        }
    }
    next(w, "timeouts and retries");
    let t = r
        .timeout
        .as_ref()
        .or(svc.timeout.as_ref())
        .map_or("none".to_owned(), ToString::to_string);
    let _ = writeln!(
        w,
        "   timeout {t}{}; per try {}",
        if r.timeout.is_some() {
            " (rule)"
        } else {
            " (service)"
        },
        r.per_try_timeout
            .as_ref()
            .map_or("none".to_owned(), ToString::to_string)
    );
    match &r.retries {
        None => {
            let _ = writeln!(w, "   no retries (rule {name} sets none)");
        }
        Some(rt) => {
            let on: Vec<String> = rt
                .retry_on
                .iter()
                .map(|x| json(x).trim_matches('"').to_owned())
                .collect();
            let _ = writeln!(
                w,
                "   up to {} retries after the first attempt, on {}; backoff {}",
                rt.attempts,
                on.join(", "),
                rt.backoff.as_ref().map_or(
                    "the proxy's default (25ms to 250ms)".to_owned(),
                    |b| format!("{} to {}", b.base, b.max)
                )
            );
            let (budget, whose) = match (&rt.budget, &svc.retry_budget) {
                (Some(b), _) => (Some(b), "the rule's"),
                (None, Some(b)) => (Some(b), "the service's"),
                (None, None) => (None, "default"),
            };
            match budget {
                Some(b) => {
                    let _ = writeln!(
                        w,
                        "   retry budget ({whose}): {}% of requests + {}/s{}",
                        b.percent,
                        b.min_retries_per_second,
                        if b.dry_run {
                            ", DRY RUN: counted, not refused"
                        } else {
                            ""
                        }
                    );
                }
                None => {
                    let _ = writeln!(w, "   retry budget (default): 20% of requests + 10/s");
                }
            }
        }
    }
    let first = backends_and_breaker(w, next, read, svc, Some(r));
    if let Some(m) = &r.mirror {
        next(w, "mirror");
        let _ = writeln!(
            w,
            "   {}% of requests copied to {} (answers ignored)",
            m.percentage,
            m.service
                .as_deref()
                .unwrap_or("a Service that does not exist: nothing is sent")
        );
    }
    if let Some(h) = &r.response_headers {
        next(w, "response edits");
        edits(w, "response", h);
    }
    first
}

fn edits(w: &mut String, what: &str, h: &weft_api::traffic::HeaderEditsConfig) {
    for s in &h.set {
        let _ = writeln!(w, "   {what} header {} set to {}", s.name, s.value);
    }
    for a in &h.add {
        let _ = writeln!(w, "   {what} header {} added: {}", a.name, a.value);
    }
    for r in &h.remove {
        let _ = writeln!(w, "   {what} header {r} removed");
    }
}

fn backends_and_breaker(
    w: &mut String,
    next: &mut impl FnMut(&mut String, &str),
    read: Read<'_>,
    svc: &ServiceConfig,
    rule: Option<&RuleConfig>,
) -> Option<(String, Option<String>)> {
    let (raw, live) = (read.raw, read.live);
    next(w, "backends");
    // The services requests go to: the rule's backends, or the service itself.
    let mut targets: Vec<&ServiceConfig> = Vec::new();
    match rule.map(|r| &r.backends) {
        Some(b) if !b.is_empty() => {
            let total: u64 = b.iter().map(|b| u64::from(b.weight)).sum();
            for be in b {
                let share = if total == 0 {
                    0.0
                } else {
                    100.0 * f64::from(be.weight) / total as f64
                };
                match be
                    .service
                    .as_deref()
                    .and_then(|n| raw.services.iter().find(|s| s.name == n))
                {
                    Some(s) => {
                        let _ = writeln!(
                            w,
                            "   {}: weight {} ({share:.1}%), {} endpoint(s)",
                            s.name,
                            be.weight,
                            s.endpoints.len()
                        );
                        targets.push(s);
                    }
                    None => {
                        let _ = writeln!(
                            w,
                            "   {}: weight {} ({share:.1}%): does not exist, its share is answered 500 backend_not_found",
                            be.display
                                .as_deref()
                                .or(be.service.as_deref())
                                .unwrap_or("?"),
                            be.weight
                        );
                    }
                }
            }
        }
        _ => {
            let _ = writeln!(
                w,
                "   the service's own {} endpoint(s)",
                svc.endpoints.len()
            );
            targets.push(svc);
        }
    }
    for t in &targets {
        for e in &t.endpoints {
            let _ = writeln!(
                w,
                "   - {} {} weight {}{}",
                t.name,
                e.address,
                e.weight.unwrap_or(1),
                e.identity
                    .as_ref()
                    .map(|i| format!(" identity {i}"))
                    .unwrap_or_default()
            );
        }
    }
    next(w, "breaker");
    for t in &targets {
        match &t.breaker {
            None => {
                let _ = writeln!(w, "   {}: no Breaker", t.name);
            }
            Some(b) => {
                let _ = writeln!(
                    w,
                    "   {}: Breaker {}{}",
                    t.name,
                    b.name,
                    if b.dry_run {
                        " (DRY RUN: counted, never ejects or refuses)"
                    } else {
                        ""
                    }
                );
                if let Some(od) = &b.outlier_detection {
                    let _ = writeln!(w, "     outlier detection {}", json(od));
                }
                if let Some(cp) = &b.connection_pool {
                    let _ = writeln!(w, "     connection pool {}", json(cp));
                }
                breaker_live(w, live, &t.name, t.endpoints.len());
            }
        }
    }
    targets
        .iter()
        .flat_map(|t| t.endpoints.iter())
        .next()
        .map(|e| (e.address.clone(), e.identity.clone()))
}

/// The Breaker's state now, from the proxy's counters: how many endpoints outlier
/// detection has ejected, and what the pool limits refused. The proxy counts ejections
/// per service; which endpoints they are, it does not expose.
fn breaker_live(w: &mut String, live: &Metrics, service: &str, endpoints: usize) {
    let samples = match live {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(w, "     live state not read ({e})");
            return;
        }
    };
    let ejected = samples
        .iter()
        .find(|s| s.name == "weft_breaker_ejected_endpoints" && s.label("service") == service)
        .map_or(0.0, |s| s.value);
    let _ = writeln!(
        w,
        "     now: {ejected} of {endpoints} endpoint(s) ejected by outlier detection (which ones, the proxy does not expose)"
    );
    let refused: Vec<String> = samples
        .iter()
        .filter(|s| {
            s.name == "weft_breaker_overloaded_total"
                && s.label("service") == service
                && s.value > 0.0
        })
        .map(|s| format!("{}={}", s.label("limit"), s.value))
        .collect();
    if !refused.is_empty() {
        let _ = writeln!(
            w,
            "     refused by pool limits since the proxy started: {}",
            refused.join(", ")
        );
    }
}

/// Runs the command, printing the explanation to stdout.
pub async fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let req = Request::from_args(
        &args.destination,
        &args.method,
        &args.headers,
        args.path.as_deref(),
    )?;
    let [text, metrics] = read_admin(
        &args.namespace,
        &args.pod,
        args.admin_port,
        args.admin_url.as_deref(),
        ["/config", "/metrics"],
    )
    .await?;
    let text = text?;
    let dump: ConfigDump = serde_json::from_str(&text).context("the proxy's /config answer")?;
    let live: Metrics = metrics
        .map_err(|e| format!("{e:#}"))
        .and_then(|m| crate::prom::parse(&m).map_err(|e| e.to_string()));
    let pod_key = format!("{}/{}", args.namespace, args.pod);
    let operator: OperatorView = async {
        let rows = crate::proxy_status::fetch_from(
            &args.operator_namespace,
            &args.operator_service,
            args.operator_url.as_deref(),
        )
        .await?;
        anyhow::Ok(rows.into_iter().find(|r| r.pod == pod_key))
    }
    .await
    .map_err(|e| format!("{e:#}"));
    let dest = destination_view(&args, &dump, &req).await;
    let out = explain(
        &args.pod,
        &args.namespace,
        &dump,
        &req,
        &operator,
        &dest,
        &live,
    )
    .map_err(|e| anyhow!(e))?;
    let printed = match args.output {
        crate::check::Output::Text => out.text,
        crate::check::Output::Json => to_json(&args, &req, &dump, &out),
    };
    std::io::Write::write_all(&mut std::io::stdout(), printed.as_bytes())?;
    Ok(())
}

/// The namespace a destination host names: `shop` of `web.shop`, `web.shop.svc` or
/// `web.shop.svc.cluster.local`; none for a single name (`web`) or an IP address, which
/// say nothing of a namespace.
fn host_namespace(host: &str) -> Option<String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    host.trim_end_matches('.')
        .trim_end_matches(".cluster.local")
        .trim_end_matches(".svc")
        .split_once('.')
        .map(|(_, ns)| ns.to_owned())
}

/// The destination pod's proxy config: `--to-pod` (in the destination's namespace, or
/// the source's `-n` when the host does not name one, as an IP does), or
/// the pod whose address is the first endpoint of the service the request goes to.
async fn destination_view(args: &ExplainArgs, dump: &ConfigDump, req: &Request) -> DestinationView {
    let work = async {
        let host_ns = host_namespace(&req.host);
        let (ns, pod) = match &args.to_pod {
            Some(p) => (host_ns.unwrap_or_else(|| args.namespace.clone()), p.clone()),
            None => {
                let cfg = Config::validate(&dump.config).map_err(|e| anyhow!("{e}"))?;
                let (i, _) = resolve(&cfg, &dump.config, &args.namespace, req)
                    .map_err(|e| anyhow!("{e}"))?;
                let endpoint = dump.config.services[i]
                    .endpoints
                    .first()
                    .ok_or_else(|| anyhow!("the service has no endpoint"))?;
                let ip = endpoint
                    .address
                    .parse::<std::net::SocketAddr>()
                    .map(|a| a.ip().to_string())
                    .map_err(|_| anyhow!("endpoint address {}", endpoint.address))?;
                let client = kube::Client::try_default().await?;
                let pods = kube::Api::<k8s_openapi::api::core::v1::Pod>::all(client)
                    .list(&kube::api::ListParams::default().fields(&format!("status.podIP={ip}")))
                    .await?;
                let found = pods
                    .items
                    .into_iter()
                    .find(|p| {
                        p.metadata
                            .labels
                            .as_ref()
                            .is_some_and(|l| l.contains_key(weft_inject::keys::MESHED_LABEL))
                    })
                    .ok_or_else(|| {
                        anyhow!("no meshed pod has the endpoint's address {ip}; pass --to-pod")
                    })?;
                (
                    found.metadata.namespace.unwrap_or_default(),
                    found.metadata.name.unwrap_or_default(),
                )
            }
        };
        let [text] = read_admin(
            &ns,
            &pod,
            args.admin_port,
            args.to_admin_url.as_deref(),
            ["/config"],
        )
        .await?;
        let d: ConfigDump =
            serde_json::from_str(&text?).context("the destination proxy's /config answer")?;
        anyhow::Ok(DestinationView::Read {
            pod: format!("{ns}/{pod}"),
            dump: Box::new(d),
        })
    };
    work.await
        .unwrap_or_else(|e| DestinationView::NotRead(format!("{e:#}")))
}

#[derive(serde::Serialize)]
struct JsonStep {
    step: usize,
    title: String,
    lines: Vec<String>,
}

/// The explanation as one JSON document: the request, the proxy's version, the header
/// lines, each step with its lines, and the destination's decision.
fn to_json(args: &ExplainArgs, req: &Request, dump: &ConfigDump, out: &Explanation) -> String {
    let mut header = Vec::new();
    let mut steps: Vec<JsonStep> = Vec::new();
    for line in out.text.lines() {
        let numbered = line
            .split_once(". ")
            .filter(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        match (numbered, steps.last_mut()) {
            (Some((n, title)), _) => steps.push(JsonStep {
                step: n.parse().unwrap_or(0),
                title: title.to_owned(),
                lines: Vec::new(),
            }),
            (None, Some(step)) => step.lines.push(line.trim().to_owned()),
            (None, None) => header.push(line.to_owned()),
        }
    }
    let doc = serde_json::json!({
        "schemaVersion": 1,
        "pod": format!("{}/{}", args.namespace, args.pod),
        "request": {
            "method": req.method.as_str(),
            "host": req.host,
            "port": req.port,
            "path": req.path,
            "query": req.query,
        },
        "configVersion": dump.version,
        "generation": dump.generation,
        "header": header,
        "steps": steps,
        "destination": out.destination,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// GETs `paths` from pod `namespace/name`'s admin endpoint: from `url` when given, else
/// through one `kubectl port-forward`, which connects from the pod's loopback (the only
/// peers the proxy shows its config to). The child is killed when done.
async fn read_admin<const N: usize>(
    namespace: &str,
    pod: &str,
    port: u16,
    url: Option<&str>,
    paths: [&str; N],
) -> anyhow::Result<[anyhow::Result<String>; N]> {
    let admin = crate::admin::PodAdmin::open(namespace, pod, port, url).await?;
    let mut out = Vec::with_capacity(N);
    for p in paths {
        out.push(crate::admin::get_direct(admin.url(), p).await);
    }
    admin.close().await;
    out.try_into().map_err(|_| anyhow!("admin answers"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--to-pod` looks in the namespace the host names; an IP names none (`198.19.4.2`
    /// is not in namespace `19.4.2`), so the source's `-n` is used.
    #[test]
    fn the_destination_namespace_comes_from_a_name_never_from_an_ip() {
        for (host, want) in [
            ("web.shop", Some("shop")),
            ("web.shop.svc", Some("shop")),
            ("web.shop.svc.cluster.local", Some("shop")),
            ("web.shop.svc.cluster.local.", Some("shop")),
            ("web", None),
            ("198.19.4.2", None),
            ("198.19.0.10", None),
            ("fd00::10", None),
            ("[fd00::10]", None),
        ] {
            assert_eq!(host_namespace(host).as_deref(), want, "{host}");
        }
    }

    /// A pod dialled by address (as through a headless Service's name) is no service's
    /// cluster address, yet not passed through in plain text when it is meshed.
    #[test]
    fn a_meshed_pods_address_is_explained_as_mutual_tls_to_it_alone() {
        let raw: ProxyConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": weft_api::proxy_config::PROXY_CONFIG_API_VERSION,
            "kind": weft_api::proxy_config::PROXY_CONFIG_KIND,
            "services": [{
                "name": "db.shop.5432", "addresses": [], "protocol": "opaque",
                "endpoints": [{"address": "198.18.1.5:5432",
                               "identity": "spiffe://cluster.local/ns/shop/sa/db"}]
            }, {
                "name": "pods.shop", "addresses": [], "protocol": "detect",
                "endpoints": [{"address": "198.18.1.7:9000",
                               "identity": "spiffe://cluster.local/ns/shop/sa/job"},
                              {"address": "198.18.1.7:6379",
                               "identity": "spiffe://cluster.local/ns/shop/sa/job"}]
            }]
        }))
        .unwrap();
        let cfg = Config::validate(&raw).unwrap();
        let req = |host: &str, port: u16| {
            Request::from_args(&format!("{host}:{port}"), "GET", &[], None).unwrap()
        };
        let why = resolve(&cfg, &raw, "shop", &req("198.18.1.5", 5432)).unwrap_err();
        assert!(
            why.contains("meshed endpoint of service db.shop.5432")
                && why.contains("spiffe://cluster.local/ns/shop/sa/db")
                && why.contains("opaque TCP"),
            "{why}"
        );
        let why = resolve(&cfg, &raw, "shop", &req("198.18.1.7", 9000)).unwrap_err();
        assert!(
            why.contains("a meshed pod of namespace shop declaring port 9000")
                && why.contains("spiffe://cluster.local/ns/shop/sa/job"),
            "{why}"
        );
        // A port every proxy takes as opaque is forwarded so, whatever the config's protocol.
        let why = resolve(&cfg, &raw, "shop", &req("198.18.1.7", 6379)).unwrap_err();
        assert!(why.contains("as opaque TCP"), "{why}");
        // The pods' config is no Service's, whatever its name looks like.
        let bare = Request::from_args("pods.shop", "GET", &[], None).unwrap();
        let why = resolve(&cfg, &raw, "shop", &bare).unwrap_err();
        assert!(why.contains("has no service pods.shop"), "{why}");
        let why = resolve(&cfg, &raw, "shop", &req("198.18.1.6", 5432)).unwrap_err();
        assert!(why.contains("passed through"), "{why}");
        let why = resolve(&cfg, &raw, "shop", &req("db.shop", 5432)).unwrap_err();
        assert!(why.contains("headless"), "{why}");
    }

    #[test]
    fn a_breakers_live_state_comes_from_the_proxys_counters() {
        let metrics = "# TYPE weft_breaker_ejected_endpoints gauge\n\
            weft_breaker_ejected_endpoints{service=\"db.shop.5432\"} 2\n\
            weft_breaker_ejected_endpoints{service=\"web.shop.80\"} 0\n\
            weft_breaker_overloaded_total{service=\"db.shop.5432\",limit=\"max_requests\"} 7\n";
        let live: Metrics = Ok(crate::prom::parse(metrics).unwrap());
        let mut w = String::new();
        breaker_live(&mut w, &live, "db.shop.5432", 3);
        assert_eq!(
            w,
            "     now: 2 of 3 endpoint(s) ejected by outlier detection (which ones, the proxy does not expose)\n\
             \x20    refused by pool limits since the proxy started: max_requests=7\n"
        );
        let mut w = String::new();
        breaker_live(&mut w, &Err("connect refused".into()), "db.shop.5432", 3);
        assert_eq!(w, "     live state not read (connect refused)\n");
    }

    #[test]
    fn destinations_parse_as_service_host_port_or_url() {
        let r = Request::from_args("web", "GET", &[], None).unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.path.as_str()),
            ("web", None, "/")
        );
        let r = Request::from_args(
            "http://web.shop:8080/api/x?y=1",
            "post",
            &["x-a=1".into()],
            None,
        )
        .unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.path.as_str(), r.query.as_deref()),
            ("web.shop", Some(8080), "/api/x", Some("y=1"))
        );
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.headers["x-a"], "1");
        let r = Request::from_args("198.18.100.1:80", "GET", &[], Some("/p")).unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.path.as_str()),
            ("198.18.100.1", Some(80), "/p")
        );
        assert!(Request::from_args("web:x", "GET", &[], None).is_err());
        assert!(Request::from_args("web", "GET", &["nope".into()], None).is_err());
    }
}
