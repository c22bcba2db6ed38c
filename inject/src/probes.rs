//! The kubelet's HTTP, gRPC and TCP probes, rewritten to go through the proxy's admin port.
//!
//! The kubelet probes a pod's IP in plain text and with no mesh identity. With the
//! redirect in place those probes land on the inbound proxy, which a `Strict` Policy (or a
//! `Deny` default) refuses, so the pod would go unready; a `tcpSocket` probe, accepted by
//! the proxy itself, would instead pass even with the application dead. As Istio does,
//! injection points each application container's `httpGet`, `grpc` and `tcpSocket` probe
//! at the proxy's admin port, which `init` never redirects and no Policy governs, and
//! hands the original to the proxy, which performs it against the application on
//! loopback:
//!
//! ```text
//!  kubelet ── GET podIP:15021/app-health/<container>/<livez|readyz|startupz> ──▶ proxy admin
//!     httpGet:   proxy ── GET 127.0.0.1:<port><path> ──▶ app     (the app's status)
//!     grpc:      proxy ── grpc.health.v1.Health/Check ──▶ app    (200 only for SERVING)
//!     tcpSocket: proxy ── connect 127.0.0.1:<port> ──▶ app       (200 once connected)
//!  kubelet ◀── that answer, or 503 when unreachable or too slow ───────────┘
//! ```
//!
//! Kept as they are: `exec` probes (they never touch the network), `httpGet` and
//! `tcpSocket` probes with a `host` (see docs/injection.md, "Probes"), and probes of the
//! pod's own init containers. `scheme: HTTPS` probes are rewritten too: the proxy probes
//! over TLS. The originals travel in one environment variable ([`keys::env::APP_PROBES`])
//! as JSON, which [`uninject`](crate::uninject) reads back to restore them.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort, GRPCAction, HTTPGetAction, HTTPHeader, PodSpec, Probe,
        TCPSocketAction,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize, Serialize};

use crate::keys;

/// The admin path prefix of rewritten probes: `/app-health/<container>/<kind>`.
pub const PATH_PREFIX: &str = "/app-health/";

/// The kubelet's probe timeout when a probe sets none (Kubernetes' default).
const DEFAULT_TIMEOUT_SECONDS: i32 = 1;

/// One original probe as the proxy receives it in `WEFT_APP_PROBES` (keyed by
/// `<container>/<kind>`). The proxy's `app_probe` module parses the same shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    /// The application's port, named ports resolved against the container's ports.
    pub port: u16,
    /// The probe's `timeoutSeconds`: the proxy waits no longer for the application.
    pub timeout_seconds: u32,
    /// What the proxy does on that port, and the probe as written.
    #[serde(flatten)]
    pub handler: ProbeHandler,
}

/// The probe's handler, tagged in the JSON by `"handler"` with the Kubernetes field name
/// (`httpGet`, `grpc`, `tcpSocket`). JSON without the tag (written before gRPC and TCP
/// probes were rewritten) is an `httpGet`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "handler")]
pub enum ProbeHandler {
    /// `httpGet`: the proxy sends the request and answers with the application's status.
    #[serde(rename = "httpGet")]
    Http(HttpProbe),
    /// `grpc`: the proxy calls `grpc.health.v1.Health/Check`; 200 only for `SERVING`.
    #[serde(rename = "grpc")]
    Grpc(GrpcProbe),
    /// `tcpSocket`: the proxy connects; 200 when the connection is accepted in time.
    #[serde(rename = "tcpSocket")]
    Tcp(TcpProbe),
}

/// An `httpGet` probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpProbe {
    /// Path and query, as the kubelet would have sent them.
    pub path: String,
    /// Headers the probe sets (a `Host` among them replaces the default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ProbeHeader>,
    /// `HTTPS` when the probe uses TLS (the proxy does, without verifying, as the kubelet
    /// does); absent for HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The probe's `httpGet` as written, so that uninjection restores it exactly; the
    /// proxy ignores it.
    pub original: HTTPGetAction,
}

/// A `grpc` probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcProbe {
    /// The service name of the health check; absent asks about the whole server (`""`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The probe's `grpc` as written, for uninjection; the proxy ignores it.
    pub original: GRPCAction,
}

/// A `tcpSocket` probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpProbe {
    /// The probe's `tcpSocket` as written (its port perhaps a name), for uninjection; the
    /// proxy ignores it.
    pub original: TCPSocketAction,
}

/// A header of a probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeHeader {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// The three probes of a container, by the kind name in the admin path.
fn probes_mut(c: &mut Container) -> [(&'static str, &mut Option<Probe>); 3] {
    [
        ("livez", &mut c.liveness_probe),
        ("readyz", &mut c.readiness_probe),
        ("startupz", &mut c.startup_probe),
    ]
}

/// The admin path a rewritten probe of `container` uses.
pub fn admin_path(container: &str, kind: &str) -> String {
    format!("{PATH_PREFIX}{container}/{kind}")
}

/// A probe's port as the kubelet resolves it: a number, or the name of one of the
/// container's ports. `None` (and port 0) when the kubelet could not resolve it either, so
/// the probe is left to fail as written.
fn resolve_port(port: &IntOrString, ports: &[ContainerPort]) -> Option<u16> {
    let port = match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(s) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(s.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .or_else(|| s.parse().ok()),
    };
    port.filter(|p| *p != 0)
}

/// What the proxy does for `probe` (its port and handler), or `None` to leave the probe
/// as written: `exec`, a `host` elsewhere, a port nothing resolves, a probe already
/// pointing at `admin_path`.
fn handler_of(
    probe: &Probe,
    ports: &[ContainerPort],
    admin_path: &str,
) -> Option<(u16, ProbeHandler)> {
    if let Some(get) = probe.http_get.as_ref() {
        let scheme = match get.scheme.as_deref() {
            None => None,
            Some(s) if s.eq_ignore_ascii_case("HTTP") => None,
            Some(s) if s.eq_ignore_ascii_case("HTTPS") => Some("HTTPS".to_owned()),
            // Not a scheme the kubelet knows: the API server refuses such a pod.
            Some(_) => return None,
        };
        let has_host = get.host.as_deref().is_some_and(|h| !h.is_empty());
        if has_host || get.path.as_deref() == Some(admin_path) {
            return None;
        }
        let port = resolve_port(&get.port, ports)?;
        let original = get.clone();
        return Some((
            port,
            ProbeHandler::Http(HttpProbe {
                path: match original.path.as_deref() {
                    Some(p) if p.starts_with('/') => p.to_owned(),
                    Some(p) => format!("/{p}"),
                    None => "/".to_owned(),
                },
                headers: original
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|h: &HTTPHeader| ProbeHeader {
                        name: h.name.clone(),
                        value: h.value.clone(),
                    })
                    .collect(),
                scheme,
                original,
            }),
        ));
    }
    if let Some(grpc) = probe.grpc.as_ref() {
        // The kubelet dials the pod IP at this port (numbers only: gRPC probes take no
        // port names), in plain text.
        let port = u16::try_from(grpc.port).ok().filter(|p| *p != 0)?;
        return Some((
            port,
            ProbeHandler::Grpc(GrpcProbe {
                service: grpc.service.clone(),
                original: grpc.clone(),
            }),
        ));
    }
    if let Some(tcp) = probe.tcp_socket.as_ref() {
        if tcp.host.as_deref().is_some_and(|h| !h.is_empty()) {
            return None;
        }
        let port = resolve_port(&tcp.port, ports)?;
        return Some((
            port,
            ProbeHandler::Tcp(TcpProbe {
                original: tcp.clone(),
            }),
        ));
    }
    None
}

/// Rewrites the application containers' HTTP, gRPC and TCP probes to the admin port;
/// returns the originals as the JSON of `WEFT_APP_PROBES`, or `None` when no probe was
/// rewritten. Probes already pointing at the admin path are left alone, so running it
/// twice changes nothing the second time.
pub fn rewrite(spec: &mut PodSpec, admin_port: u16) -> Option<String> {
    let mut originals = BTreeMap::new();
    for c in &mut spec.containers {
        let name = c.name.clone();
        let ports = c.ports.clone().unwrap_or_default();
        for (kind, probe) in probes_mut(c) {
            let Some(probe) = probe.as_mut() else {
                continue;
            };
            let path = admin_path(&name, kind);
            let Some((port, handler)) = handler_of(probe, &ports, &path) else {
                continue;
            };
            let timeout = probe.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
            originals.insert(
                format!("{name}/{kind}"),
                AppProbe {
                    port,
                    timeout_seconds: u32::try_from(timeout.max(1)).unwrap_or(1),
                    handler,
                },
            );
            // Timings and thresholds stay: only the handler changes.
            probe.grpc = None;
            probe.tcp_socket = None;
            probe.http_get = Some(HTTPGetAction {
                path: Some(path),
                port: IntOrString::Int(i32::from(admin_port)),
                scheme: Some("HTTP".to_owned()),
                ..HTTPGetAction::default()
            });
        }
    }
    if originals.is_empty() {
        return None;
    }
    serde_json::to_string(&originals).ok()
}

/// Reads `WEFT_APP_PROBES`; JSON written before the `handler` tag existed holds only
/// `httpGet` probes, so an entry without it is one.
fn parse_originals(json: &str) -> Option<BTreeMap<String, AppProbe>> {
    let mut raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(json).ok()?;
    for v in raw.values_mut() {
        if let Some(o) = v.as_object_mut() {
            o.entry("handler").or_insert_with(|| "httpGet".into());
        }
    }
    raw.into_iter()
        .map(|(k, v)| serde_json::from_value(v).ok().map(|p| (k, p)))
        .collect()
}

/// Puts back the probes [`rewrite`] changed, from the proxy container's
/// `WEFT_APP_PROBES`; call it before removing that container. Returns whether anything
/// changed.
pub fn restore(spec: &mut PodSpec) -> bool {
    let json = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == keys::PROXY_CONTAINER)
        .and_then(|c| c.env.as_ref())
        .and_then(|env| env.iter().find(|e| e.name == keys::env::APP_PROBES))
        .and_then(|e| e.value.clone());
    let Some(originals) = json.as_deref().and_then(parse_originals) else {
        return false;
    };
    let mut changed = false;
    for c in &mut spec.containers {
        let name = c.name.clone();
        for (kind, probe) in probes_mut(c) {
            let Some(probe) = probe.as_mut() else {
                continue;
            };
            let ours = probe
                .http_get
                .as_ref()
                .is_some_and(|g| g.path.as_deref() == Some(admin_path(&name, kind).as_str()));
            if !ours {
                continue;
            }
            let Some(original) = originals.get(&format!("{name}/{kind}")) else {
                continue;
            };
            match &original.handler {
                ProbeHandler::Http(h) => probe.http_get = Some(h.original.clone()),
                ProbeHandler::Grpc(g) => {
                    probe.http_get = None;
                    probe.grpc = Some(g.original.clone());
                }
                ProbeHandler::Tcp(t) => {
                    probe.http_get = None;
                    probe.tcp_socket = Some(t.original.clone());
                }
            }
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ContainerPort, ExecAction, GRPCAction, TCPSocketAction};

    use super::*;

    /// A probe with distinctive timings, so that a test sees they are kept.
    fn timed(f: impl FnOnce(&mut Probe)) -> Option<Probe> {
        let mut p = Probe {
            period_seconds: Some(7),
            failure_threshold: Some(4),
            timeout_seconds: Some(3),
            initial_delay_seconds: Some(2),
            ..Probe::default()
        };
        f(&mut p);
        Some(p)
    }

    fn http(port: IntOrString, path: &str) -> Option<Probe> {
        timed(|p| {
            p.http_get = Some(HTTPGetAction {
                path: Some(path.to_owned()),
                port,
                ..HTTPGetAction::default()
            })
        })
    }

    fn grpc(port: i32, service: Option<&str>) -> Option<Probe> {
        timed(|p| {
            p.grpc = Some(GRPCAction {
                port,
                service: service.map(str::to_owned),
            })
        })
    }

    fn tcp(port: IntOrString) -> Option<Probe> {
        timed(|p| {
            p.tcp_socket = Some(TCPSocketAction {
                port,
                ..TCPSocketAction::default()
            })
        })
    }

    fn get(p: &Option<Probe>) -> &HTTPGetAction {
        p.as_ref().unwrap().http_get.as_ref().unwrap()
    }

    fn originals(json: &str) -> BTreeMap<String, AppProbe> {
        serde_json::from_str(json).unwrap()
    }

    fn http_of(p: &AppProbe) -> &HttpProbe {
        match &p.handler {
            ProbeHandler::Http(h) => h,
            other => panic!("not httpGet: {other:?}"),
        }
    }

    /// The probe points at `path` on the admin port, over HTTP, with no other handler
    /// left, and its timings as [`timed`] set them.
    fn assert_admin(probe: &Option<Probe>, path: &str) {
        let g = get(probe);
        assert_eq!(g.port, IntOrString::Int(15021));
        assert_eq!(g.path.as_deref(), Some(path));
        assert_eq!(g.scheme.as_deref(), Some("HTTP"));
        let p = probe.as_ref().unwrap();
        assert!(p.grpc.is_none() && p.tcp_socket.is_none() && p.exec.is_none());
        assert_eq!(
            (
                p.period_seconds,
                p.failure_threshold,
                p.timeout_seconds,
                p.initial_delay_seconds
            ),
            (Some(7), Some(4), Some(3), Some(2))
        );
    }

    /// A pod whose only container holds `probe` as its readiness probe.
    fn pod_with(probe: Option<Probe>) -> PodSpec {
        PodSpec {
            containers: vec![Container {
                name: "app".into(),
                readiness_probe: probe,
                ..Container::default()
            }],
            ..PodSpec::default()
        }
    }

    /// Named and numeric ports in several containers: each HTTP probe goes to the admin
    /// port at its own path with its timings kept, and the proxy learns the resolved port.
    #[test]
    fn http_probes_of_every_container_go_to_the_admin_port() {
        let mut spec = PodSpec {
            containers: vec![
                Container {
                    name: "web".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: 8080,
                        ..ContainerPort::default()
                    }]),
                    readiness_probe: http(IntOrString::String("http".into()), "/healthz"),
                    liveness_probe: http(IntOrString::Int(8081), "/live?deep=1"),
                    ..Container::default()
                },
                Container {
                    name: "worker".into(),
                    startup_probe: http(IntOrString::Int(9000), "/started"),
                    ..Container::default()
                },
            ],
            ..PodSpec::default()
        };
        let json = rewrite(&mut spec, 15021).unwrap();
        let [web, worker] = &spec.containers[..] else {
            panic!()
        };
        assert_admin(&web.readiness_probe, "/app-health/web/readyz");
        assert_admin(&web.liveness_probe, "/app-health/web/livez");
        assert_admin(&worker.startup_probe, "/app-health/worker/startupz");
        let o = originals(&json);
        assert_eq!(
            o.keys().collect::<Vec<_>>(),
            ["web/livez", "web/readyz", "worker/startupz"]
        );
        assert_eq!(
            (o["web/readyz"].port, &*http_of(&o["web/readyz"]).path),
            (8080, "/healthz")
        );
        assert_eq!(
            (o["web/livez"].port, &*http_of(&o["web/livez"]).path),
            (8081, "/live?deep=1")
        );
        assert_eq!(o["worker/startupz"].port, 9000);
        assert_eq!(o["web/readyz"].timeout_seconds, 3);
    }

    /// gRPC and TCP probes (a named TCP port among them) go to the admin port like HTTP
    /// ones, timings kept; the proxy learns the handler, the resolved port, the gRPC
    /// service and the timeout.
    #[test]
    fn grpc_and_tcp_probes_go_to_the_admin_port() {
        let mut spec = PodSpec {
            containers: vec![
                Container {
                    name: "api".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("grpc".into()),
                        container_port: 9090,
                        ..ContainerPort::default()
                    }]),
                    readiness_probe: grpc(9090, Some("shop.Cart")),
                    liveness_probe: grpc(9090, None),
                    startup_probe: tcp(IntOrString::String("grpc".into())),
                    ..Container::default()
                },
                Container {
                    name: "db".into(),
                    readiness_probe: tcp(IntOrString::Int(5432)),
                    ..Container::default()
                },
            ],
            ..PodSpec::default()
        };
        let json = rewrite(&mut spec, 15021).unwrap();
        let [api, db] = &spec.containers[..] else {
            panic!()
        };
        assert_admin(&api.readiness_probe, "/app-health/api/readyz");
        assert_admin(&api.liveness_probe, "/app-health/api/livez");
        assert_admin(&api.startup_probe, "/app-health/api/startupz");
        assert_admin(&db.readiness_probe, "/app-health/db/readyz");
        let o = originals(&json);
        let ProbeHandler::Grpc(ready) = &o["api/readyz"].handler else {
            panic!("{json}")
        };
        assert_eq!(ready.service.as_deref(), Some("shop.Cart"));
        let ProbeHandler::Grpc(live) = &o["api/livez"].handler else {
            panic!("{json}")
        };
        assert_eq!(live.service, None);
        let ProbeHandler::Tcp(started) = &o["api/startupz"].handler else {
            panic!("{json}")
        };
        // The proxy gets the number; uninjection gets the name back.
        assert_eq!(o["api/startupz"].port, 9090);
        assert_eq!(started.original.port, IntOrString::String("grpc".into()));
        assert!(matches!(o["db/readyz"].handler, ProbeHandler::Tcp(_)));
        assert_eq!(
            o.values()
                .map(|p| (p.port, p.timeout_seconds))
                .collect::<Vec<_>>(),
            [(9090, 3), (9090, 3), (9090, 3), (5432, 3)]
        );
    }

    /// The exact JSON the proxy parses (proxy/src/app_probe.rs holds the same literal).
    #[test]
    fn the_proxy_gets_port_path_headers_and_timeout() {
        let mut spec = pod_with(Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::Int(8080),
                http_headers: Some(vec![HTTPHeader {
                    name: "X-Probe".into(),
                    value: "kubelet".into(),
                }]),
                ..HTTPGetAction::default()
            }),
            ..Probe::default()
        }));
        let json = rewrite(&mut spec, 15021).unwrap();
        assert_eq!(
            json,
            r#"{"app/readyz":{"port":8080,"timeoutSeconds":1,"handler":"httpGet","path":"/ready","headers":[{"name":"X-Probe","value":"kubelet"}],"original":{"httpHeaders":[{"name":"X-Probe","value":"kubelet"}],"path":"/ready","port":8080}}}"#
        );
    }

    /// The exact JSON of gRPC and TCP probes (proxy/src/app_probe.rs holds the same
    /// literal).
    #[test]
    fn the_proxy_gets_grpc_service_and_tcp_port() {
        let mut spec = PodSpec {
            containers: vec![Container {
                name: "app".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("db".into()),
                    container_port: 5432,
                    ..ContainerPort::default()
                }]),
                readiness_probe: Some(Probe {
                    grpc: Some(GRPCAction {
                        port: 9090,
                        service: Some("shop.Cart".into()),
                    }),
                    timeout_seconds: Some(2),
                    ..Probe::default()
                }),
                liveness_probe: Some(Probe {
                    tcp_socket: Some(TCPSocketAction {
                        port: IntOrString::String("db".into()),
                        ..TCPSocketAction::default()
                    }),
                    ..Probe::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        };
        let json = rewrite(&mut spec, 15021).unwrap();
        assert_eq!(
            json,
            r#"{"app/livez":{"port":5432,"timeoutSeconds":1,"handler":"tcpSocket","original":{"port":"db"}},"app/readyz":{"port":9090,"timeoutSeconds":2,"handler":"grpc","service":"shop.Cart","original":{"port":9090,"service":"shop.Cart"}}}"#
        );
    }

    /// exec probes, HTTP and TCP probes bound to another host, and unresolvable named
    /// ports are left as written; with nothing rewritten there is no variable.
    #[test]
    fn other_probes_are_untouched() {
        let probe = |f: fn(&mut Probe)| {
            let mut p = Probe::default();
            f(&mut p);
            Some(p)
        };
        let container = Container {
            name: "app".into(),
            liveness_probe: probe(|p| {
                p.exec = Some(ExecAction {
                    command: Some(vec!["true".into()]),
                })
            }),
            readiness_probe: probe(|p| {
                p.tcp_socket = Some(TCPSocketAction {
                    port: IntOrString::Int(8080),
                    host: Some("db.internal".into()),
                })
            }),
            startup_probe: probe(|p| {
                p.tcp_socket = Some(TCPSocketAction {
                    port: IntOrString::String("nosuchport".into()),
                    ..TCPSocketAction::default()
                })
            }),
            ..Container::default()
        };
        let https = Container {
            name: "tls".into(),
            liveness_probe: probe(|p| {
                p.http_get = Some(HTTPGetAction {
                    port: IntOrString::Int(8080),
                    host: Some("example.internal".into()),
                    ..HTTPGetAction::default()
                })
            }),
            startup_probe: probe(|p| {
                p.http_get = Some(HTTPGetAction {
                    port: IntOrString::String("nosuchport".into()),
                    ..HTTPGetAction::default()
                })
            }),
            readiness_probe: probe(|p| {
                p.grpc = Some(GRPCAction {
                    port: 0,
                    service: None,
                })
            }),
            ..Container::default()
        };
        let mut spec = PodSpec {
            containers: vec![container, https],
            ..PodSpec::default()
        };
        let before = spec.clone();
        assert_eq!(rewrite(&mut spec, 15021), None);
        assert_eq!(spec, before);
    }

    /// An HTTPS probe goes to the admin port in plain text; the proxy learns the scheme.
    #[test]
    fn https_probes_are_rewritten_with_their_scheme() {
        let mut spec = pod_with(Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::Int(8443),
                scheme: Some("HTTPS".into()),
                ..HTTPGetAction::default()
            }),
            ..Probe::default()
        }));
        let json = rewrite(&mut spec, 15021).unwrap();
        let g = get(&spec.containers[0].readiness_probe);
        assert_eq!(g.scheme.as_deref(), Some("HTTP"));
        assert_eq!(g.port, IntOrString::Int(15021));
        let o = originals(&json);
        assert_eq!(http_of(&o["app/readyz"]).scheme.as_deref(), Some("HTTPS"));
        assert_eq!(o["app/readyz"].port, 8443);
    }

    /// A second pass finds the probes already rewritten and changes nothing.
    #[test]
    fn rewriting_twice_changes_nothing_more() {
        for probe in [
            http(IntOrString::Int(8080), "/healthz"),
            grpc(9090, None),
            tcp(IntOrString::Int(8080)),
        ] {
            let mut spec = pod_with(probe);
            assert!(rewrite(&mut spec, 15021).is_some());
            let once = spec.clone();
            assert_eq!(rewrite(&mut spec, 15021), None);
            assert_eq!(spec, once);
        }
    }

    /// The proxy container as injection leaves it, holding `json`.
    fn with_proxy_env(spec: &mut PodSpec, json: String) {
        spec.init_containers = Some(vec![Container {
            name: keys::PROXY_CONTAINER.into(),
            env: Some(vec![k8s_openapi::api::core::v1::EnvVar {
                name: keys::env::APP_PROBES.into(),
                value: Some(json),
                ..Default::default()
            }]),
            ..Container::default()
        }]);
    }

    /// Restoring puts back each handler exactly as written (named ports, gRPC service,
    /// timings) and removes the admin `httpGet`.
    #[test]
    fn restore_puts_back_every_handler() {
        let original = PodSpec {
            containers: vec![Container {
                name: "app".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("db".into()),
                    container_port: 5432,
                    ..ContainerPort::default()
                }]),
                readiness_probe: grpc(9090, Some("shop.Cart")),
                liveness_probe: tcp(IntOrString::String("db".into())),
                startup_probe: http(IntOrString::String("db".into()), "/started"),
                ..Container::default()
            }],
            ..PodSpec::default()
        };
        let mut spec = original.clone();
        let json = rewrite(&mut spec, 15021).unwrap();
        with_proxy_env(&mut spec, json);
        assert!(restore(&mut spec));
        spec.init_containers = None;
        assert_eq!(spec, original);
    }

    /// `WEFT_APP_PROBES` as injection wrote it before gRPC and TCP probes were rewritten
    /// (no `handler`) still restores its HTTP probes.
    #[test]
    fn restore_reads_json_without_a_handler_as_http() {
        let original = pod_with(http(IntOrString::Int(8080), "/healthz"));
        let mut spec = original.clone();
        rewrite(&mut spec, 15021).unwrap();
        with_proxy_env(
            &mut spec,
            r#"{"app/readyz":{"port":8080,"path":"/healthz","timeoutSeconds":3,"original":{"path":"/healthz","port":8080}}}"#.into(),
        );
        assert!(restore(&mut spec));
        spec.init_containers = None;
        assert_eq!(spec, original);
    }

    /// Any probe of the handlers the kubelet knows, on a numeric or named port (declared
    /// or not), perhaps bound to another host, with any timeout.
    fn any_probe() -> impl proptest::strategy::Strategy<Value = Option<Probe>> {
        use proptest::prelude::*;
        let port = prop_oneof![
            (0i32..70_000).prop_map(IntOrString::Int),
            prop_oneof![Just("http"), Just("grpc"), Just("undeclared")]
                .prop_map(|s| IntOrString::String(s.to_owned())),
        ];
        let host = proptest::option::of(prop_oneof![Just(""), Just("db.internal")])
            .prop_map(|h| h.map(str::to_owned));
        let handler = prop_oneof![
            (port.clone(), host.clone(), "(/[a-z]{0,5}){0,2}").prop_map(|(port, host, path)| {
                Probe {
                    http_get: Some(HTTPGetAction {
                        port,
                        host,
                        path: Some(path),
                        ..HTTPGetAction::default()
                    }),
                    ..Probe::default()
                }
            }),
            (0i32..70_000, proptest::option::of("[a-z.]{0,8}")).prop_map(|(port, service)| {
                Probe {
                    grpc: Some(GRPCAction { port, service }),
                    ..Probe::default()
                }
            }),
            (port, host).prop_map(|(port, host)| Probe {
                tcp_socket: Some(TCPSocketAction { port, host }),
                ..Probe::default()
            }),
            Just(Probe {
                exec: Some(ExecAction {
                    command: Some(vec!["true".into()]),
                }),
                ..Probe::default()
            }),
        ];
        proptest::option::of((handler, proptest::option::of(-1i32..100)).prop_map(
            |(mut p, timeout)| {
                p.timeout_seconds = timeout;
                p
            },
        ))
    }

    proptest::proptest! {
        /// Whatever the probes, uninjection's restore gives back the pod as written, a
        /// second rewrite changes nothing, and every rewritten probe points at its own
        /// admin path with nothing but that `httpGet` left.
        #[test]
        fn restore_undoes_rewrite(
            live in any_probe(),
            ready in any_probe(),
            startup in any_probe(),
        ) {
            let original = PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    ports: Some(vec![
                        ContainerPort {
                            name: Some("http".into()),
                            container_port: 8080,
                            ..ContainerPort::default()
                        },
                        ContainerPort {
                            name: Some("grpc".into()),
                            container_port: 9090,
                            ..ContainerPort::default()
                        },
                    ]),
                    liveness_probe: live,
                    readiness_probe: ready,
                    startup_probe: startup,
                    ..Container::default()
                }],
                ..PodSpec::default()
            };
            let mut spec = original.clone();
            let json = rewrite(&mut spec, 15021);
            let once = spec.clone();
            proptest::prop_assert_eq!(rewrite(&mut spec, 15021), None);
            proptest::prop_assert_eq!(&spec, &once);
            let c = &spec.containers[0];
            let rewritten = json.as_deref().map(originals).unwrap_or_default();
            for (kind, probe) in [
                ("livez", &c.liveness_probe),
                ("readyz", &c.readiness_probe),
                ("startupz", &c.startup_probe),
            ] {
                if let Some(o) = rewritten.get(&format!("app/{kind}")) {
                    let p = probe.as_ref().unwrap();
                    proptest::prop_assert!(p.grpc.is_none() && p.tcp_socket.is_none());
                    let g = p.http_get.as_ref().unwrap();
                    proptest::prop_assert_eq!(g.path.clone(), Some(admin_path("app", kind)));
                    proptest::prop_assert!(o.port != 0 && o.timeout_seconds >= 1);
                }
            }
            if let Some(json) = json {
                with_proxy_env(&mut spec, json);
                proptest::prop_assert!(restore(&mut spec));
                spec.init_containers = None;
            }
            proptest::prop_assert_eq!(spec, original);
        }
    }
}
