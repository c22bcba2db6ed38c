//! Inbound authorization and the mTLS mode, through the proxy's inbound side: an
//! `--inbound-forward`-style listener ([`ListenerKind::InboundTo`]) with plain-text
//! (unauthenticated) clients, and, for clients with a mesh identity, an inbound
//! [`HttpConn`] built `with_client_identity` and served on a loopback socket (no TLS
//! terminates here yet: the mTLS work sets that identity from the verified client
//! certificate; these tests stand in for it).

// Test helpers: a failed setup step should panic the test that called it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use serde_json::{Value, json};
use support::*;
use tokio::{io::AsyncWriteExt, net::TcpListener};
use tokio_util::sync::CancellationToken;
use weft_proxy::{
    Proxy,
    detect::Protocol,
    http::{HttpConn, HttpTarget},
    metrics::{Direction, ServiceLabel},
    server::ListenerKind,
    store::EndpointState,
};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const PROM: &str = "spiffe://cluster.local/ns/monitoring/sa/prometheus";

fn inbound_config(inbound: Value) -> Value {
    let mut cfg = config(&[]);
    cfg["inbound"] = inbound;
    cfg
}

/// A proxy whose inbound listener sends every connection to `app`, with these inbound
/// settings.
fn inbound_proxy(app: SocketAddr, inbound: Value) -> TestProxy {
    TestProxy::start_kind(
        Proxy::new(),
        ListenerKind::InboundTo(app),
        inbound_config(inbound),
    )
}

/// An inbound listener on 127.0.0.1:0 whose every connection is a client presenting
/// mesh identity `identity`, as a terminated mTLS session would be.
struct IdentifiedListener {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for IdentifiedListener {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn identified(proxy: &Arc<Proxy>, app: SocketAddr, identity: &str) -> IdentifiedListener {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let (proxy, identity, stop) = (proxy.clone(), Arc::<str>::from(identity), shutdown.clone());
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => return,
                r = listener.accept() => r.unwrap(),
            };
            let conn = HttpConn::new(
                proxy.store.clone(),
                proxy.metrics.clone(),
                Direction::Inbound,
                HttpTarget::Fixed(Arc::new(EndpointState::with_http1_limit(
                    app,
                    Duration::from_secs(1),
                    16,
                ))),
                ServiceLabel::local(),
                proxy.limits,
            )
            .with_client(peer.ip())
            .with_client_identity(identity.clone());
            tokio::spawn(weft_proxy::http::serve(
                stream,
                Protocol::Http1,
                Arc::new(conn),
                stop.clone(),
            ));
        }
    });
    IdentifiedListener { addr, shutdown }
}

async fn send(client: &Client<HttpConnector, Body>, req: Request<Body>) -> (Response<()>, String) {
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .expect("a response within 5 s")
        .expect("a response");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        Response::from_parts(parts, ()),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

async fn get_path(addr: SocketAddr, path: &str) -> (Response<()>, String) {
    send(
        &h1_client(),
        Request::get(format!("http://{addr}{path}"))
            .body(full(""))
            .unwrap(),
    )
    .await
}

/// Sum of every series of `name` whose labels contain all of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.contains("_created"))
        .filter(|l| labels.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The shop's policy: unauthenticated clients may GET anything but /admin; web may
/// also POST /api; nothing else.
fn shop_policy() -> Value {
    json!({"authorization": [{
        "name": "shop/web",
        "defaultAction": "deny",
        "rules": [
            {"action": "allow", "from": [{"unauthenticated": true}], "to": [{"methods": ["GET"]}]},
            {"action": "allow", "from": [{"identities": [WEB]}],
             "to": [{"paths": [{"prefix": "/api"}], "methods": ["GET", "POST"]}]},
            {"action": "allow",
             "from": [{"identityPrefixes": ["spiffe://cluster.local/ns/monitoring/"]}],
             "to": [{"paths": [{"exact": "/metrics"}]}]},
            {"action": "deny", "to": [{"paths": [{"prefix": "/admin"}]}]}
        ]
    }]})
}

#[tokio::test]
async fn a_denied_request_gets_403_forbidden_naming_the_policy_and_never_reaches_the_app() {
    let app = Scripted::ok("127.0.0.2", "app").await;
    let proxy = inbound_proxy(app.addr, shop_policy());

    let (resp, body) = get_path(proxy.addr, "/shop").await;
    assert_eq!(resp.status(), StatusCode::OK, "{body}");
    assert_eq!(app.requests(), 1);

    let (resp, body) = get_path(proxy.addr, "/admin/users").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(header(&resp, "weft-error"), "forbidden");
    assert_eq!(header(&resp, "weft-policy"), "shop/web");
    assert!(body.contains("shop/web"), "{body}");
    // A method no allow rule takes: the default denies.
    let (resp, _) = send(
        &h1_client(),
        Request::post(proxy.url("/shop")).body(full("x")).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(app.requests(), 1, "no denied request reached the app");

    let metrics = proxy.proxy.metrics.encode().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "weft_authz_denials_total",
            &["policy=\"shop/web\""]
        ),
        2.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn spellings_of_a_denied_path_are_denied_and_the_app_gets_the_judged_path() {
    let app = Scripted::ok("127.0.0.2", "app").await;
    let proxy = inbound_proxy(app.addr, shop_policy());
    let attempts = [
        "/admin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/%61%64%6d%69%6e/users",
        "/x/../admin",
        "/shop/../admin",
        "/admin/./",
        "///admin",
        "/ADMIN",
        "/Admin/users",
        "/%41DMIN",
    ];
    let mut bypasses = Vec::new();
    for path in attempts {
        let (resp, _) = get_path(proxy.addr, path).await;
        if resp.status() != StatusCode::FORBIDDEN {
            bypasses.push((path, resp.status()));
        }
    }
    assert_eq!(bypasses, [], "bypasses");
    assert_eq!(app.requests(), 0);

    // `/admin/..` is the root: allowed (GET), and the app sees `/`, not `/admin/..`.
    let (resp, _) = get_path(proxy.addr, "/admin/..").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(app.last().target, "/");
    // Paths keep their case on the way to the app: a deny rule only judges them
    // without it.
    let (resp, _) = get_path(proxy.addr, "/Shop/Items").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(app.last().target, "/Shop/Items");
}

#[tokio::test]
async fn identities_and_namespaces_decide_what_each_client_may_call() {
    let app = Scripted::ok("127.0.0.2", "app").await;
    let proxy = inbound_proxy(app.addr, shop_policy());
    let web = identified(&proxy.proxy, app.addr, WEB).await;
    let cart = identified(&proxy.proxy, app.addr, CART).await;
    let prom = identified(&proxy.proxy, app.addr, PROM).await;

    let post = |addr: SocketAddr, path: &str| {
        Request::post(format!("http://{addr}{path}"))
            .body(full("x"))
            .unwrap()
    };
    let client = h1_client();
    // web: POST /api allowed; GET /shop not (only unauthenticated clients get that rule).
    assert_eq!(
        send(&client, post(web.addr, "/api/orders"))
            .await
            .0
            .status(),
        200
    );
    assert_eq!(get_path(web.addr, "/shop").await.0.status(), 403);
    assert_eq!(get_path(web.addr, "/admin").await.0.status(), 403);
    // cart: nothing.
    let (resp, _) = send(&client, post(cart.addr, "/api/orders")).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(header(&resp, "weft-error"), "forbidden");
    assert_eq!(get_path(cart.addr, "/shop").await.0.status(), 403);
    // monitoring namespace: /metrics only.
    assert_eq!(get_path(prom.addr, "/metrics").await.0.status(), 200);
    assert_eq!(get_path(prom.addr, "/metrics/x").await.0.status(), 403);
    assert_eq!(app.requests(), 2);
}

#[tokio::test]
async fn strict_mtls_refuses_plain_text_clients_and_permissive_accepts_them() {
    let app = Scripted::ok("127.0.0.2", "app").await;
    let proxy = inbound_proxy(app.addr, json!({"mtls": "strict"}));
    let (resp, _) = get_path(proxy.addr, "/").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(header(&resp, "weft-error"), "mtls_required");
    // A client with a mesh identity is accepted.
    let web = identified(&proxy.proxy, app.addr, WEB).await;
    assert_eq!(get_path(web.addr, "/").await.0.status(), 200);
    assert_eq!(app.requests(), 1);

    proxy.apply(inbound_config(json!({"mtls": "permissive"})));
    assert_eq!(get_path(proxy.addr, "/").await.0.status(), 200);
    assert_eq!(app.requests(), 2);
}

#[tokio::test]
async fn a_grpc_denial_is_trailers_only_permission_denied() {
    let app = Scripted::ok("127.0.0.2", "app").await;
    let proxy = inbound_proxy(
        app.addr,
        json!({"authorization": [{"name": "shop/grpc", "defaultAction": "deny"}]}),
    );
    let req = Request::post(proxy.url("/shop.Cart/Add"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(Vec::from(&b"\0\0\0\0\0"[..])))
        .unwrap();
    let (resp, body) = send(&h2_client(), req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "grpc-status"), "7");
    assert_eq!(header(&resp, "weft-error"), "forbidden");
    assert!(header(&resp, "grpc-message").contains("shop/grpc"));
    assert!(body.is_empty());
    assert_eq!(app.requests(), 0);
}

#[tokio::test]
async fn a_denied_opaque_connection_is_closed_before_reaching_the_app() {
    let (app, _task) = tcp_backend("127.0.0.2", "echo-until-eof").await;
    let mut inbound = json!({"authorization": [{"name": "db/pg", "defaultAction": "deny",
        "rules": [{"action": "allow", "to": [{"ports": [app.port()]}],
                   "from": [{"identities": [WEB]}]}]}]});
    let mut cfg = inbound_config(inbound.clone());
    cfg["opaquePorts"] = json!([app.port()]);
    let proxy = TestProxy::start_kind(Proxy::new(), ListenerKind::InboundTo(app), cfg.clone());

    // Plain text has no identity: denied, closed without a byte.
    let mut s = connect(proxy.addr).await;
    let _ = s.write_all(b"hello").await;
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
    let metrics = proxy.proxy.metrics.encode().unwrap();
    assert_eq!(
        metric(&metrics, "weft_authz_denials_total", &["policy=\"db/pg\""]),
        1.0
    );

    // Unauthenticated clients allowed: the bytes go through.
    inbound["authorization"][0]["rules"][0]["from"] = json!([{"unauthenticated": true}]);
    cfg["inbound"] = inbound;
    proxy.apply(cfg.clone());
    let mut s = connect(proxy.addr).await;
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut got)
        .await
        .unwrap();
    assert_eq!(got, "got 5 bytes");

    // Strict mTLS closes plain-text opaque connections too.
    cfg["inbound"] = json!({"mtls": "strict"});
    proxy.apply(cfg);
    let mut s = connect(proxy.addr).await;
    let _ = s.write_all(b"hello").await;
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
    let metrics = proxy.proxy.metrics.encode().unwrap();
    assert!(
        metric(&metrics, "weft_errors_total", &["mtls_required"]) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_policy_in_dry_run_lets_everything_through_and_counts_what_it_would_deny() {
    let app = Scripted::ok("127.0.0.2", "app").await;
    let proxy = inbound_proxy(
        app.addr,
        json!({"authorization": [{"name": "shop/trial", "defaultAction": "deny", "dryRun": true,
            "rules": [{"action": "allow", "to": [{"paths": [{"prefix": "/public"}]}]}]}]}),
    );
    for path in ["/public/a", "/private", "/private/b"] {
        assert_eq!(get_path(proxy.addr, path).await.0.status(), 200, "{path}");
    }
    assert_eq!(app.requests(), 3);
    let metrics = proxy.proxy.metrics.encode().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "weft_dry_run_decisions_total",
            &["kind=\"authorization\""]
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "weft_authz_denials_total", &[]), 0.0);
}

#[tokio::test]
async fn a_per_client_rate_limit_counts_identified_clients_by_identity() {
    let app = Scripted::ok("127.0.0.2", "app").await;
    let proxy = inbound_proxy(
        app.addr,
        json!({"rateLimit": {"name": "shop/web", "requestsPerSecond": 1, "burst": 2,
                             "per": "client"}}),
    );
    // Two listeners for one identity: two connections (here from the same address, in a
    // mesh from any replica) share the identity's bucket.
    let web_a = identified(&proxy.proxy, app.addr, WEB).await;
    let web_b = identified(&proxy.proxy, app.addr, WEB).await;
    let cart = identified(&proxy.proxy, app.addr, CART).await;
    assert_eq!(get_path(web_a.addr, "/").await.0.status(), 200);
    assert_eq!(get_path(web_b.addr, "/").await.0.status(), 200);
    let (resp, _) = get_path(web_a.addr, "/").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another identity from the same source address has its own bucket.
    assert_eq!(get_path(cart.addr, "/").await.0.status(), 200);
    assert_eq!(get_path(cart.addr, "/").await.0.status(), 200);
}

#[tokio::test]
async fn an_invalid_authorization_is_refused_naming_the_field() {
    let proxy = Proxy::new();
    let cfg = inbound_config(
        json!({"authorization": [{"name": "a/b", "defaultAction": "deny",
        "rules": [{"action": "allow", "from": [{"identityPrefixes": ["spiffe://td/ns/shop"]}]}]}]}),
    );
    let error = proxy
        .store
        .apply(serde_json::from_value(cfg).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("inbound.authorization[0].rules[0].from[0].identityPrefixes[0]"),
        "{error}"
    );
}
