//! Sidecar injection: a pure function from a pod (its metadata and spec) and the mesh's
//! settings to the injected pod. The admission webhook turns the difference into a
//! JSONPatch; `kubectl weft inject` writes the result back into YAML. Both call this, with
//! the settings the cluster keeps ([`settings`]).
//!
//! The crate depends on k8s-openapi's types and serde only (no Kubernetes client, HTTP or
//! async runtime), so the kubectl plugin links injection without linking the operator.
//! The `cluster` feature adds [`audit::scan`], the one cluster listing the operator and
//! `kubectl weft check` share, through the kube client both link anyway.
//!
//! ```text
//!  pod + namespace opt-in ──decide()──▶ Skip(reason)          (nothing changes)
//!                              └──────▶ inject() ──▶ pod with:
//!        initContainers: [weft-init (iptables), weft-proxy (native sidecar), ...the pod's own]
//!        volumes:        [... , weft-token (projected SA token, audience "weft")]
//!        annotations:    weft.dev/proxy-version, kubectl default-container
//!        labels:         weft.dev/meshed=true
//!        app containers: HTTP probes pointed at the proxy's admin port ([`probes`])
//! ```

pub mod annotations;
pub mod audit;
pub mod config;
pub mod identity_bundle;
pub mod keys;
pub mod probes;
pub mod selection;
pub mod settings;
mod sidecar;
mod unknown;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use config::{InjectConfig, InjectIdentity, InjectTracing, ProxyPorts, ProxyResources};
pub use unknown::{
    UnknownAnnotation, inject_value_problem, pod_metadata_warnings, unknown_among,
    unknown_annotations,
};

/// Why a pod is left as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// The pod already has the proxy (injection is idempotent).
    #[error("already injected")]
    AlreadyInjected,
    /// The pod shares the node's network namespace; redirecting it would capture the node.
    #[error("pod uses hostNetwork")]
    HostNetwork,
    /// The namespace is never meshed (kube-system, the operator's own).
    #[error("namespace {0} is never injected")]
    ExcludedNamespace(String),
    /// The pod says `weft.dev/inject: disabled`.
    #[error("pod opted out with weft.dev/inject: disabled")]
    OptedOut,
    /// Neither the pod nor its namespace opted in.
    #[error("neither the pod nor its namespace opted in")]
    NotOptedIn,
}

impl Skip {
    /// A short stable code for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Skip::AlreadyInjected => "already_injected",
            Skip::HostNetwork => "host_network",
            Skip::ExcludedNamespace(_) => "excluded_namespace",
            Skip::OptedOut => "opted_out",
            Skip::NotOptedIn => "not_opted_in",
        }
    }
}

/// Why an opted-in pod cannot be injected. The webhook denies such a pod with this
/// message, since starting it silently unmeshed would hide the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// A container declares a port the proxy needs.
    #[error(
        "container {container:?} declares port {port}, which the Weft proxy uses; change the port or annotate the pod weft.dev/inject: disabled"
    )]
    PortConflict {
        /// The container.
        container: String,
        /// The port.
        port: i32,
    },
    /// A container runs as the proxy's UID, so its traffic would bypass the proxy.
    #[error(
        "container {container:?} runs as UID {uid}, the Weft proxy's UID, so its traffic would bypass the mesh; run it as another user"
    )]
    ProxyUid {
        /// The container.
        container: String,
        /// The UID.
        uid: i64,
    },
    /// A container or volume already uses a name injection needs.
    #[error(
        "the pod already has a {what} named {name:?}, which Weft's injection needs; rename it or annotate the pod weft.dev/inject: disabled"
    )]
    NameInUse {
        /// `container` or `volume`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A `weft.dev/*` annotation has a value that cannot be used.
    #[error("annotation {key}: {reason}")]
    BadAnnotation {
        /// The annotation key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Decides whether a pod gets the proxy. `namespace_opted_in` is whether the pod's
/// namespace carries the label `weft.dev/inject=enabled`.
pub fn decide(
    meta: &ObjectMeta,
    spec: &PodSpec,
    namespace: &str,
    namespace_opted_in: bool,
    cfg: &InjectConfig,
) -> Result<(), Skip> {
    if is_injected(meta) {
        return Err(Skip::AlreadyInjected);
    }
    if spec.host_network == Some(true) {
        return Err(Skip::HostNetwork);
    }
    if cfg.excluded_namespaces.iter().any(|n| n == namespace) {
        return Err(Skip::ExcludedNamespace(namespace.to_owned()));
    }
    match opt_in(meta, namespace_opted_in) {
        OptIn::Pod | OptIn::Namespace => Ok(()),
        OptIn::OptedOut => Err(Skip::OptedOut),
        OptIn::No => Err(Skip::NotOptedIn),
    }
}

/// What a pod and its namespace say about joining the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptIn {
    /// The pod opted in itself.
    Pod,
    /// The pod's namespace opted in and the pod did not opt out.
    Namespace,
    /// The pod opted out.
    OptedOut,
    /// Nobody opted in.
    No,
}

/// The opt-in rule, in one place: the pod's own word wins over its namespace's, and its
/// annotation over its label.
pub fn opt_in(meta: &ObjectMeta, namespace_opted_in: bool) -> OptIn {
    let pod_says =
        lookup(&meta.annotations, keys::INJECT).or_else(|| lookup(&meta.labels, keys::INJECT));
    match pod_says {
        Some(keys::DISABLED) => OptIn::OptedOut,
        Some(keys::ENABLED) => OptIn::Pod,
        _ if namespace_opted_in => OptIn::Namespace,
        _ => OptIn::No,
    }
}

/// Whether namespace labels opt the namespace in (`weft.dev/inject=enabled`).
pub fn namespace_opted_in(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(keys::INJECT))
        .is_some_and(|v| v == keys::ENABLED)
}

/// Whether a pod already carries Weft's proxy: the version annotation, which injection
/// always adds with the proxy. A container named `weft-proxy` without it is not Weft's
/// proxy but a name injection needs ([`inject`] refuses the pod): skipping such a pod
/// would leave it out of the mesh with no error, and the audit would then count it
/// unmeshed forever (it sees metadata only).
pub fn is_injected(meta: &ObjectMeta) -> bool {
    lookup(&meta.annotations, keys::PROXY_VERSION).is_some()
}

fn lookup<'a>(map: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    map.as_ref().and_then(|m| m.get(key)).map(String::as_str)
}

/// Adds the proxy, the redirect init container, the token volume, the annotations and the
/// label to a pod that [`decide`] said to inject. Leaves the pod untouched on error.
pub fn inject(
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    cfg: &InjectConfig,
) -> Result<(), InjectError> {
    check_conflicts(spec, cfg)?;
    let mut options = annotations::PodOptions::from_annotations(meta.annotations.as_ref(), cfg)?;
    if let Some(trace) = options.trace.as_mut() {
        // A trace view groups spans by service: the application's name, as its labels
        // give it, rather than one "weft-proxy" for every pod.
        trace.service_name = lookup(&meta.labels, keys::APP_NAME_LABEL)
            .or_else(|| lookup(&meta.labels, keys::APP_LABEL))
            .map(str::to_owned);
    }

    let init = sidecar::init_container(cfg, &options);
    // Last of the fallible steps above, so an error leaves the pod untouched.
    let app_probes = if options.keep_probes {
        None
    } else {
        probes::rewrite(spec, cfg.ports.admin)
    };
    let proxy = sidecar::proxy_container(cfg, &options, app_probes);
    let mut inits = vec![init, proxy];
    inits.extend(spec.init_containers.take().unwrap_or_default());
    spec.init_containers = Some(inits);
    spec.volumes
        .get_or_insert_with(Vec::new)
        .push(sidecar::token_volume(cfg));

    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(keys::PROXY_VERSION.to_owned(), cfg.proxy_version.clone());
    if let Some(first) = spec.containers.first() {
        annotations
            .entry(keys::DEFAULT_CONTAINER.to_owned())
            .or_insert_with(|| first.name.clone());
    }
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(keys::MESHED_LABEL.to_owned(), "true".to_owned());
    Ok(())
}

/// Removes everything [`inject`] added. Returns whether anything was removed.
pub fn uninject(meta: &mut ObjectMeta, spec: &mut PodSpec) -> bool {
    // Reads the originals from the proxy container, so before removing it.
    let mut changed = probes::restore(spec);
    if let Some(inits) = spec.init_containers.as_mut() {
        let before = inits.len();
        inits.retain(|c| c.name != keys::PROXY_CONTAINER && c.name != keys::INIT_CONTAINER);
        changed |= inits.len() != before;
        if inits.is_empty() {
            spec.init_containers = None;
        }
    }
    if let Some(volumes) = spec.volumes.as_mut() {
        let before = volumes.len();
        volumes.retain(|v| v.name != keys::TOKEN_VOLUME);
        changed |= volumes.len() != before;
        if volumes.is_empty() {
            spec.volumes = None;
        }
    }
    if let Some(annotations) = meta.annotations.as_mut() {
        if annotations.remove(keys::PROXY_VERSION).is_some() {
            changed = true;
            // Only ours if injection added it: it names the first app container, which
            // injection never changes, so removing it is safe only alongside the version.
            annotations.remove(keys::DEFAULT_CONTAINER);
        }
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
    if let Some(labels) = meta.labels.as_mut() {
        changed |= labels.remove(keys::MESHED_LABEL).is_some();
        if labels.is_empty() {
            meta.labels = None;
        }
    }
    changed
}

fn check_conflicts(spec: &PodSpec, cfg: &InjectConfig) -> Result<(), InjectError> {
    let reserved = [cfg.ports.outbound, cfg.ports.inbound, cfg.ports.admin];
    let all = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for c in all.clone() {
        for p in c.ports.iter().flatten() {
            if reserved.iter().any(|r| i32::from(*r) == p.container_port) {
                return Err(InjectError::PortConflict {
                    container: c.name.clone(),
                    port: p.container_port,
                });
            }
        }
        let uid = c
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or_else(|| spec.security_context.as_ref().and_then(|s| s.run_as_user));
        if uid == Some(cfg.proxy_uid) {
            return Err(InjectError::ProxyUid {
                container: c.name.clone(),
                uid: cfg.proxy_uid,
            });
        }
        if c.name == keys::INIT_CONTAINER || c.name == keys::PROXY_CONTAINER {
            return Err(InjectError::NameInUse {
                what: "container",
                name: c.name.clone(),
            });
        }
    }
    if spec
        .volumes
        .iter()
        .flatten()
        .any(|v| v.name == keys::TOKEN_VOLUME)
    {
        return Err(InjectError::NameInUse {
            what: "volume",
            name: keys::TOKEN_VOLUME.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(spec: &PodSpec) -> BTreeMap<String, String> {
        spec.init_containers
            .iter()
            .flatten()
            .find(|c| c.name == keys::PROXY_CONTAINER)
            .and_then(|c| c.env.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect()
    }

    /// An opted-in pod with a container of its own named `weft-proxy` (regular or init)
    /// but no version annotation is refused with the name, never skipped as injected:
    /// skipped, it would run outside the mesh with no error, and the API server would refuse
    /// a second container of that name. With the annotation, it is Weft's proxy.
    #[test]
    fn a_container_of_its_own_named_weft_proxy_is_refused_by_name() {
        use k8s_openapi::api::core::v1::Container;
        let container = |name: &str| Container {
            name: name.to_owned(),
            ..Container::default()
        };
        let mut meta = ObjectMeta {
            annotations: Some(BTreeMap::from([(
                keys::INJECT.to_owned(),
                keys::ENABLED.to_owned(),
            )])),
            ..ObjectMeta::default()
        };
        let regular = PodSpec {
            containers: vec![container("web"), container(keys::PROXY_CONTAINER)],
            ..PodSpec::default()
        };
        let init = PodSpec {
            containers: vec![container("web")],
            init_containers: Some(vec![container(keys::PROXY_CONTAINER)]),
            ..PodSpec::default()
        };
        let cfg = InjectConfig::default();
        for spec in [regular, init] {
            assert_eq!(decide(&meta, &spec, "shop", true, &cfg), Ok(()));
            let (mut m, mut s) = (meta.clone(), spec.clone());
            let error = inject(&mut m, &mut s, &cfg).unwrap_err();
            assert_eq!(
                error.to_string(),
                "the pod already has a container named \"weft-proxy\", which Weft's injection needs; rename it or annotate the pod weft.dev/inject: disabled"
            );
            assert_eq!((m, s), (meta.clone(), spec.clone()), "left untouched");
        }
        meta.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(keys::PROXY_VERSION.to_owned(), "0.1.0".to_owned());
        assert!(is_injected(&meta));
        assert_eq!(
            decide(&meta, &PodSpec::default(), "shop", true, &cfg),
            Err(Skip::AlreadyInjected)
        );
    }

    /// With tracing on, the spans' service is the application's name from its labels
    /// (the recommended label first); without a label, the proxy's own default.
    #[test]
    fn traced_pods_name_their_service_from_their_labels() {
        let map = |pairs: &[(&str, &str)]| -> Option<BTreeMap<String, String>> {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            )
        };
        let traced = map(&[(keys::TRACE_COLLECTOR, "otel:4317")]);
        for (labels, want) in [
            (
                map(&[(keys::APP_NAME_LABEL, "checkout"), (keys::APP_LABEL, "old")]),
                Some("checkout"),
            ),
            (map(&[(keys::APP_LABEL, "cart")]), Some("cart")),
            (None, None),
        ] {
            let mut meta = ObjectMeta {
                annotations: traced.clone(),
                labels,
                ..ObjectMeta::default()
            };
            let mut spec = PodSpec::default();
            inject(&mut meta, &mut spec, &InjectConfig::default()).unwrap();
            let env = env_of(&spec);
            assert_eq!(
                env.get(keys::env::TRACE_SERVICE_NAME).map(String::as_str),
                want
            );
            assert_eq!(env[keys::env::TRACE_COLLECTOR], "otel:4317");
        }
        // No collector, no tracing variables at all.
        let mut meta = ObjectMeta {
            labels: map(&[(keys::APP_LABEL, "cart")]),
            ..ObjectMeta::default()
        };
        let mut spec = PodSpec::default();
        inject(&mut meta, &mut spec, &InjectConfig::default()).unwrap();
        assert!(env_of(&spec).keys().all(|k| !k.starts_with("WEFT_TRACE")));
    }

    fn probed_pod(annotation: Option<&str>) -> (ObjectMeta, PodSpec) {
        use k8s_openapi::{
            api::core::v1::{
                Container, ContainerPort, ExecAction, GRPCAction, HTTPGetAction, Probe,
                TCPSocketAction,
            },
            apimachinery::pkg::util::intstr::IntOrString,
        };
        let meta = ObjectMeta {
            annotations: annotation.map(|v| {
                [(keys::REWRITE_PROBES.to_owned(), v.to_owned())]
                    .into_iter()
                    .collect()
            }),
            ..ObjectMeta::default()
        };
        let spec = PodSpec {
            containers: vec![
                Container {
                    name: "web".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: 8080,
                        ..ContainerPort::default()
                    }]),
                    readiness_probe: Some(Probe {
                        http_get: Some(HTTPGetAction {
                            path: Some("/healthz".into()),
                            port: IntOrString::String("http".into()),
                            ..HTTPGetAction::default()
                        }),
                        ..Probe::default()
                    }),
                    liveness_probe: Some(Probe {
                        exec: Some(ExecAction {
                            command: Some(vec!["true".into()]),
                        }),
                        ..Probe::default()
                    }),
                    startup_probe: Some(Probe {
                        tcp_socket: Some(TCPSocketAction {
                            port: IntOrString::String("http".into()),
                            ..TCPSocketAction::default()
                        }),
                        timeout_seconds: Some(4),
                        ..Probe::default()
                    }),
                    ..Container::default()
                },
                Container {
                    name: "api".into(),
                    readiness_probe: Some(Probe {
                        grpc: Some(GRPCAction {
                            port: 9090,
                            service: Some("shop.Cart".into()),
                        }),
                        ..Probe::default()
                    }),
                    ..Container::default()
                },
            ],
            ..PodSpec::default()
        };
        (meta, spec)
    }

    /// Injection points the HTTP, TCP and gRPC probes at the admin port and tells the
    /// proxy the originals; the exec probe stays; uninjection restores the pod exactly.
    #[test]
    fn injection_rewrites_http_grpc_and_tcp_probes_and_uninjection_restores_them() {
        let (meta0, spec0) = probed_pod(None);
        let (mut meta, mut spec) = (meta0.clone(), spec0.clone());
        inject(&mut meta, &mut spec, &InjectConfig::default()).unwrap();
        let web = &spec.containers[0];
        let get = web
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap();
        assert_eq!(
            (get.port.clone(), get.path.as_deref()),
            (
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021),
                Some("/app-health/web/readyz")
            )
        );
        assert_eq!(web.liveness_probe, spec0.containers[0].liveness_probe);
        let startup = web.startup_probe.as_ref().unwrap();
        assert_eq!(
            startup.http_get.as_ref().and_then(|g| g.path.as_deref()),
            Some("/app-health/web/startupz")
        );
        assert!(startup.tcp_socket.is_none());
        let api = spec.containers[1].readiness_probe.as_ref().unwrap();
        assert_eq!(
            api.http_get.as_ref().and_then(|g| g.path.as_deref()),
            Some("/app-health/api/readyz")
        );
        assert!(api.grpc.is_none());
        let json: serde_json::Value =
            serde_json::from_str(&env_of(&spec)[keys::env::APP_PROBES]).unwrap();
        assert_eq!(
            (
                &json["web/readyz"]["handler"],
                &json["web/readyz"]["port"],
                &json["web/readyz"]["path"]
            ),
            (&"httpGet".into(), &8080.into(), &"/healthz".into()),
            "{json}"
        );
        assert_eq!(
            (
                &json["web/startupz"]["handler"],
                &json["web/startupz"]["port"],
                &json["web/startupz"]["timeoutSeconds"]
            ),
            (&"tcpSocket".into(), &8080.into(), &4.into()),
            "{json}"
        );
        assert_eq!(
            (
                &json["api/readyz"]["handler"],
                &json["api/readyz"]["service"]
            ),
            (&"grpc".into(), &"shop.Cart".into()),
            "{json}"
        );
        assert!(json.get("web/livez").is_none(), "{json}");

        // The webhook never re-injects an injected pod, so the probes are not rewritten
        // twice.
        assert_eq!(
            decide(&meta, &spec, "shop", true, &InjectConfig::default()),
            Err(Skip::AlreadyInjected)
        );
        assert!(uninject(&mut meta, &mut spec));
        assert_eq!((meta, spec), (meta0, spec0));
    }

    /// `weft.dev/rewrite-probes: "false"` keeps every probe (HTTP, TCP, gRPC) as
    /// written; a value other than true or false is refused.
    #[test]
    fn the_rewrite_probes_annotation_opts_out() {
        let (mut meta, mut spec) = probed_pod(Some("false"));
        let before = spec.containers.clone();
        inject(&mut meta, &mut spec, &InjectConfig::default()).unwrap();
        assert_eq!(spec.containers, before);
        assert!(!env_of(&spec).contains_key(keys::env::APP_PROBES));

        let (mut meta, mut spec) = probed_pod(Some("true"));
        inject(&mut meta, &mut spec, &InjectConfig::default()).unwrap();
        assert!(env_of(&spec).contains_key(keys::env::APP_PROBES));

        let (mut meta, mut spec) = probed_pod(Some("no"));
        let err = inject(&mut meta, &mut spec, &InjectConfig::default()).unwrap_err();
        assert!(
            matches!(err, InjectError::BadAnnotation { key, .. } if key == keys::REWRITE_PROBES)
        );
    }
}
