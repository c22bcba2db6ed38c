//! The kubelet's HTTP probes, rewritten to go through the proxy's admin port.
//!
//! The kubelet probes a pod's IP in plain text and with no mesh identity. With the
//! redirect in place those probes land on the inbound proxy, which a `Strict` Policy (or a
//! `Deny` default) refuses, so the pod would go unready. As Istio does, injection points
//! each application container's `httpGet` probe at the proxy's admin port, which `init`
//! never redirects and no Policy governs, and hands the original to the proxy, which
//! repeats it against the application on loopback:
//!
//! ```text
//!  kubelet ── GET podIP:15021/app-health/<container>/<livez|readyz|startupz> ──▶ proxy admin
//!                                   proxy ── GET 127.0.0.1:<port><path> ──▶ app
//!  kubelet ◀── the app's status (503 when unreachable) ──────────────────────────┘
//! ```
//!
//! Kept as they are: `exec`, `tcpSocket` and `grpc` probes, `httpGet` probes with a
//! `host` (see docs/injection.md, "Probes"), and probes of the pod's own init containers.
//! `scheme: HTTPS` probes are rewritten too: the proxy probes over TLS. The originals travel in one environment variable
//! ([`keys::env::APP_PROBES`]) as JSON, which [`uninject`](crate::uninject) reads back to
//! restore them.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, HTTPGetAction, HTTPHeader, PodSpec, Probe},
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
    /// Path and query, as the kubelet would have sent them.
    pub path: String,
    /// Headers the probe sets (a `Host` among them replaces the default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ProbeHeader>,
    /// The probe's `timeoutSeconds`: the proxy waits no longer for the application.
    pub timeout_seconds: u32,
    /// `HTTPS` when the probe uses TLS (the proxy does, without verifying, as the kubelet
    /// does); absent for HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The probe's `httpGet` as written, so that uninjection restores it exactly; the
    /// proxy ignores it.
    pub original: HTTPGetAction,
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

/// Rewrites the application containers' HTTP probes to the admin port; returns the
/// originals as the JSON of `WEFT_APP_PROBES`, or `None` when no probe was rewritten.
/// Probes already pointing at the admin path are left alone, so running it twice changes
/// nothing the second time.
pub fn rewrite(spec: &mut PodSpec, admin_port: u16) -> Option<String> {
    let mut originals = BTreeMap::new();
    for c in &mut spec.containers {
        let name = c.name.clone();
        let ports = c.ports.clone().unwrap_or_default();
        for (kind, probe) in probes_mut(c) {
            let Some(probe) = probe.as_mut() else {
                continue;
            };
            let Some(get) = probe.http_get.as_ref() else {
                continue;
            };
            let path = admin_path(&name, kind);
            let scheme = match get.scheme.as_deref() {
                None => None,
                Some(s) if s.eq_ignore_ascii_case("HTTP") => None,
                Some(s) if s.eq_ignore_ascii_case("HTTPS") => Some("HTTPS".to_owned()),
                // Not a scheme the kubelet knows: the API server refuses such a pod.
                Some(_) => continue,
            };
            let has_host = get.host.as_deref().is_some_and(|h| !h.is_empty());
            if has_host || get.path.as_deref() == Some(path.as_str()) {
                continue;
            }
            let port = match &get.port {
                IntOrString::Int(n) => u16::try_from(*n).ok(),
                IntOrString::String(s) => ports
                    .iter()
                    .find(|p| p.name.as_deref() == Some(s.as_str()))
                    .and_then(|p| u16::try_from(p.container_port).ok())
                    .or_else(|| s.parse().ok()),
            };
            // A port the kubelet could not resolve either: the probe fails as written.
            let Some(port) = port.filter(|p| *p != 0) else {
                continue;
            };
            let original = get.clone();
            let timeout = probe.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
            originals.insert(
                format!("{name}/{kind}"),
                AppProbe {
                    port,
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
                    timeout_seconds: u32::try_from(timeout.max(1)).unwrap_or(1),
                    scheme,
                    original,
                },
            );
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
    let Some(originals) =
        json.and_then(|j| serde_json::from_str::<BTreeMap<String, AppProbe>>(&j).ok())
    else {
        return false;
    };
    let mut changed = false;
    for c in &mut spec.containers {
        let name = c.name.clone();
        for (kind, probe) in probes_mut(c) {
            let Some(get) = probe.as_mut().and_then(|p| p.http_get.as_mut()) else {
                continue;
            };
            if get.path.as_deref() != Some(admin_path(&name, kind).as_str()) {
                continue;
            }
            if let Some(original) = originals.get(&format!("{name}/{kind}")) {
                *get = original.original.clone();
                changed = true;
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ContainerPort, ExecAction, GRPCAction, TCPSocketAction};

    use super::*;

    fn http(port: IntOrString, path: &str) -> Option<Probe> {
        Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.to_owned()),
                port,
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(7),
            failure_threshold: Some(4),
            timeout_seconds: Some(3),
            initial_delay_seconds: Some(2),
            ..Probe::default()
        })
    }

    fn get(p: &Option<Probe>) -> &HTTPGetAction {
        p.as_ref().unwrap().http_get.as_ref().unwrap()
    }

    fn originals(json: &str) -> BTreeMap<String, AppProbe> {
        serde_json::from_str(json).unwrap()
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
        for (probe, path) in [
            (&web.readiness_probe, "/app-health/web/readyz"),
            (&web.liveness_probe, "/app-health/web/livez"),
            (&worker.startup_probe, "/app-health/worker/startupz"),
        ] {
            let g = get(probe);
            assert_eq!(g.port, IntOrString::Int(15021));
            assert_eq!(g.path.as_deref(), Some(path));
            assert_eq!(g.scheme.as_deref(), Some("HTTP"));
            let p = probe.as_ref().unwrap();
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
        let o = originals(&json);
        assert_eq!(
            o.keys().collect::<Vec<_>>(),
            ["web/livez", "web/readyz", "worker/startupz"]
        );
        assert_eq!(
            (o["web/readyz"].port, &*o["web/readyz"].path),
            (8080, "/healthz")
        );
        assert_eq!(
            (o["web/livez"].port, &*o["web/livez"].path),
            (8081, "/live?deep=1")
        );
        assert_eq!(o["worker/startupz"].port, 9000);
        assert_eq!(o["web/readyz"].timeout_seconds, 3);
    }

    /// The exact JSON the proxy parses (proxy/src/app_probe.rs holds the same literal).
    #[test]
    fn the_proxy_gets_port_path_headers_and_timeout() {
        let mut spec = PodSpec {
            containers: vec![Container {
                name: "app".into(),
                readiness_probe: Some(Probe {
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
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        };
        let json = rewrite(&mut spec, 15021).unwrap();
        assert_eq!(
            json,
            r#"{"app/readyz":{"port":8080,"path":"/ready","headers":[{"name":"X-Probe","value":"kubelet"}],"timeoutSeconds":1,"original":{"httpHeaders":[{"name":"X-Probe","value":"kubelet"}],"path":"/ready","port":8080}}}"#
        );
    }

    /// exec, tcpSocket, grpc and host-bound probes, and unresolvable named ports,
    /// are left as written; with nothing rewritten there is no variable.
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
                    ..TCPSocketAction::default()
                })
            }),
            startup_probe: probe(|p| {
                p.grpc = Some(GRPCAction {
                    port: 9090,
                    service: None,
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
        let mut spec = PodSpec {
            containers: vec![Container {
                name: "tls".into(),
                readiness_probe: Some(Probe {
                    http_get: Some(HTTPGetAction {
                        path: Some("/ready".into()),
                        port: IntOrString::Int(8443),
                        scheme: Some("HTTPS".into()),
                        ..HTTPGetAction::default()
                    }),
                    ..Probe::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        };
        let json = rewrite(&mut spec, 15021).unwrap();
        let g = get(&spec.containers[0].readiness_probe);
        assert_eq!(g.scheme.as_deref(), Some("HTTP"));
        assert_eq!(g.port, IntOrString::Int(15021));
        let o = originals(&json);
        assert_eq!(o["tls/readyz"].scheme.as_deref(), Some("HTTPS"));
        assert_eq!(o["tls/readyz"].port, 8443);
    }

    /// A second pass finds the probes already rewritten and changes nothing.
    #[test]
    fn rewriting_twice_changes_nothing_more() {
        let mut spec = PodSpec {
            containers: vec![Container {
                name: "app".into(),
                readiness_probe: http(IntOrString::Int(8080), "/healthz"),
                ..Container::default()
            }],
            ..PodSpec::default()
        };
        assert!(rewrite(&mut spec, 15021).is_some());
        let once = spec.clone();
        assert_eq!(rewrite(&mut spec, 15021), None);
        assert_eq!(spec, once);
    }
}
