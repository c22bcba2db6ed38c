//! Traffic policy on the wire, test-first: a service's `route` (matching, normalization,
//! weighted split, timeouts, retries under a budget, faults, mirroring, header edits and
//! rewrites) and the inbound rate limit, each proved by requests through an in-process
//! proxy to misbehaving backends ([`Scripted`]) on 127.0.0.x.
//!
//! Every test starts its backends, a proxy forwarding to `web` with a config whose `web`
//! service carries the route, sends requests, and asserts what the client got and what
//! each backend saw. A route's backends name other services of the same config.
//!
//! What the tests assume of the enforcement, beside the documented field semantics, is
//! said where it is used and gathered in [`assumed`].

// Test helpers: a failed setup step should panic the test that called it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::{Proxy, server::ListenerKind};

/// What the tests assume where the documented behaviour leaves a choice; the lead's
/// enforcement must match these (or these must change with it).
mod assumed {
    /// The largest request body a retry can replay (buffered while the first attempt
    /// runs). The tests send 1 KiB to be replayed and 128 KiB not to be.
    pub const REPLAY_LIMIT: usize = 64 * 1024;
    /// The `weft-error` code of a request sent to a backend whose service does not exist.
    pub const BACKEND_NOT_FOUND: &str = "backend_not_found";
    /// The `weft-error` code of an injected abort.
    pub const FAULT_INJECTED: &str = "fault_injected";
    /// The `weft-error` code of a request refused by the inbound rate limit (429).
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The `weft-error` code of a rule's `timeout`.
    pub const RESPONSE_TIMEOUT: &str = "response_timeout";
    /// The `weft-error` code of a `perTryTimeout` on the last attempt allowed.
    pub const PER_TRY_TIMEOUT: &str = "per_try_timeout";

    /// Sum of the samples of every series (name and labels) that contains all of `parts`,
    /// so `dry_run` may be in the name or a label (`dry_run="true"`, not `"false"`). Metric
    /// names are not final: every metric-name assumption of this file is in this module.
    pub fn metric_sum(text: &str, parts: &[&str]) -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let name = series.split('{').next()?;
                if name.ends_with("_created")
                    || series.contains("dry_run=\"false\"")
                    || !parts.iter().all(|p| series.contains(p))
                {
                    return None;
                }
                value.parse::<f64>().ok()
            })
            .sum()
    }

    /// Retries a retry budget in dry run would have refused (and let through).
    pub fn retry_budget_dry_run(text: &str) -> f64 {
        metric_sum(text, &["retr", "dry_run"])
    }

    /// Copies sent to a mirror by the rules of `service`'s Route.
    pub fn mirrored_requests(text: &str, service: &str) -> f64 {
        let label = format!("service=\"{service}\"");
        metric_sum(
            text,
            &["weft_route_events_total", &label, "event=\"mirrored\""],
        )
    }

    /// Requests an inbound rate limit in dry run would have refused (and let through).
    pub fn rate_limit_dry_run(text: &str) -> f64 {
        metric_sum(text, &["rate_limit", "dry_run"])
    }
}

use assumed::*;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// `config(services)` with a route of these `rules` on the first service (the one the
/// test proxy forwards to).
fn routed(services: &[(&str, &[SocketAddr])], rules: Value) -> Value {
    let mut cfg = config(services);
    cfg["services"][0]["route"] = json!({"name": "shop/web", "rules": rules});
    cfg
}

/// A backend reference: a service of the same config, with a weight.
fn to(service: &str, weight: u32) -> Value {
    json!({"service": service, "weight": weight})
}

/// Asserts that the proxy answered itself with this `weft-error` code.
#[track_caller]
fn expect_code(resp: &Response<()>, code: &str) {
    assert_eq!(
        header(resp, "weft-error"),
        code,
        "status {}, headers {:?}",
        resp.status(),
        resp.headers()
    );
}

/// Sends `req` with a 5 s bound; the response head and body text.
async fn send(client: &Client<HttpConnector, Body>, req: Request<Body>) -> (Response<()>, String) {
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .expect("a response within 5 s")
        .expect("a response");
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the body within 5 s")
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (
        Response::from_parts(parts, ()),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// GET `path` through the proxy with these request headers.
async fn get_with(proxy: &TestProxy, path: &str, headers: &[(&str, &str)]) -> Response<()> {
    get_method(proxy, "GET", path, headers).await
}

async fn get_method(
    proxy: &TestProxy,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Response<()> {
    let mut req = Request::builder().method(method).uri(proxy.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(&h1_client(), req.body(full("")).unwrap()).await.0
}

/// Which backend answered: its `x-backend`, or `error:CODE` when the proxy answered.
fn who(resp: &Response<()>) -> String {
    match header(resp, "weft-error") {
        "" => header(resp, "x-backend").to_owned(),
        code => format!("error:{code}"),
    }
}

/// Sends `n` GETs to `path`, `concurrency` at a time; how many each answerer got ([`who`]).
async fn tally(
    proxy: &TestProxy,
    path: &str,
    n: usize,
    concurrency: usize,
) -> HashMap<String, usize> {
    let client = h1_client();
    let url = proxy.url(path);
    let answers: Vec<String> = futures::stream::iter(0..n)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let req = Request::get(url).body(full("")).unwrap();
                who(&send(&client, req).await.0)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut counts = HashMap::new();
    for a in answers {
        *counts.entry(a).or_default() += 1;
    }
    counts
}

/// Asserts that `count` of `n` is `percent` % of them, give or take `tolerance` points.
#[track_caller]
fn share(counts: &HashMap<String, usize>, key: &str, n: usize, percent: f64, tolerance: f64) {
    let got = *counts.get(key).unwrap_or(&0) as f64 * 100.0 / n as f64;
    assert!(
        (got - percent).abs() <= tolerance,
        "{key}: {got:.1} % of {n}, expected {percent} ± {tolerance}: {counts:?}"
    );
}

/// Sends a raw HTTP/1.1 request line with `target` as written (no client-side
/// normalization) and returns the status and the lower-cased response head.
async fn raw_get(proxy: &TestProxy, target: &str) -> (u16, String) {
    let mut s = connect(proxy.addr).await;
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Drain the body so the proxy is not left writing into a closed socket.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    (status, head)
}

/// The value of header `name` in a lower-cased raw response head.
fn head_value<'a>(head: &'a str, name: &str) -> &'a str {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or("")
        .trim()
}

/// A gRPC request (HTTP/2, `content-type: application/grpc`) to `path`.
async fn grpc_call(proxy: &TestProxy, path: &str) -> Response<()> {
    let req = Request::post(proxy.url(path))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(""))
        .unwrap();
    send(&h2_client(), req).await.0
}

/// A retry policy with a 1 ms backoff (the default 25 ms would make the many-request
/// tests slow) and a budget that never gets in the way unless a test says otherwise.
fn retries(attempts: u32, retry_on: &[&str]) -> Value {
    json!({
        "attempts": attempts,
        "retryOn": retry_on,
        "backoff": {"base": "1ms", "max": "1ms"},
        "budget": {"percent": 100, "minRetriesPerSecond": 1000},
    })
}

// ---------------------------------------------------------------------------------------
// 1. Matching
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn rules_are_tried_in_order_and_the_first_match_wins() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let first = Scripted::ok("127.0.0.2", "first").await;
    let second = Scripted::ok("127.0.0.2", "second").await;
    let rules = json!([
        {"matches": [{"path": {"prefix": "/api"}, "method": "GET"}], "backends": [to("web-first", 1)]},
        {"matches": [{"path": {"prefix": "/api"}}], "backends": [to("web-second", 1)]},
    ]);
    let proxy = TestProxy::start(
        "web",
        routed(
            &[
                ("web", &[own.addr]),
                ("web-first", &[first.addr]),
                ("web-second", &[second.addr]),
            ],
            rules,
        ),
    )
    .await;
    // Both rules match a GET: the earlier one takes it.
    assert_eq!(who(&get_with(&proxy, "/api/x", &[]).await), "first");
    // Only the second matches a POST.
    assert_eq!(
        who(&get_method(&proxy, "POST", "/api/x", &[]).await),
        "second"
    );
    assert_eq!(own.requests(), 0);
}

#[tokio::test]
async fn an_exact_path_matches_that_path_only() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let exact = Scripted::ok("127.0.0.2", "exact").await;
    let rules =
        json!([{"matches": [{"path": {"exact": "/login"}}], "backends": [to("web-exact", 1)]}]);
    let proxy = TestProxy::start(
        "web",
        routed(&[("web", &[own.addr]), ("web-exact", &[exact.addr])], rules),
    )
    .await;
    assert_eq!(who(&get_with(&proxy, "/login", &[]).await), "exact");
    // The query is not part of the path.
    assert_eq!(who(&get_with(&proxy, "/login?next=/", &[]).await), "exact");
    for other in ["/login/", "/login/x", "/logins", "/"] {
        assert_eq!(who(&get_with(&proxy, other, &[]).await), "own", "{other}");
    }
}

#[tokio::test]
async fn a_path_prefix_matches_on_segment_boundaries_only() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let api = Scripted::ok("127.0.0.2", "api").await;
    let rules =
        json!([{"matches": [{"path": {"prefix": "/api"}}], "backends": [to("web-api", 1)]}]);
    let proxy = TestProxy::start(
        "web",
        routed(&[("web", &[own.addr]), ("web-api", &[api.addr])], rules),
    )
    .await;
    for path in ["/api", "/api/", "/api/x", "/api/x/y?z=1", "/api?x=1"] {
        assert_eq!(who(&get_with(&proxy, path, &[]).await), "api", "{path}");
    }
    for path in ["/apix", "/ap", "/x/api", "/"] {
        assert_eq!(who(&get_with(&proxy, path, &[]).await), "own", "{path}");
    }
}

#[tokio::test]
async fn a_path_regex_must_match_the_whole_path() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let items = Scripted::ok("127.0.0.2", "items").await;
    let rules = json!([{"matches": [{"path": {"regex": "/items/[0-9]+"}}], "backends": [to("web-items", 1)]}]);
    let proxy = TestProxy::start(
        "web",
        routed(&[("web", &[own.addr]), ("web-items", &[items.addr])], rules),
    )
    .await;
    assert_eq!(who(&get_with(&proxy, "/items/42", &[]).await), "items");
    assert_eq!(who(&get_with(&proxy, "/items/42?x=1", &[]).await), "items");
    // Not anchored by the user, anchored by the proxy: a partial match is no match.
    for path in ["/items/42/edit", "/v1/items/42", "/items/x"] {
        assert_eq!(who(&get_with(&proxy, path, &[]).await), "own", "{path}");
    }
}

#[tokio::test]
async fn a_method_match_takes_only_that_method() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let del = Scripted::ok("127.0.0.2", "delete").await;
    let rules = json!([{"matches": [{"method": "DELETE"}], "backends": [to("web-delete", 1)]}]);
    let proxy = TestProxy::start(
        "web",
        routed(&[("web", &[own.addr]), ("web-delete", &[del.addr])], rules),
    )
    .await;
    assert_eq!(
        who(&get_method(&proxy, "DELETE", "/x", &[]).await),
        "delete"
    );
    assert_eq!(who(&get_method(&proxy, "GET", "/x", &[]).await), "own");
    assert_eq!(who(&get_method(&proxy, "POST", "/x", &[]).await), "own");
}

#[tokio::test]
async fn header_matches_compare_exactly_or_by_whole_value_regex() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let canary = Scripted::ok("127.0.0.2", "canary").await;
    let admin = Scripted::ok("127.0.0.2", "admin").await;
    let rules = json!([
        {"matches": [{"headers": [{"name": "x-canary", "value": "1"}]}], "backends": [to("web-canary", 1)]},
        {"matches": [{"headers": [{"name": "x-user", "value": "admin-[a-z]+", "type": "regex"}]}],
         "backends": [to("web-admin", 1)]},
    ]);
    let proxy = TestProxy::start(
        "web",
        routed(
            &[
                ("web", &[own.addr]),
                ("web-canary", &[canary.addr]),
                ("web-admin", &[admin.addr]),
            ],
            rules,
        ),
    )
    .await;
    assert_eq!(
        who(&get_with(&proxy, "/", &[("x-canary", "1")]).await),
        "canary"
    );
    assert_eq!(
        who(&get_with(&proxy, "/", &[("x-canary", "10")]).await),
        "own"
    );
    assert_eq!(
        who(&get_with(&proxy, "/", &[("x-user", "admin-bob")]).await),
        "admin"
    );
    // The regex must match the whole value.
    assert_eq!(
        who(&get_with(&proxy, "/", &[("x-user", "admin-bob2")]).await),
        "own"
    );
    assert_eq!(
        who(&get_with(&proxy, "/", &[("x-user", "not-admin-bob")]).await),
        "own"
    );
    assert_eq!(who(&get_with(&proxy, "/", &[]).await), "own");
}

#[tokio::test]
async fn a_query_param_match_needs_the_parameter_with_its_value() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let v2 = Scripted::ok("127.0.0.2", "v2").await;
    let rules = json!([{"matches": [{"queryParams": [{"name": "version", "value": "2"}]}],
                        "backends": [to("web-v2", 1)]}]);
    let proxy = TestProxy::start(
        "web",
        routed(&[("web", &[own.addr]), ("web-v2", &[v2.addr])], rules),
    )
    .await;
    assert_eq!(who(&get_with(&proxy, "/x?version=2", &[]).await), "v2");
    assert_eq!(who(&get_with(&proxy, "/x?a=b&version=2", &[]).await), "v2");
    for path in ["/x?version=3", "/x?Version=2", "/x?version=22", "/x"] {
        assert_eq!(who(&get_with(&proxy, path, &[]).await), "own", "{path}");
    }
}

#[tokio::test]
async fn a_request_no_rule_matches_goes_to_the_services_own_endpoints() {
    let own_a = Scripted::ok("127.0.0.2", "own-a").await;
    let own_b = Scripted::ok("127.0.0.3", "own-b").await;
    let api = Scripted::ok("127.0.0.2", "api").await;
    let rules =
        json!([{"matches": [{"path": {"prefix": "/api"}}], "backends": [to("web-api", 1)]}]);
    let mut cfg = routed(
        &[("web", &[own_a.addr, own_b.addr]), ("web-api", &[api.addr])],
        rules,
    );
    cfg["services"][0]["balancer"] = "roundRobin".into();
    let proxy = TestProxy::start("web", cfg).await;
    let counts = tally(&proxy, "/other", 20, 1).await;
    // Balanced over the service's own endpoints, as without a route.
    assert_eq!(counts.get("own-a"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("own-b"), Some(&10), "{counts:?}");
    assert_eq!(api.requests(), 0);
    // While a matching request follows the rule.
    assert_eq!(who(&get_with(&proxy, "/api", &[]).await), "api");
}

// ---------------------------------------------------------------------------------------
// 2. Normalization
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn paths_are_normalized_before_matching_and_sent_upstream_normalized() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let api = Scripted::ok("127.0.0.2", "api").await;
    let rules =
        json!([{"matches": [{"path": {"prefix": "/api"}}], "backends": [to("web-api", 1)]}]);
    let proxy = TestProxy::start(
        "web",
        routed(&[("web", &[own.addr]), ("web-api", &[api.addr])], rules),
    )
    .await;
    for (sent, normalized) in [
        ("//api/x", "/api/x"),
        ("/./api/x", "/api/x"),
        ("/%61pi/x", "/api/x"),
        ("/x/../api/x", "/api/x"),
        ("/api//x?q=1", "/api/x?q=1"),
    ] {
        let (status, head) = raw_get(&proxy, sent).await;
        assert_eq!(status, 200, "{sent}: {head}");
        assert_eq!(head_value(&head, "x-backend"), "api", "{sent}: {head}");
        assert_eq!(api.last().target, normalized, "{sent}");
    }
    assert_eq!(own.requests(), 0);
}

#[tokio::test]
async fn path_matching_is_case_sensitive() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let api = Scripted::ok("127.0.0.2", "api").await;
    let rules =
        json!([{"matches": [{"path": {"prefix": "/api"}}], "backends": [to("web-api", 1)]}]);
    let proxy = TestProxy::start(
        "web",
        routed(&[("web", &[own.addr]), ("web-api", &[api.addr])], rules),
    )
    .await;
    assert_eq!(who(&get_with(&proxy, "/api", &[]).await), "api");
    assert_eq!(who(&get_with(&proxy, "/API", &[]).await), "own");
    assert_eq!(who(&get_with(&proxy, "/Api/x", &[]).await), "own");
}

// ---------------------------------------------------------------------------------------
// 3. Weighted split
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_90_10_split_sends_90_and_10_percent() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let v1 = Scripted::ok("127.0.0.2", "v1").await;
    let v2 = Scripted::ok("127.0.0.3", "v2").await;
    let rules = json!([{"backends": [to("web-v1", 90), to("web-v2", 10)]}]);
    let proxy = TestProxy::start(
        "web",
        routed(
            &[
                ("web", &[own.addr]),
                ("web-v1", &[v1.addr]),
                ("web-v2", &[v2.addr]),
            ],
            rules,
        ),
    )
    .await;
    let n = 2000;
    let counts = tally(&proxy, "/", n, 8).await;
    share(&counts, "v1", n, 90.0, 3.0);
    share(&counts, "v2", n, 10.0, 3.0);
    assert_eq!(own.requests(), 0);
}

#[tokio::test]
async fn a_split_is_by_backend_not_by_endpoint_count() {
    // web-big has three endpoints, web-small one: 50/50 by backend, not 75/25 by endpoint.
    let own = Scripted::ok("127.0.0.2", "own").await;
    let big: Vec<Scripted> = futures::future::join_all(
        ["big-1", "big-2", "big-3"].map(|n| Scripted::ok("127.0.0.2", n)),
    )
    .await;
    let small = Scripted::ok("127.0.0.3", "small").await;
    let big_addrs: Vec<SocketAddr> = big.iter().map(|b| b.addr).collect();
    let rules = json!([{"backends": [to("web-big", 50), to("web-small", 50)]}]);
    let proxy = TestProxy::start(
        "web",
        routed(
            &[
                ("web", &[own.addr]),
                ("web-big", &big_addrs),
                ("web-small", &[small.addr]),
            ],
            rules,
        ),
    )
    .await;
    // 4,000 rather than 2,000: if the split is random, ±3 points is 3.8 standard
    // deviations at 50 % (2.7 at 2,000, a flake in a hundred runs).
    let n = 4000;
    let counts = tally(&proxy, "/", n, 8).await;
    let big_total: usize = big.iter().map(|b| b.requests()).sum();
    let mut by_backend = HashMap::new();
    by_backend.insert("web-big".to_owned(), big_total);
    by_backend.insert("web-small".to_owned(), small.requests());
    share(&by_backend, "web-big", n, 50.0, 3.0);
    share(&by_backend, "web-small", n, 50.0, 3.0);
    assert_eq!(counts.values().sum::<usize>(), n);
}

#[tokio::test]
async fn a_backend_of_weight_0_gets_nothing() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let v1 = Scripted::ok("127.0.0.2", "v1").await;
    let drained = Scripted::ok("127.0.0.3", "drained").await;
    let rules = json!([{"backends": [to("web-v1", 1), to("web-drained", 0)]}]);
    let proxy = TestProxy::start(
        "web",
        routed(
            &[
                ("web", &[own.addr]),
                ("web-v1", &[v1.addr]),
                ("web-drained", &[drained.addr]),
            ],
            rules,
        ),
    )
    .await;
    let counts = tally(&proxy, "/", 200, 8).await;
    assert_eq!(counts.get("v1"), Some(&200), "{counts:?}");
    assert_eq!(drained.requests(), 0);
}

#[tokio::test]
async fn an_unresolved_backend_gets_its_share_answered_500_backend_not_found() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let v1 = Scripted::ok("127.0.0.2", "v1").await;
    let rules = json!([{"backends": [
        to("web-v1", 1),
        {"display": "Service shop/gone port 80", "weight": 1},
    ]}]);
    let proxy = TestProxy::start(
        "web",
        routed(&[("web", &[own.addr]), ("web-v1", &[v1.addr])], rules),
    )
    .await;
    // ±5 points at 50 % over 2,000 is 4.5 standard deviations if the split is random.
    let n = 2000;
    let counts = tally(&proxy, "/", n, 8).await;
    share(&counts, "v1", n, 50.0, 5.0);
    share(&counts, &format!("error:{BACKEND_NOT_FOUND}"), n, 50.0, 5.0);
    assert_eq!(
        own.requests(),
        0,
        "the missing share does not fall back to web's own"
    );
    // The status of that answer, and a message naming the backend.
    let status_and_body = loop_until_unresolved(&proxy).await;
    assert_eq!(
        status_and_body.0.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert!(
        status_and_body.1.contains("shop/gone"),
        "{}",
        status_and_body.1
    );
}

/// Sends GETs (at most 100) until one lands on the unresolved backend.
async fn loop_until_unresolved(proxy: &TestProxy) -> (Response<()>, String) {
    let client = h1_client();
    for _ in 0..100 {
        let (resp, body) = send(
            &client,
            Request::get(proxy.url("/")).body(full("")).unwrap(),
        )
        .await;
        if header(&resp, "weft-error") == BACKEND_NOT_FOUND {
            return (resp, body);
        }
    }
    panic!("no request of 100 reached the unresolved backend");
}

// ---------------------------------------------------------------------------------------
// 4. Timeouts
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_rule_timeout_answers_504_response_timeout_at_its_deadline() {
    let slow = Scripted::always(
        "127.0.0.2",
        "slow",
        Misbehave::Delay(Duration::from_secs(1)),
    )
    .await;
    let rules = json!([{"timeout": "200ms"}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[slow.addr])], rules)).await;
    let start = Instant::now();
    let resp = get_with(&proxy, "/", &[]).await;
    let took = start.elapsed();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    expect_code(&resp, RESPONSE_TIMEOUT);
    assert!(took >= Duration::from_millis(190), "{took:?}");
    assert!(took < Duration::from_millis(800), "{took:?}");
}

#[tokio::test]
async fn a_rule_timeout_cancels_the_upstream_request() {
    let hang = Scripted::always("127.0.0.2", "hang", Misbehave::Hang).await;
    let rules = json!([{"timeout": "200ms"}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[hang.addr])], rules)).await;
    let start = Instant::now();
    let resp = get_with(&proxy, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    expect_code(&resp, RESPONSE_TIMEOUT);
    // The proxy gives up on the upstream request too: its stream or connection is closed.
    eventually(
        Duration::from_secs(1),
        "the backend saw the request cancelled",
        || {
            let n = hang.cancelled();
            async move { n == 1 }
        },
    )
    .await;
    assert!(start.elapsed() < Duration::from_millis(1500));
}

/// A check of the harness rather than of routes (it passes before enforcement): the
/// service-level timeout the proxy already has cancels a hanging request, and the
/// [`Misbehave::Hang`] backend sees it, so a failure of the test above is the route's.
#[tokio::test]
async fn harness_a_hanging_backend_sees_the_service_timeout_cancel_its_request() {
    let hang = Scripted::always("127.0.0.2", "hang", Misbehave::Hang).await;
    let mut cfg = config(&[("web", &[hang.addr])]);
    cfg["services"][0]["timeout"] = "200ms".into();
    let proxy = TestProxy::start("web", cfg).await;
    let resp = get_with(&proxy, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    expect_code(&resp, RESPONSE_TIMEOUT);
    eventually(
        Duration::from_secs(1),
        "the backend saw the request cancelled",
        || {
            let n = hang.cancelled();
            async move { n == 1 }
        },
    )
    .await;
}

#[tokio::test]
async fn a_per_try_timeout_is_retried_and_the_retry_succeeds() {
    // Assumed: a per-try timeout counts as a 504 gateway error for `retryOn` (as Envoy).
    let slow_once = Scripted::start(
        "127.0.0.2",
        "slow-once",
        1,
        Misbehave::Delay(Duration::from_secs(1)),
    )
    .await;
    let rules = json!([{"perTryTimeout": "100ms", "retries": retries(1, &["gateway-error"])}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[slow_once.addr])], rules)).await;
    let start = Instant::now();
    let resp = get_with(&proxy, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.headers());
    assert_eq!(slow_once.requests(), 2);
    assert!(
        start.elapsed() < Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_per_try_timeout_without_retries_is_504() {
    let slow = Scripted::always(
        "127.0.0.2",
        "slow",
        Misbehave::Delay(Duration::from_secs(1)),
    )
    .await;
    let rules = json!([{"perTryTimeout": "100ms"}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[slow.addr])], rules)).await;
    let start = Instant::now();
    let resp = get_with(&proxy, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    expect_code(&resp, PER_TRY_TIMEOUT);
    assert!(
        start.elapsed() < Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(slow.requests(), 1);
}

// ---------------------------------------------------------------------------------------
// 5. Retries
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_get_failing_twice_with_503_is_retried_until_it_succeeds() {
    let flaky = Scripted::start("127.0.0.2", "flaky", 2, Misbehave::Status(503)).await;
    let rules = json!([{"retries": retries(2, &["5xx"])}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[flaky.addr])], rules)).await;
    let resp = get_with(&proxy, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(flaky.requests(), 3);
}

#[tokio::test]
async fn retries_stop_at_attempts_and_the_last_failure_is_returned() {
    let flaky = Scripted::start("127.0.0.2", "flaky", 2, Misbehave::Status(503)).await;
    let rules = json!([{"retries": retries(1, &["5xx"])}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[flaky.addr])], rules)).await;
    let resp = get_with(&proxy, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The upstream's own answer, not one of the proxy's.
    assert_eq!(header(&resp, "weft-error"), "");
    assert_eq!(header(&resp, "x-backend"), "flaky");
    assert_eq!(flaky.requests(), 2);
}

#[tokio::test]
async fn gateway_error_retries_502_503_504_but_not_500() {
    for (status, retried) in [(500, false), (502, true), (503, true), (504, true)] {
        let flaky = Scripted::start("127.0.0.2", "flaky", 1, Misbehave::Status(status)).await;
        let rules = json!([{"retries": retries(1, &["gateway-error"])}]);
        let proxy = TestProxy::start("web", routed(&[("web", &[flaky.addr])], rules)).await;
        let resp = get_with(&proxy, "/", &[]).await;
        if retried {
            assert_eq!(resp.status(), StatusCode::OK, "{status}");
            assert_eq!(flaky.requests(), 2, "{status}");
        } else {
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(flaky.requests(), 1, "{status}");
        }
    }
}

#[tokio::test]
async fn unavailable_retries_a_trailers_only_grpc_status_14() {
    let flaky = Scripted::start("127.0.0.2", "flaky", 1, Misbehave::GrpcStatus(14)).await;
    let rules = json!([{"retries": retries(1, &["unavailable"])}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[flaky.addr])], rules)).await;
    let resp = grpc_call(&proxy, "/pkg.Svc/Method").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "grpc-status"), "0", "{:?}", resp.headers());
    assert_eq!(flaky.requests(), 2);
}

#[tokio::test]
async fn resource_exhausted_retries_grpc_status_8_and_unavailable_does_not() {
    let flaky = Scripted::start("127.0.0.2", "flaky", 1, Misbehave::GrpcStatus(8)).await;
    let rules = json!([{"retries": retries(1, &["resource-exhausted"])}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[flaky.addr])], rules)).await;
    let resp = grpc_call(&proxy, "/pkg.Svc/Method").await;
    assert_eq!(header(&resp, "grpc-status"), "0", "{:?}", resp.headers());
    assert_eq!(flaky.requests(), 2);

    let flaky = Scripted::start("127.0.0.2", "flaky", 1, Misbehave::GrpcStatus(8)).await;
    let rules = json!([{"retries": retries(1, &["unavailable"])}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[flaky.addr])], rules)).await;
    let resp = grpc_call(&proxy, "/pkg.Svc/Method").await;
    assert_eq!(header(&resp, "grpc-status"), "8", "{:?}", resp.headers());
    assert_eq!(flaky.requests(), 1);
}

#[tokio::test]
async fn reset_retries_a_connection_reset_before_the_response() {
    let flaky = Scripted::start("127.0.0.2", "flaky", 1, Misbehave::Reset).await;
    let rules = json!([{"retries": retries(1, &["reset"])}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[flaky.addr])], rules)).await;
    let resp = get_with(&proxy, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.headers());
    assert_eq!(flaky.requests(), 2);
    assert_eq!(flaky.connections(), 2, "the retry needed a new connection");
}

#[tokio::test]
async fn a_post_with_a_small_body_is_retried_with_the_same_body() {
    let flaky = Scripted::start("127.0.0.2", "flaky", 1, Misbehave::Status(503)).await;
    let rules = json!([{"retries": retries(1, &["5xx"])}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[flaky.addr])], rules)).await;
    let body = Bytes::from((0..1024).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let req = Request::post(proxy.url("/orders"))
        .header("content-length", body.len())
        .body(full(body.clone()))
        .unwrap();
    let (resp, _) = send(&h1_client(), req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = flaky.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.method, http::Method::POST);
        assert!(
            s.body == body,
            "a replayed body differs ({} bytes)",
            s.body.len()
        );
    }
}

#[tokio::test]
async fn a_post_with_a_body_beyond_the_replay_limit_is_not_retried() {
    // Assumed replay limit: 64 KiB; the body is twice that. The backend fails twice: the
    // large POST is not retried, then a small one is, which shows the rule does retry.
    let size = 2 * REPLAY_LIMIT;
    let flaky = Scripted::start("127.0.0.2", "flaky", 2, Misbehave::Status(503)).await;
    let rules = json!([{"retries": retries(1, &["5xx"])}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[flaky.addr])], rules)).await;
    let req = Request::post(proxy.url("/upload"))
        .header("content-length", size)
        .body(full(vec![7u8; size]))
        .unwrap();
    let (resp, _) = send(&h1_client(), req).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&resp, "x-backend"), "flaky");
    assert_eq!(flaky.requests(), 1);
    assert_eq!(
        flaky.last().body.len(),
        size,
        "the body still streamed whole"
    );
    small_post_is_retried(&proxy, &flaky).await;
}

/// A 1 KiB POST through `proxy` to `flaky`, whose next answer is its last 503: retried.
async fn small_post_is_retried(proxy: &TestProxy, flaky: &Scripted) {
    let before = flaky.requests();
    let req = Request::post(proxy.url("/small"))
        .header("content-length", 1024)
        .body(full(vec![1u8; 1024]))
        .unwrap();
    let (resp, _) = send(&h1_client(), req).await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "a small body on the same rule is retried"
    );
    assert_eq!(flaky.requests() - before, 2);
}

#[tokio::test]
async fn a_streaming_body_without_content_length_is_not_retried() {
    // Assumed: a body of unknown length is not buffered for replay, however small. The
    // backend fails twice: the streamed POST is not retried, then a sized one is.
    let flaky = Scripted::start("127.0.0.2", "flaky", 2, Misbehave::Status(503)).await;
    let rules = json!([{"retries": retries(1, &["5xx"])}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[flaky.addr])], rules)).await;
    let chunks = futures::stream::iter(
        [
            Bytes::from_static(b"part one, "),
            Bytes::from_static(b"part two"),
        ]
        .map(|b| Ok::<_, Infallible>(Frame::data(b))),
    );
    let req = Request::post(proxy.url("/stream"))
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap();
    let (resp, _) = send(&h1_client(), req).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(flaky.requests(), 1);
    assert_eq!(&flaky.last().body[..], b"part one, part two");
    small_post_is_retried(&proxy, &flaky).await;
}

#[tokio::test]
async fn a_retry_goes_to_another_endpoint_when_there_is_one() {
    let broken = Scripted::always("127.0.0.2", "broken", Misbehave::Status(503)).await;
    let good = Scripted::ok("127.0.0.3", "good").await;
    let rules = json!([{"retries": retries(1, &["5xx"])}]);
    let mut cfg = routed(&[("web", &[broken.addr, good.addr])], rules);
    cfg["services"][0]["balancer"] = "roundRobin".into();
    let proxy = TestProxy::start("web", cfg).await;
    let counts = tally(&proxy, "/", 20, 1).await;
    assert_eq!(counts.get("good"), Some(&20), "{counts:?}");
    assert!(
        broken.requests() > 0,
        "round robin sent some first attempts to the broken one"
    );
}

// ---------------------------------------------------------------------------------------
// 6. Retry budget
// ---------------------------------------------------------------------------------------

/// A rule retrying every 5xx three times under a budget of 20 % and no minimum.
fn budgeted(dry_run: bool) -> Value {
    json!([{"retries": {
        "attempts": 3,
        "retryOn": ["5xx"],
        "backoff": {"base": "1ms", "max": "1ms"},
        "budget": {"percent": 20, "minRetriesPerSecond": 0, "dryRun": dry_run},
    }}])
}

#[tokio::test]
async fn a_retry_budget_caps_retries_during_a_full_outage() {
    let down = Scripted::always("127.0.0.2", "down", Misbehave::Status(503)).await;
    let proxy = TestProxy::start("web", routed(&[("web", &[down.addr])], budgeted(false))).await;
    let n = 500;
    let counts = tally(&proxy, "/", n, 1).await;
    assert_eq!(counts.get("down"), Some(&n), "{counts:?}");
    let seen = down.requests();
    // 20 % of 500 is 100 retries; a little slack for how the window is counted.
    assert!(
        seen <= n * 120 / 100 + 10,
        "{seen} attempts for {n} requests"
    );
    // A budget throttles retries, it does not switch them off.
    assert!(seen > n + 20, "{seen} attempts for {n} requests");
}

#[tokio::test]
async fn a_retry_budget_in_dry_run_retries_everything_and_counts_what_it_would_refuse() {
    let down = Scripted::always("127.0.0.2", "down", Misbehave::Status(503)).await;
    let proxy = TestProxy::start("web", routed(&[("web", &[down.addr])], budgeted(true))).await;
    let n = 500;
    tally(&proxy, "/", n, 1).await;
    assert_eq!(down.requests(), 4 * n);
    let metrics = proxy.proxy.metrics.encode().unwrap();
    let would_refuse = retry_budget_dry_run(&metrics);
    assert!(
        would_refuse > 0.0,
        "no dry-run decision counted in\n{metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// 7. Faults
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_abort_fault_answers_for_the_backend() {
    let backend = Scripted::ok("127.0.0.2", "web").await;
    let rules = json!([{"fault": {"abort": {"httpStatus": 503, "percentage": 100}}}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[backend.addr])], rules)).await;
    let resp = get_with(&proxy, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    expect_code(&resp, FAULT_INJECTED);
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn an_abort_fault_answers_a_grpc_request_with_a_grpc_status() {
    let backend = Scripted::ok("127.0.0.2", "web").await;
    // 503 maps to gRPC 14 UNAVAILABLE.
    let rules = json!([{"fault": {"abort": {"httpStatus": 503, "percentage": 100}}}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[backend.addr])], rules)).await;
    let resp = grpc_call(&proxy, "/pkg.Svc/Method").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "grpc-status"), "14", "{:?}", resp.headers());
    expect_code(&resp, FAULT_INJECTED);
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn an_abort_fault_of_50_percent_aborts_about_half() {
    let backend = Scripted::ok("127.0.0.2", "web").await;
    let rules = json!([{"fault": {"abort": {"httpStatus": 503, "percentage": 50}}}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[backend.addr])], rules)).await;
    // 2,000 rather than 1,000: ±5 points at 50 % is then 4.5 standard deviations.
    let n = 2000;
    let counts = tally(&proxy, "/", n, 8).await;
    share(&counts, &format!("error:{FAULT_INJECTED}"), n, 50.0, 5.0);
    share(&counts, "web", n, 50.0, 5.0);
}

#[tokio::test]
async fn a_delay_fault_delays_then_forwards() {
    let backend = Scripted::ok("127.0.0.2", "web").await;
    let rules = json!([{"fault": {"delay": {"fixedDelay": "200ms", "percentage": 100}}}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[backend.addr])], rules)).await;
    let start = Instant::now();
    let resp = get_with(&proxy, "/", &[]).await;
    let took = start.elapsed();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert_eq!(backend.requests(), 1);
}

// ---------------------------------------------------------------------------------------
// 8. Mirror
// ---------------------------------------------------------------------------------------

fn mirrored(web: SocketAddr, shadow: SocketAddr, percentage: u32) -> Value {
    routed(
        &[("web", &[web]), ("shadow", &[shadow])],
        json!([{"mirror": {"service": "shadow", "percentage": percentage}}]),
    )
}

#[tokio::test]
async fn a_mirror_sends_a_copy_to_the_shadow() {
    let web = Scripted::ok("127.0.0.2", "web").await;
    let shadow = Scripted::ok("127.0.0.3", "shadow").await;
    let proxy = TestProxy::start("web", mirrored(web.addr, shadow.addr, 100)).await;
    let resp = get_with(&proxy, "/orders/7?x=1", &[("x-trace", "abc")]).await;
    assert_eq!(
        who(&resp),
        "web",
        "the client gets the real backend's answer"
    );
    eventually(Duration::from_secs(2), "the shadow got a copy", || {
        let n = shadow.requests();
        async move { n == 1 }
    })
    .await;
    let copy = shadow.last();
    assert_eq!(copy.target, "/orders/7?x=1");
    assert_eq!(copy.header_values("x-trace"), ["abc"]);
    assert_eq!(web.requests(), 1);
}

/// The client's latencies for `n` sequential GETs, each of which must succeed.
async fn latencies(proxy: &TestProxy, n: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        let resp = get_with(proxy, "/", &[]).await;
        assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.headers());
        out.push(start.elapsed());
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_slow_shadow_does_not_slow_the_client() {
    let web = Scripted::ok("127.0.0.2", "web").await;
    let shadow = Scripted::always(
        "127.0.0.3",
        "shadow",
        Misbehave::Delay(Duration::from_secs(2)),
    )
    .await;
    let proxy = TestProxy::start("web", mirrored(web.addr, shadow.addr, 100)).await;
    let took = latencies(&proxy, 5).await;
    // The median well under the shadow's 2 s; the worst bound is loose for a busy machine.
    assert!(took[2] < Duration::from_millis(100), "{took:?}");
    assert!(took[4] < Duration::from_millis(500), "{took:?}");
    eventually(Duration::from_secs(1), "the shadow got the copies", || {
        let n = shadow.requests();
        async move { n == 5 }
    })
    .await;
}

#[tokio::test]
async fn a_shadow_that_refuses_connections_does_not_fail_the_client() {
    let web = Scripted::ok("127.0.0.2", "web").await;
    let down = refused_addr("127.0.0.3").await;
    let proxy = TestProxy::start("web", mirrored(web.addr, down, 100)).await;
    let took = latencies(&proxy, 5).await;
    assert!(took[2] < Duration::from_millis(100), "{took:?}");
    assert_eq!(web.requests(), 5);
    // The mirror was attempted, not ignored: the copies are counted.
    let metrics = proxy.proxy.metrics.encode().unwrap();
    assert!(mirrored_requests(&metrics, "web") >= 5.0, "{metrics}");
}

#[tokio::test]
async fn a_mirror_of_50_percent_copies_about_half() {
    let web = Scripted::ok("127.0.0.2", "web").await;
    let shadow = Scripted::ok("127.0.0.3", "shadow").await;
    let proxy = TestProxy::start("web", mirrored(web.addr, shadow.addr, 50)).await;
    let n = 400;
    tally(&proxy, "/", n, 8).await;
    // Copies are sent on the side: wait for the count to settle (at most 2 s).
    let mut last = usize::MAX;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = shadow.requests();
        if now == last {
            break;
        }
        last = now;
    }
    let got = shadow.requests();
    assert!(
        (160..=240).contains(&got),
        "{got} of {n} mirrored, expected 200 ± 40"
    );
}

// ---------------------------------------------------------------------------------------
// 9. Header edits and rewrites
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn request_header_edits_reach_the_backend() {
    let backend = Scripted::ok("127.0.0.2", "web").await;
    let rules = json!([{"requestHeaders": {
        "set": [{"name": "x-set", "value": "new"}],
        "add": [{"name": "x-add", "value": "two"}],
        "remove": ["x-remove"],
    }}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[backend.addr])], rules)).await;
    let resp = get_with(
        &proxy,
        "/",
        &[
            ("x-set", "old"),
            ("x-add", "one"),
            ("x-remove", "secret"),
            ("x-keep", "k"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = backend.last();
    assert_eq!(seen.header_values("x-set"), ["new"]);
    assert_eq!(seen.header_values("x-add"), ["one", "two"]);
    assert!(
        seen.header_values("x-remove").is_empty(),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.header_values("x-keep"), ["k"]);
}

#[tokio::test]
async fn response_header_edits_reach_the_client() {
    let backend = Scripted::ok("127.0.0.2", "web").await;
    let rules = json!([{"responseHeaders": {
        "set": [{"name": "x-backend", "value": "edited"}],
        "add": [{"name": "x-added", "value": "1"}],
        "remove": ["x-upstream-secret"],
    }}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[backend.addr])], rules)).await;
    let resp = get_with(&proxy, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-backend"), "edited");
    assert_eq!(header(&resp, "x-added"), "1");
    assert!(
        resp.headers().get("x-upstream-secret").is_none(),
        "{:?}",
        resp.headers()
    );
}

#[tokio::test]
async fn replace_prefix_match_rewrites_the_matched_prefix_and_keeps_the_query() {
    let backend = Scripted::ok("127.0.0.2", "web").await;
    let rules = json!([{"matches": [{"path": {"prefix": "/api"}}], "rewrite": {"replacePrefixMatch": "/v2"}}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[backend.addr])], rules)).await;
    for (sent, upstream) in [
        ("/api/x?q=1", "/v2/x?q=1"),
        ("/api", "/v2"),
        ("/api/", "/v2/"),
    ] {
        let resp = get_with(&proxy, sent, &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-seen-path"), upstream, "{sent}");
    }
}

#[tokio::test]
async fn replace_full_path_replaces_the_whole_path_and_keeps_the_query() {
    // Assumed: the query string is kept, as with the Gateway API's ReplaceFullPath.
    let backend = Scripted::ok("127.0.0.2", "web").await;
    let rules = json!([{"matches": [{"path": {"prefix": "/old"}}], "rewrite": {"replaceFullPath": "/new/home"}}]);
    let proxy = TestProxy::start("web", routed(&[("web", &[backend.addr])], rules)).await;
    let resp = get_with(&proxy, "/old/deep/page?q=1", &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-path"), "/new/home?q=1");
}

// ---------------------------------------------------------------------------------------
// 10. Inbound rate limit
// ---------------------------------------------------------------------------------------

/// A proxy whose non-transparent inbound listener sends every connection to `app`, as
/// the transparent inbound listener does (so `inbound.rateLimit` applies).
fn inbound_proxy(app: SocketAddr, rate_limit: Value) -> TestProxy {
    let mut cfg = config(&[]);
    cfg["inbound"] = json!({"rateLimit": rate_limit});
    TestProxy::start_kind(Proxy::new(), ListenerKind::InboundTo(app), cfg)
}

/// The statuses of `n` immediate GETs from `client`; asserts the refusals' form.
async fn burst(proxy: &TestProxy, client: &Client<HttpConnector, Body>, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (resp, _) = send(client, Request::get(proxy.url("/")).body(full("")).unwrap()).await;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            expect_code(&resp, RATE_LIMITED);
            let after: u64 = header(&resp, "retry-after").parse().unwrap_or(0);
            assert!(after >= 1, "Retry-After {:?}", header(&resp, "retry-after"));
        }
        out.push(resp.status().as_u16());
    }
    out
}

#[tokio::test]
async fn the_inbound_rate_limit_lets_the_burst_through_then_answers_429() {
    let app = Scripted::ok("127.0.0.2", "app").await;
    let proxy = inbound_proxy(
        app.addr,
        json!({"name": "shop/web", "requestsPerSecond": 5, "burst": 5}),
    );
    let statuses = burst(&proxy, &h1_client(), 6).await;
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    assert_eq!(app.requests(), 5);
}

#[tokio::test]
async fn a_per_client_rate_limit_gives_each_client_its_own_bucket() {
    let app = Scripted::ok("127.0.0.2", "app").await;
    let proxy = inbound_proxy(
        app.addr,
        json!({"name": "shop/web", "requestsPerSecond": 5, "burst": 5, "per": "client"}),
    );
    let a = burst(&proxy, &h1_client_from("127.0.0.2"), 6).await;
    assert_eq!(a, [200, 200, 200, 200, 200, 429]);
    // Another source address has a full bucket of its own.
    let b = burst(&proxy, &h1_client_from("127.0.0.3"), 5).await;
    assert_eq!(b, [200; 5]);
}

#[tokio::test]
async fn a_rate_limit_in_dry_run_lets_everything_through_and_counts() {
    let app = Scripted::ok("127.0.0.2", "app").await;
    let proxy = inbound_proxy(
        app.addr,
        json!({"name": "shop/web", "requestsPerSecond": 5, "burst": 5, "dryRun": true}),
    );
    let statuses = burst(&proxy, &h1_client(), 10).await;
    assert_eq!(statuses, [200; 10]);
    assert_eq!(app.requests(), 10);
    let metrics = proxy.proxy.metrics.encode().unwrap();
    assert!(
        rate_limit_dry_run(&metrics) > 0.0,
        "no dry-run decision counted in\n{metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// 11–12. Config updates
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_config_update_that_leaves_a_service_alone_keeps_its_retry_budget() {
    // The service's own budget: no ratio, one retry per second. Retries are spent until a
    // request gets none; an update that changes only another service must not refill it.
    let down = Scripted::always("127.0.0.2", "down", Misbehave::Status(503)).await;
    let other = Scripted::ok("127.0.0.3", "other").await;
    let rules = json!([{"retries": {"attempts": 3, "retryOn": ["5xx"], "backoff": {"base": "1ms", "max": "1ms"}}}]);
    let build = |other_eps: &[SocketAddr], version: &str| {
        let mut cfg = routed(
            &[("web", &[down.addr]), ("other", other_eps)],
            rules.clone(),
        );
        cfg["services"][0]["retryBudget"] = json!({"percent": 0, "minRetriesPerSecond": 1});
        cfg["version"] = version.into();
        cfg
    };
    let proxy = TestProxy::start("web", build(&[other.addr], "v1")).await;
    let mut retried = 0;
    let mut exhausted = false;
    for _ in 0..50 {
        let before = down.requests();
        get_with(&proxy, "/", &[]).await;
        let attempts = down.requests() - before;
        if attempts == 1 {
            exhausted = true;
            break;
        }
        retried += attempts - 1;
    }
    assert!(retried > 0, "the budget allowed no retry at all");
    assert!(exhausted, "the budget never ran out");

    proxy.apply(build(&[other.addr, down.addr], "v2"));
    assert_eq!(proxy.proxy.store.load().unwrap().version, "v2");
    let before = down.requests();
    let resp = get_with(&proxy, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        down.requests() - before,
        1,
        "the update refilled the budget"
    );
}

#[tokio::test]
async fn removing_the_route_restores_plain_balancing() {
    let own_a = Scripted::ok("127.0.0.2", "own-a").await;
    let own_b = Scripted::ok("127.0.0.3", "own-b").await;
    let v2 = Scripted::ok("127.0.0.4", "v2").await;
    let services: [(&str, &[SocketAddr]); 2] =
        [("web", &[own_a.addr, own_b.addr]), ("web-v2", &[v2.addr])];
    let mut with_route = routed(&services, json!([{"backends": [to("web-v2", 1)]}]));
    with_route["services"][0]["balancer"] = "roundRobin".into();
    let proxy = TestProxy::start("web", with_route).await;
    let counts = tally(&proxy, "/", 10, 1).await;
    assert_eq!(counts.get("v2"), Some(&10), "{counts:?}");

    let mut without = config(&services);
    without["services"][0]["balancer"] = "roundRobin".into();
    proxy.apply(without);
    let counts = tally(&proxy, "/", 20, 1).await;
    assert_eq!(counts.get("own-a"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("own-b"), Some(&10), "{counts:?}");
    assert_eq!(v2.requests(), 10);
}

// ---------------------------------------------------------------------------------------
// Golden metrics per Route rule
// ---------------------------------------------------------------------------------------

/// The value of the one series written exactly `series` (name and labels), `None` when the
/// exposition has no such line.
fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn request_series_carry_the_route_rule_that_handled_each_request() {
    let own = Scripted::ok("127.0.0.2", "own").await;
    let api = Scripted::start("127.0.0.2", "api", 2, Misbehave::Status(503)).await;
    let rules = json!([
        {"name": "api", "matches": [{"path": {"prefix": "/api"}}],
         "backends": [to("web-api", 1)], "retries": retries(2, &["5xx"])},
        {"name": "broken", "matches": [{"path": {"prefix": "/broken"}}],
         "fault": {"abort": {"httpStatus": 503, "percentage": 100}}},
        {"matches": [{"path": {"exact": "/third"}}]},
    ]);
    let proxy = TestProxy::start(
        "web",
        routed(&[("web", &[own.addr]), ("web-api", &[api.addr])], rules),
    )
    .await;
    // 7 to the first rule (its first request is retried twice before it succeeds),
    // 3 to the second, 2 to the third (unnamed: labelled by its index), 4 to no rule.
    for (path, n, answer) in [
        ("/api/items", 7, "api"),
        ("/broken", 3, "error:fault_injected"),
        ("/third", 2, "own"),
        ("/other", 4, "own"),
    ] {
        for _ in 0..n {
            assert_eq!(who(&get_with(&proxy, path, &[]).await), answer, "{path}");
        }
    }
    assert_eq!(api.requests(), 9, "7 requests, 2 retries");
    // A request refused before any rule could take it (HTTP/1.1 without `Host`) is the
    // service's, under no rule.
    let mut s = connect(proxy.addr).await;
    s.write_all(b"GET /api/items HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 400"), "{head}");

    let text = proxy.proxy.metrics.encode().unwrap();
    let series = |s: &str| series_value(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
    let rule =
        |r: &str| format!(r#"direction="outbound",service="web",route="shop/web",rule="{r}""#);
    let plain = r#"direction="outbound",service="web""#;
    // Requests as the client sent them, once each, retries not counted again.
    assert_eq!(
        series(&format!("weft_requests_total{{{}}}", rule("api"))),
        7.0
    );
    assert_eq!(
        series(&format!("weft_requests_total{{{}}}", rule("broken"))),
        3.0
    );
    assert_eq!(
        series(&format!("weft_requests_total{{{}}}", rule("2"))),
        2.0
    );
    assert_eq!(series(&format!("weft_requests_total{{{plain}}}")), 5.0);
    assert_eq!(
        series(&format!(
            r#"weft_responses_total{{{plain},status_class="4xx"}}"#
        )),
        1.0
    );
    assert_eq!(
        series(&format!(
            r#"weft_responses_total{{{},status_class="2xx"}}"#,
            rule("api")
        )),
        7.0
    );
    assert_eq!(
        series(&format!(
            r#"weft_responses_total{{{},status_class="5xx"}}"#,
            rule("broken")
        )),
        3.0
    );
    assert_eq!(
        series_value(
            &text,
            &format!(
                r#"weft_responses_total{{{},status_class="2xx"}}"#,
                rule("broken")
            )
        ),
        None
    );
    assert_eq!(
        series(&format!(
            r#"weft_responses_total{{{plain},status_class="2xx"}}"#
        )),
        4.0
    );
    for (labels, n) in [
        (rule("api"), 7.0),
        (rule("broken"), 3.0),
        (plain.to_owned(), 5.0),
    ] {
        assert_eq!(
            series(&format!("weft_request_duration_seconds_count{{{labels}}}")),
            n,
            "{labels}"
        );
        assert_eq!(
            series(&format!(
                r#"weft_request_duration_seconds_bucket{{le="+Inf",{labels}}}"#
            )),
            n,
            "{labels}"
        );
    }
    // The labels add up: the service's requests are the sum over its rules and the rest.
    assert_eq!(
        metric_sum(&text, &["weft_requests_total{", r#"service="web""#]),
        17.0
    );
}
