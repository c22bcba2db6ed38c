//! The admin listener (default port 15021), for the kubelet and for people:
//!
//! | path | answer |
//! | --- | --- |
//! | `/live` | 200 while the process runs |
//! | `/ready` | 200 once a config is active (and, with identity on, a valid certificate installed), 503 before that (the body says why) and while draining |
//! | `/metrics` | Prometheus/OpenMetrics text |
//! | `/config` | the active config as JSON, with its version and generation (loopback only) |
//! | `/log-level` | `GET`: the log filter in force (and, when temporary, for how long more and what comes after); `PUT` (loopback only): a new one, in force at once until the next `PUT` or a restart, or with `?for=10m` for that long, then back to the last lasting one; 400 naming what is wrong, the old filter kept ([`crate::log_level`]) |
//! | `/tap` | (loopback only) one JSON line per request this proxy finishes from now on, as the access log writes it, filtered by `direction`, `method`, `authority` and `path` (a prefix), ending after `max` requests (default 1,000) or `duration` (default 1m), with a last line saying why; 400 naming a bad parameter, 429 while 4 taps are open ([`crate::tap`]) |
//! | `/app-health/<container>/<livez\|readyz\|startupz>` | the application's own probe, performed against the pod's address (`WEFT_POD_IP`; loopback for a port of `weft.dev/inbound-loopback-ports`, or when unset): for `httpGet` its status code, for `grpc` 200 when the health service answers `SERVING`, for `tcpSocket` 200 when it accepts a connection; 503 with the reason otherwise ([`crate::app_probe`]); 404 for a probe the pod does not have |
//!
//! The listener binds every address so that the kubelet and Prometheus reach it, which
//! makes it reachable from every pod too: what reveals the mesh's topology (`/config`
//! names every service, endpoint and identity; `/tap` shows requests' paths and clients)
//! and what changes the proxy (`PUT /log-level`) are answered only to loopback peers (`kubectl port-forward`, `kubectl
//! exec`), 403 otherwise. The application probes are
//! answered to anyone, as the kubelet is remote: they perform only the fixed probes the
//! pod's spec wrote, against the pod's own application, and return only a verdict.
//! Connections are bounded in number, in head size and in how long their head may take.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use weft_api::log_filter;

use crate::{
    Proxy, app_probe,
    limits::{ADMIN_MAX_HEADER_BYTES, Limit},
    log_level::LogLevelError,
    tap::{TapBody, TapError, TapRequest},
};

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    tracing::info!(addr = ?listener.local_addr().ok(), "admin listening");
    let slots = Arc::new(Semaphore::new(
        proxy
            .limits
            .max_admin_connections
            .min(Semaphore::MAX_PERMITS),
    ));
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            proxy.metrics.limit_refused(Limit::AdminConnections);
            tracing::debug!(%peer, "admin connection limit reached; closing");
            continue;
        };
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        let local = Peer::of(peer);
        tracker.spawn(async move {
            let _slot = slot;
            let metrics = proxy.metrics.clone();
            let header_read_timeout = proxy.limits.admin_header_read_timeout;
            let svc = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move {
                    if req.uri().path().starts_with(app_probe::PATH_PREFIX) {
                        return Ok::<_, Infallible>(app_health(&proxy, &req).await);
                    }
                    if req.uri().path() == LOG_LEVEL_PATH {
                        return Ok(log_level(&proxy, local, req).await);
                    }
                    if req.uri().path() == TAP_PATH {
                        return Ok(tap(&proxy, local, &req));
                    }
                    Ok(route(&proxy, local, &req))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_header_size(ADMIN_MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(error) = r {
                if error.is_timeout() {
                    metrics.limit_refused(Limit::HeaderReadTimeout);
                }
                tracing::debug!(%error, "admin connection error");
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// An admin answer's body: whole, or a tap's stream.
type AdminBody = Either<Full<Bytes>, TapBody>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<AdminBody> {
    let mut r = Response::new(Either::Left(Full::new(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Where an admin request comes from, as far as what it may see is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// From inside the pod: `127.0.0.0/8`, `::1`, or `::ffff:127.0.0.0/104`.
    Loopback,
    /// From anywhere else: another pod, a node, the kubelet, Prometheus.
    Remote,
}

impl Peer {
    /// Classifies a connection's peer address.
    pub fn of(peer: SocketAddr) -> Peer {
        // The inbound listener forwards from 127.0.0.6 / ::6: a connection that came
        // through it (an admin port not skipped by `init`) is another pod's, not local.
        let relayed = |v4: std::net::Ipv4Addr| v4 == crate::server::INBOUND_SOURCE_V4;
        let loopback = match peer.ip() {
            IpAddr::V4(v4) => v4.is_loopback() && !relayed(v4),
            IpAddr::V6(v6) => {
                v6.is_loopback()
                    || v6
                        .to_ipv4_mapped()
                        .is_some_and(|v4| v4.is_loopback() && !relayed(v4))
            }
        };
        if loopback {
            Peer::Loopback
        } else {
            Peer::Remote
        }
    }
}

/// Where the log filter is read and replaced.
pub const LOG_LEVEL_PATH: &str = "/log-level";

/// `/log-level`: `GET` the filter in force, `PUT` a new one (loopback peers only).
async fn log_level(proxy: &Proxy, peer: Peer, req: Request<Incoming>) -> Response<AdminBody> {
    let Some(control) = proxy.log_control.get() else {
        return text(
            StatusCode::NOT_FOUND,
            "this process's log filter cannot be changed\n",
        );
    };
    match *req.method() {
        Method::GET | Method::HEAD => text(StatusCode::OK, format!("{}\n", control.describe())),
        Method::PUT if peer == Peer::Remote => text(
            StatusCode::FORBIDDEN,
            "the log filter is changed by loopback clients only (kubectl weft log-level, kubectl port-forward, or exec into the pod)\n",
        ),
        Method::PUT => {
            let lasting = match req.uri().query().map(|q| q.split_once('=')) {
                None => None,
                Some(Some(("for", d))) => match d.parse::<weft_api::Duration>() {
                    Ok(d) => Some(d.as_std()),
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("for={d}: {e}\n")),
                },
                Some(_) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "PUT /log-level takes one parameter, for=DURATION (a temporary change)\n",
                    );
                }
            };
            // A filter is at most 1 KiB; a few bytes more for a trailing newline.
            let body = http_body_util::Limited::new(req.into_body(), log_filter::MAX_LEN + 16);
            let bytes = match http_body_util::BodyExt::collect(body).await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("a log filter is at most {} bytes\n", log_filter::MAX_LEN),
                    );
                }
            };
            let Ok(filter) = std::str::from_utf8(&bytes) else {
                return text(StatusCode::BAD_REQUEST, "the log filter is not UTF-8\n");
            };
            let changed = match lasting {
                None => control.set(filter),
                Some(d) => control.set_for(filter, d),
            };
            match changed {
                Ok(before) => {
                    let now = control.describe();
                    // `warn`: shown under any filter but `error` or `off`, including one
                    // that just lowered the verbosity.
                    tracing::warn!(from = %before, to = %now, "log filter changed");
                    text(StatusCode::OK, format!("{now}\n"))
                }
                Err(e @ (LogLevelError::Invalid(_) | LogLevelError::BadDuration)) => {
                    text(StatusCode::BAD_REQUEST, format!("{e}\n"))
                }
                Err(e @ LogLevelError::Reload(_)) => {
                    text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
                }
            }
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or PUT only\n"),
    }
}

/// Where requests are tapped.
pub const TAP_PATH: &str = "/tap";

/// `/tap`: streams the requests this proxy finishes (loopback peers only).
fn tap(proxy: &Proxy, peer: Peer, req: &Request<Incoming>) -> Response<AdminBody> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    if peer == Peer::Remote {
        return text(
            StatusCode::FORBIDDEN,
            "/tap is served to loopback clients only (kubectl weft tap, kubectl port-forward, or exec into the pod)\n",
        );
    }
    let request = match TapRequest::parse(req.uri().query()) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    tracing::info!(
        filter = ?request.filter,
        max = request.max,
        duration = ?request.duration,
        "tap opened"
    );
    match proxy.taps.open(request, proxy.draining.clone()) {
        Ok(body) => {
            let mut r = Response::new(Either::Right(body));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            );
            r
        }
        Err(e @ TapError::TooMany) => text(StatusCode::TOO_MANY_REQUESTS, format!("{e}\n")),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// `/app-health/<container>/<kind>`: the application's answer to its own probe.
async fn app_health(proxy: &Proxy, req: &Request<Incoming>) -> Response<AdminBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let path = req.uri().path();
    let Some(probe) = proxy.app_probes.get().and_then(|p| p.for_path(path)) else {
        return text(StatusCode::NOT_FOUND, "no such application probe\n");
    };
    match probe
        .check(req.headers().get(http::header::USER_AGENT))
        .await
    {
        Ok(passed) => text(passed.status(), format!("{passed}\n")),
        Err(error) => {
            tracing::debug!(%path, %error, "application probe failed");
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n"))
        }
    }
}

fn route(proxy: &Proxy, peer: Peer, req: &Request<Incoming>) -> Response<AdminBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            let identity = proxy.identity.as_ref().map(|i| i.readiness());
            if proxy.draining.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if let Some(Err(why)) = identity {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
            } else if proxy.store.load().is_some() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no config yet\n")
            }
        }
        "/metrics" => match proxy.metrics.encode() {
            Ok(body) => {
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed\n",
            ),
        },
        "/config" if peer == Peer::Remote => text(
            StatusCode::FORBIDDEN,
            "/config is served to loopback clients only (kubectl port-forward, or exec into the pod)\n",
        ),
        "/config" => match proxy.store.load() {
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no config yet\n"),
            Some(s) => {
                let identity = proxy.identity.as_ref().map(|i| match i.current() {
                    Some(c) => serde_json::json!({
                        "identity": &*c.identity,
                        "notAfter": c.not_after_unix(),
                        "renewAt": c.renew_at().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                        "chainRoot": &c.chain_root,
                        "trustRoots": &c.trust_roots,
                    }),
                    None => serde_json::json!({ "identity": null, "error": i.readiness().err() }),
                });
                let body = serde_json::json!({
                    "version": s.version,
                    "generation": s.generation,
                    "identity": identity,
                    "config": s.raw,
                });
                match serde_json::to_vec_pretty(&body) {
                    Ok(json) => {
                        let mut r = text(StatusCode::OK, json);
                        r.headers_mut()
                            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                        r
                    }
                    Err(_) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "config encoding failed\n",
                    ),
                }
            }
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live /ready /metrics /config /log-level /tap\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_count_as_local() {
        for local in [
            "127.0.0.1:1",
            "127.3.2.1:1",
            "[::1]:1",
            "[::ffff:127.0.0.9]:1",
        ] {
            assert_eq!(Peer::of(local.parse().unwrap()), Peer::Loopback, "{local}");
        }
        for remote in [
            "198.18.0.1:1",
            "10.0.0.1:1",
            "0.0.0.0:1",
            "[::ffff:10.0.0.1]:1",
            "[fd00::1]:1",
            "[::]:1",
            "[::127.0.0.1]:1",
            // What the inbound listener forwards from.
            "127.0.0.6:1",
            "[::6]:1",
            "[::ffff:127.0.0.6]:1",
        ] {
            assert_eq!(Peer::of(remote.parse().unwrap()), Peer::Remote, "{remote}");
        }
    }
}
