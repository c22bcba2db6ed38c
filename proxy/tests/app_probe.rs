//! The kubelet's probes through the admin listener: a real admin listener, a real
//! application on loopback (an HTTP server, a tonic gRPC health server, a bare TCP
//! listener), and the JSON the injector writes. An HTTP probe's answer is the
//! application's status; a gRPC probe passes only for `SERVING`; a TCP probe only while
//! the application accepts; an application that is down or too slow is a 503 with the
//! reason, in time for the kubelet; a probe the pod does not have is a 404.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_proxy::{LocalPorts, Proxy, app_probe::AppProbes};

/// An application on 127.0.0.1 that answers by path, and records the headers it saw.
async fn app() -> (SocketAddr, Arc<Mutex<Vec<HeaderMap>>>) {
    app_on("127.0.0.1").await
}

/// The same application, listening on `ip` only.
async fn app_on(ip: &str) -> (SocketAddr, Arc<Mutex<Vec<HeaderMap>>>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    log.lock().unwrap().push(req.headers().clone());
                    async move {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"body\n")));
                        match req.uri().path() {
                            "/ok" => {}
                            "/fail" => *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
                            "/redirect" => {
                                *r.status_mut() = StatusCode::FOUND;
                                r.headers_mut().insert(
                                    http::header::LOCATION,
                                    "http://198.18.0.1/elsewhere".parse().unwrap(),
                                );
                            }
                            "/slow" => tokio::time::sleep(Duration::from_secs(10)).await,
                            _ => *r.status_mut() = StatusCode::NOT_FOUND,
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// [`app_on`] at `ip`, with its port held on `other` too (bound, never listening, without
/// `SO_REUSEADDR`), so that a probe sent to `other` at that port is refused rather than
/// answered by some other test's server that happens to have the same port there.
async fn app_alone_on(
    ip: &str,
    other: &str,
) -> (
    SocketAddr,
    Arc<Mutex<Vec<HeaderMap>>>,
    tokio::net::TcpSocket,
) {
    for _ in 0..50 {
        let (addr, seen) = app_on(ip).await;
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        let at = SocketAddr::new(other.parse().unwrap(), addr.port());
        if held.bind(at).is_ok() {
            return (addr, seen, held);
        }
    }
    panic!("no port free on both {ip} and {other} in 50 tries");
}

/// A port nothing listens on, on 127.0.0.1, held (bound, never listening, without
/// `SO_REUSEADDR`) until the socket returned is dropped, so that no other test's server
/// can take it meanwhile and answer in its place.
fn closed_port() -> (u16, tokio::net::TcpSocket) {
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (held.local_addr().unwrap().port(), held)
}

/// The admin listener of a proxy holding these probes, aimed at loopback (no pod address).
async fn admin(json: &str) -> (SocketAddr, CancellationToken) {
    admin_with(json.parse::<AppProbes>().unwrap()).await
}

/// The admin listener of a proxy holding `probes`.
async fn admin_with(probes: AppProbes) -> (SocketAddr, CancellationToken) {
    let proxy = Proxy::new();
    proxy.app_probes.set(Arc::new(probes)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(weft_proxy::admin::serve(listener, proxy, stop.clone()));
    (addr, stop)
}

/// What the kubelet gets for `path`, as the kubelet asks (GET, its User-Agent).
async fn probe(admin: SocketAddr, method: &str, path: &str) -> (StatusCode, HeaderMap, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .header(http::header::USER_AGENT, "kube-probe/1.34")
        .body(Empty::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_admin_port_answers_the_kubelet_with_the_applications_status() {
    let (app, seen) = app().await;
    let (down, _held) = closed_port();
    let port = app.port();
    let json = format!(
        r#"{{
        "web/readyz": {{"port": {port}, "path": "/ok", "headers": [{{"name": "X-Probe", "value": "kubelet"}}], "timeoutSeconds": 1}},
        "web/livez": {{"port": {port}, "path": "/fail", "timeoutSeconds": 1}},
        "web/startupz": {{"port": {port}, "path": "/slow", "timeoutSeconds": 1}},
        "down/readyz": {{"port": {down}, "path": "/ok"}},
        "moved/readyz": {{"port": {port}, "path": "/redirect", "timeoutSeconds": 1}}
    }}"#
    );
    let (admin, stop) = admin(&json).await;

    // 200 passes through, with the probe's headers, the kubelet's User-Agent and a Host
    // naming the application's port.
    let (status, _, _) = probe(admin, "GET", "/app-health/web/readyz").await;
    assert_eq!(status, StatusCode::OK);
    let headers = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(headers["x-probe"], "kubelet");
    assert_eq!(headers["user-agent"], "kube-probe/1.34");
    assert_eq!(headers["host"], format!("127.0.0.1:{port}").as_str());

    // 500 passes through as 500: the kubelet sees the application failing.
    let (status, _, _) = probe(admin, "GET", "/app-health/web/livez").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);

    // A redirect is not followed, and where it points is not passed on.
    let requests = seen.lock().unwrap().len();
    let (status, headers, _) = probe(admin, "GET", "/app-health/moved/readyz").await;
    assert_eq!(status, StatusCode::FOUND);
    assert!(!headers.contains_key(http::header::LOCATION));
    assert_eq!(seen.lock().unwrap().len(), requests + 1);

    // The application down: 503 with the reason.
    let (status, _, body) = probe(admin, "GET", "/app-health/down/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("connect to the application"), "{body}");

    // Too slow: 503 once the probe's timeout (1 s) has passed, not when the app answers.
    let started = Instant::now();
    let (status, _, body) = probe(admin, "GET", "/app-health/web/startupz").await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("did not answer within 1s"), "{body}");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(1500),
        "answered after {took:?}"
    );

    // Probes the pod does not have, and methods the kubelet does not use.
    for path in [
        "/app-health/other/readyz",
        "/app-health/web/healthz",
        "/app-health/web",
        "/app-health/",
    ] {
        let (status, _, _) = probe(admin, "GET", path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _, _) = probe(admin, "POST", "/app-health/web/readyz").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    stop.cancel();
}

/// An application serving HTTPS with a self-signed certificate: the probe goes over TLS
/// and, like the kubelet's, does not verify the certificate; a plain-HTTP app behind an
/// HTTPS probe is a 503 naming TLS.
#[tokio::test]
async fn https_probes_go_over_tls_without_verifying() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["app.invalid".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let mut r = Response::new(Full::new(Bytes::new()));
                    if req.uri().path() != "/secure" {
                        *r.status_mut() = StatusCode::NOT_FOUND;
                    }
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let (plain, _) = app().await;
    let json = format!(
        r#"{{
        "tls/readyz": {{"port": {port}, "path": "/secure", "scheme": "HTTPS"}},
        "tls/livez": {{"port": {port}, "path": "/missing", "scheme": "HTTPS"}},
        "plain/readyz": {{"port": {}, "path": "/ok", "scheme": "HTTPS"}}
    }}"#,
        plain.port()
    );
    let (admin, stop) = admin(&json).await;
    let (status, _, body) = probe(admin, "GET", "/app-health/tls/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = probe(admin, "GET", "/app-health/tls/livez").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, body) = probe(admin, "GET", "/app-health/plain/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("TLS with the application"), "{body}");
    stop.cancel();
}

/// A proxy without application probes answers 404 on their paths and serves the rest.
#[tokio::test]
async fn without_probes_the_paths_are_not_found() {
    let proxy = Proxy::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(weft_proxy::admin::serve(listener, proxy, stop.clone()));
    let (status, _, _) = probe(addr, "GET", "/app-health/web/readyz").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = probe(addr, "GET", "/live").await;
    assert_eq!(status, StatusCode::OK);
    stop.cancel();
}

/// The User-Agents a gRPC application saw.
type SeenAgents = Arc<Mutex<Vec<String>>>;

/// A tonic gRPC server with the standard health service on loopback; `shop.Cart` starts
/// SERVING, `shop.Down` NOT_SERVING (the whole server, `""`, is SERVING). Dropping the
/// returned sender stops the server.
async fn grpc_app() -> (
    SocketAddr,
    tonic_health::server::HealthReporter,
    tokio::sync::oneshot::Sender<()>,
    SeenAgents,
) {
    use tonic_health::ServingStatus;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Cart", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("shop.Down", ServingStatus::NotServing)
        .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agents = SeenAgents::default();
    let log = agents.clone();
    let record = move |req: tonic::Request<()>| {
        if let Some(ua) = req.metadata().get("user-agent") {
            log.lock()
                .unwrap()
                .push(ua.to_str().unwrap_or_default().to_owned());
        }
        Ok(req)
    };
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(record))
            .add_service(health)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
    });
    (addr, reporter, stop, agents)
}

/// A listener that accepts connections and never says anything.
async fn mute_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    port
}

/// gRPC probes: 200 only while the health service says SERVING (for the probe's service,
/// or the whole server without one); NOT_SERVING, an unknown service, an application
/// that is not gRPC, one that never answers and one that is down are 503 with the reason.
#[tokio::test]
async fn grpc_probes_pass_only_for_serving() {
    let (grpc, reporter, stop, agents) = grpc_app().await;
    let (http_only, _) = app().await;
    let mute = mute_app().await;
    let (down, _held) = closed_port();
    let port = grpc.port();
    let json = format!(
        r#"{{
        "api/readyz": {{"port": {port}, "handler": "grpc", "service": "shop.Cart", "timeoutSeconds": 1}},
        "api/livez": {{"port": {port}, "handler": "grpc", "timeoutSeconds": 1}},
        "api/startupz": {{"port": {port}, "handler": "grpc", "service": "shop.Down", "timeoutSeconds": 1}},
        "nope/readyz": {{"port": {port}, "handler": "grpc", "service": "shop.Nope"}},
        "http/readyz": {{"port": {http}, "handler": "grpc"}},
        "mute/readyz": {{"port": {mute}, "handler": "grpc", "timeoutSeconds": 1}},
        "down/readyz": {{"port": {down}, "handler": "grpc"}}
    }}"#,
        http = http_only.port(),
    );
    let (admin, admin_stop) = admin(&json).await;

    let (status, _, body) = probe(admin, "GET", "/app-health/api/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("SERVING"), "{body}");
    // The application sees the kubelet's User-Agent first (tonic appends its own, as
    // grpc-go does to the kubelet's).
    let seen = agents.lock().unwrap().clone();
    assert!(
        seen.len() == 1 && seen[0].starts_with("kube-probe/1.34"),
        "{seen:?}"
    );
    // No service: the whole server's health.
    let (status, _, body) = probe(admin, "GET", "/app-health/api/livez").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, _, body) = probe(admin, "GET", "/app-health/api/startupz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("NOT_SERVING"), "{body}");
    let (status, _, body) = probe(admin, "GET", "/app-health/nope/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("NotFound"), "{body}");
    let (status, _, body) = probe(admin, "GET", "/app-health/http/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("gRPC health check failed"), "{body}");
    let (status, _, body) = probe(admin, "GET", "/app-health/down/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("connect to the application"), "{body}");

    // Accepted but never answered: 503 once the probe's timeout has passed.
    let started = Instant::now();
    let (status, _, body) = probe(admin, "GET", "/app-health/mute/readyz").await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("did not answer within 1s"), "{body}");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(1500),
        "answered after {took:?}"
    );

    // The application changes its mind, and the next probe sees it.
    reporter
        .set_service_status("shop.Cart", tonic_health::ServingStatus::NotServing)
        .await;
    let (status, _, body) = probe(admin, "GET", "/app-health/api/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("NOT_SERVING"), "{body}");
    reporter
        .set_service_status("shop.Cart", tonic_health::ServingStatus::Serving)
        .await;
    let (status, _, _) = probe(admin, "GET", "/app-health/api/readyz").await;
    assert_eq!(status, StatusCode::OK);

    // The application goes down: the probe that passed a moment ago fails.
    drop(stop);
    let mut last = (StatusCode::OK, String::new());
    for _ in 0..100 {
        let (status, _, body) = probe(admin, "GET", "/app-health/api/readyz").await;
        last = (status, body);
        if status != StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last.0, StatusCode::SERVICE_UNAVAILABLE, "{}", last.1);
    assert!(last.1.contains("connect to the application"), "{}", last.1);
    admin_stop.cancel();
}

/// Polls `check` every 50 ms for at most 5 s; whether it held once.
async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// TCP probes: 200 while the application accepts connections on its port, 503 once it
/// stops listening (where the inbound proxy, accepting the kubelet's connection itself,
/// would have said Ready), and 503 when the connection is not accepted within the
/// probe's timeout.
#[tokio::test]
async fn tcp_probes_pass_only_while_the_application_accepts() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let app = tokio::spawn(async move {
        while let Ok((_stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });

    // A listener whose accept queue is full: the kernel drops further SYNs, so a
    // connection is never accepted (the backlog of 1 is filled below).
    let full = tokio::net::TcpSocket::new_v4().unwrap();
    full.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full_port = full.local_addr().unwrap().port();
    let full = full.listen(1).unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(("127.0.0.1", full_port)),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }

    let json = format!(
        r#"{{
        "db/readyz": {{"port": {port}, "handler": "tcpSocket", "timeoutSeconds": 1}},
        "full/readyz": {{"port": {full_port}, "handler": "tcpSocket", "timeoutSeconds": 1}}
    }}"#
    );
    let (admin, stop) = admin(&json).await;

    let (status, _, body) = probe(admin, "GET", "/app-health/db/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("accepted"), "{body}");
    // The connection reached the application itself, not something in front of it.
    assert!(eventually(|| async { accepted.load(std::sync::atomic::Ordering::SeqCst) == 1 }).await);

    let started = Instant::now();
    let (status, _, body) = probe(admin, "GET", "/app-health/full/readyz").await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("did not answer within 1s"), "{body}");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(1500),
        "answered after {took:?}"
    );

    // The application dies: its port closes, and the probe says so.
    app.abort();
    let _ = app.await;
    let (status, _, body) = probe(admin, "GET", "/app-health/db/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("connect to the application"), "{body}");
    drop((full, fillers));
    stop.cancel();
}

/// With the pod's address known (as injection sets `WEFT_POD_IP`), a probe goes where the
/// kubelet's would have: an application listening on the pod's address alone passes, one
/// listening on localhost alone fails, unless its port is one of the pod's
/// `inbound-loopback-ports`, which the inbound proxy also forwards to loopback. Here
/// 127.0.0.2 plays the pod's address.
#[tokio::test]
async fn probes_go_to_the_pods_address_as_the_kubelets_would() {
    let (pod_only, seen, _held) = app_alone_on("127.0.0.2", "127.0.0.1").await;
    let (local_only, _, _held_too) = app_alone_on("127.0.0.1", "127.0.0.2").await;
    let (local_opted_in, _) = app_on("127.0.0.1").await;
    let json = format!(
        r#"{{
        "pod/readyz": {{"port": {}, "path": "/ok", "timeoutSeconds": 1}},
        "local/readyz": {{"port": {}, "path": "/ok", "timeoutSeconds": 1}},
        "opted/readyz": {{"handler": "tcpSocket", "port": {}, "timeoutSeconds": 1}}
    }}"#,
        pod_only.port(),
        local_only.port(),
        local_opted_in.port()
    );
    let local = LocalPorts {
        opaque: Default::default(),
        loopback: local_opted_in.port().to_string().parse().unwrap(),
    };
    let probes = json
        .parse::<AppProbes>()
        .unwrap()
        .aimed_at(Some("127.0.0.2".parse().unwrap()), &local);
    let (aimed, stop) = admin_with(probes).await;

    let (status, _, body) = probe(aimed, "GET", "/app-health/pod/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let headers = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        headers["host"],
        format!("127.0.0.2:{}", pod_only.port()).as_str()
    );

    let (status, _, body) = probe(aimed, "GET", "/app-health/local/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("127.0.0.2"), "{body}");

    let (status, _, body) = probe(aimed, "GET", "/app-health/opted/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    stop.cancel();

    // Without the pod's address (a proxy run by hand), loopback, as before.
    let (plain, stop) = admin(&json).await;
    let (status, _, _) = probe(plain, "GET", "/app-health/pod/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, _) = probe(plain, "GET", "/app-health/local/readyz").await;
    assert_eq!(status, StatusCode::OK);
    stop.cancel();
}
