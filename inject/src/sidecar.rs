//! The containers and volume injection adds, built from the settings and pod options.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
        ObjectFieldSelector, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
        SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};

use super::{
    InjectConfig,
    annotations::{PodOptions, join},
    keys,
};

/// The audience of the projected token the operator verifies with TokenReview.
pub const TOKEN_AUDIENCE: &str = "weft";

/// `weft-proxy init`: installs the redirect, then exits. Root in the pod's network
/// namespace with NET_ADMIN and NET_RAW, nothing else.
pub fn init_container(cfg: &InjectConfig, opts: &PodOptions) -> Container {
    let mut skip_inbound = vec![super::annotations::PortRange {
        start: cfg.ports.admin,
        end: cfg.ports.admin,
    }];
    skip_inbound.extend(opts.skip_inbound_ports.iter().copied());
    let mut args = vec![
        "init".to_owned(),
        format!("--inbound-port={}", cfg.ports.inbound),
        format!("--outbound-port={}", cfg.ports.outbound),
        format!("--proxy-uid={}", cfg.proxy_uid),
        format!("--skip-inbound-ports={}", join(&skip_inbound)),
    ];
    if !opts.skip_outbound_ports.is_empty() {
        args.push(format!(
            "--skip-outbound-ports={}",
            join(&opts.skip_outbound_ports)
        ));
    }
    if !opts.skip_outbound_cidrs.is_empty() {
        args.push(format!(
            "--skip-outbound-cidrs={}",
            opts.skip_outbound_cidrs.join(",")
        ));
    }
    Container {
        name: keys::INIT_CONTAINER.to_owned(),
        image: Some(cfg.proxy_image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[
                ("cpu", Some("10m")),
                ("memory", Some("10Mi")),
            ])),
            limits: Some(quantities(&[
                ("cpu", Some("100m")),
                ("memory", Some("64Mi")),
            ])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The proxy as a native sidecar: an init container with `restartPolicy: Always`, so it
/// starts before the app (gated by its startup probe) and does not hold Jobs open.
/// `app_probes` is the JSON of the application's rewritten probes, if any.
pub fn proxy_container(
    cfg: &InjectConfig,
    opts: &PodOptions,
    app_probes: Option<String>,
) -> Container {
    let admin = IntOrString::Int(i32::from(cfg.ports.admin));
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: admin.clone(),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    };
    let field = |path: &str| {
        Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    let value = |name: &str, v: String| EnvVar {
        name: name.to_owned(),
        value: Some(v),
        ..Default::default()
    };
    let mut env = vec![
        EnvVar {
            name: keys::env::POD_NAME.to_owned(),
            value_from: field("metadata.name"),
            ..Default::default()
        },
        EnvVar {
            name: keys::env::POD_NAMESPACE.to_owned(),
            value_from: field("metadata.namespace"),
            ..Default::default()
        },
        value(keys::env::OPERATOR_ADDR, cfg.operator_addr.clone()),
        value(keys::env::TOKEN_FILE, format!("{}/token", keys::TOKEN_DIR)),
        value(keys::env::LOG, opts.log_level.to_string()),
        // The same ports `init` redirects to and the probes use, so a non-default port
        // setting moves the listeners with the rules; `[::]` takes IPv4 and IPv6 alike, as
        // `init` redirects both.
        value(
            keys::env::OUTBOUND_ADDR,
            format!("[::]:{}", cfg.ports.outbound),
        ),
        value(
            keys::env::INBOUND_ADDR,
            format!("[::]:{}", cfg.ports.inbound),
        ),
        value(keys::env::ADMIN_ADDR, format!("[::]:{}", cfg.ports.admin)),
    ];
    if !opts.opaque_ports.is_empty() {
        env.push(value(keys::env::OPAQUE_PORTS, join(&opts.opaque_ports)));
    }
    if !opts.inbound_loopback_ports.is_empty() {
        env.push(value(
            keys::env::INBOUND_LOOPBACK_PORTS,
            join(&opts.inbound_loopback_ports),
        ));
    }
    if let Some(format) = opts.access_log {
        env.push(value(keys::env::ACCESS_LOG, format.to_owned()));
    }
    if let Some(transport) = opts.mesh_http1 {
        env.push(value(keys::env::MESH_HTTP1, transport.to_owned()));
    }
    for (name, timeout) in &opts.timeouts {
        env.push(value(name, timeout.clone()));
    }
    if let Some(trace) = &opts.trace {
        env.push(value(keys::env::TRACE_COLLECTOR, trace.collector.clone()));
        if let Some(p) = &trace.sampling {
            env.push(value(keys::env::TRACE_SAMPLING, p.clone()));
        }
        if let Some(name) = &trace.service_name {
            env.push(value(keys::env::TRACE_SERVICE_NAME, name.clone()));
        }
    }
    if let Some(json) = app_probes {
        env.push(value(keys::env::APP_PROBES, json));
        // Where the kubelet's probes went before they were rewritten.
        env.push(EnvVar {
            name: keys::env::POD_IP.to_owned(),
            value_from: field("status.podIP"),
            ..Default::default()
        });
    }
    if let Some(id) = &cfg.identity {
        env.push(value(keys::env::IDENTITY_ADDR, id.addr.clone()));
        env.push(value(
            keys::env::IDENTITY_SERVER_NAME,
            id.server_name.clone(),
        ));
        env.push(value(keys::env::TRUST_ROOTS, id.trust_roots.clone()));
        // The operator serves the config stream with the same certificate as the identity
        // endpoint; the proxy, holding the root, verifies it for this name.
        env.push(value(
            keys::env::OPERATOR_SERVER_NAME,
            id.server_name.clone(),
        ));
    }
    let r = &opts.resources;
    Container {
        name: keys::PROXY_CONTAINER.to_owned(),
        image: Some(cfg.proxy_image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        args: Some(vec!["run".to_owned()]),
        restart_policy: Some("Always".to_owned()),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("weft-admin".to_owned()),
            container_port: i32::from(cfg.ports.admin),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        startup_probe: Some(probe("/ready", 1, 120)),
        readiness_probe: Some(probe("/ready", 5, 3)),
        liveness_probe: Some(probe("/live", 10, 3)),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[
                ("cpu", r.cpu_request.as_deref()),
                ("memory", r.memory_request.as_deref()),
            ])),
            limits: Some(quantities(&[
                ("cpu", r.cpu_limit.as_deref()),
                ("memory", r.memory_limit.as_deref()),
            ])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(cfg.proxy_uid),
            run_as_group: Some(cfg.proxy_uid),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: keys::TOKEN_VOLUME.to_owned(),
            mount_path: keys::TOKEN_DIR.to_owned(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// A projected ServiceAccount token for audience `weft`, refreshed by the kubelet.
pub fn token_volume(cfg: &InjectConfig) -> Volume {
    Volume {
        name: keys::TOKEN_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.to_owned()),
                    expiration_seconds: Some(cfg.token_expiration_seconds),
                    path: "token".to_owned(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..Default::default()
    }
}

fn quantities(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| ((*k).to_owned(), Quantity(v.to_owned()))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variables the proxy container gets, exactly. This list is mirrored in
    /// `proxy/tests/interception.rs`, which checks that `weft-proxy run` reads each one:
    /// adding a variable here means adding it there, where a variable nobody reads fails.
    #[test]
    fn the_proxy_gets_only_variables_it_reads() {
        let cfg = InjectConfig::default();
        let annotations = [
            (keys::OPAQUE_PORTS, "3306"),
            (keys::INBOUND_LOOPBACK_PORTS, "9090"),
            (keys::ACCESS_LOG, "json"),
            (keys::MESH_HTTP1, "sessions"),
            (keys::TRACE_COLLECTOR, "otel:4317"),
            (keys::TRACE_SAMPLING, "0.5"),
            (keys::APP_IDLE_TIMEOUT, "3s"),
            (keys::UPSTREAM_IDLE_TIMEOUT, "5m"),
            (keys::HTTP1_IDLE_TIMEOUT, "10m"),
            (keys::HTTP2_IDLE_TIMEOUT, "20m"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let mut opts = PodOptions::from_annotations(Some(&annotations), &cfg).unwrap();
        if let Some(t) = opts.trace.as_mut() {
            t.service_name = Some("shop".into());
        }
        let env = proxy_container(&cfg, &opts, Some("{}".into())).env.unwrap();
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                keys::env::POD_NAME,
                keys::env::POD_NAMESPACE,
                keys::env::OPERATOR_ADDR,
                keys::env::TOKEN_FILE,
                keys::env::LOG,
                keys::env::OUTBOUND_ADDR,
                keys::env::INBOUND_ADDR,
                keys::env::ADMIN_ADDR,
                keys::env::OPAQUE_PORTS,
                keys::env::INBOUND_LOOPBACK_PORTS,
                keys::env::ACCESS_LOG,
                keys::env::MESH_HTTP1,
                keys::env::APP_IDLE_TIMEOUT,
                keys::env::UPSTREAM_IDLE_TIMEOUT,
                keys::env::HTTP1_IDLE_TIMEOUT,
                keys::env::HTTP2_IDLE_TIMEOUT,
                keys::env::TRACE_COLLECTOR,
                keys::env::TRACE_SAMPLING,
                keys::env::TRACE_SERVICE_NAME,
                keys::env::APP_PROBES,
                keys::env::POD_IP,
            ]
        );
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(value(keys::env::OPAQUE_PORTS).as_deref(), Some("3306"));
        assert_eq!(
            value(keys::env::INBOUND_LOOPBACK_PORTS).as_deref(),
            Some("9090")
        );
        assert_eq!(value(keys::env::ACCESS_LOG).as_deref(), Some("json"));
        assert_eq!(value(keys::env::MESH_HTTP1).as_deref(), Some("sessions"));
        assert_eq!(value(keys::env::APP_IDLE_TIMEOUT).as_deref(), Some("3s"));
        assert_eq!(
            value(keys::env::UPSTREAM_IDLE_TIMEOUT).as_deref(),
            Some("5m")
        );
        assert_eq!(value(keys::env::HTTP1_IDLE_TIMEOUT).as_deref(), Some("10m"));
        assert_eq!(value(keys::env::HTTP2_IDLE_TIMEOUT).as_deref(), Some("20m"));
        assert_eq!(
            value(keys::env::TRACE_COLLECTOR).as_deref(),
            Some("otel:4317")
        );
        assert_eq!(value(keys::env::TRACE_SAMPLING).as_deref(), Some("0.5"));
        assert_eq!(
            value(keys::env::TRACE_SERVICE_NAME).as_deref(),
            Some("shop")
        );

        // Without the annotations, neither list is set (the proxy's defaults: none).
        let plain = proxy_container(&cfg, &PodOptions::default(), None)
            .env
            .unwrap();
        assert_eq!(plain.len(), 8);

        // With the operator's identity endpoint, the proxy gets where and what to trust.
        let meshed = InjectConfig {
            identity: Some(crate::InjectIdentity {
                addr: "weft-operator.weft-system.svc:15012".into(),
                server_name: "weft-operator.weft-system.svc".into(),
                trust_roots: "-----BEGIN CERTIFICATE-----\n...".into(),
            }),
            ..InjectConfig::default()
        };
        let env = proxy_container(&meshed, &PodOptions::default(), None)
            .env
            .unwrap();
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names[8..],
            [
                keys::env::IDENTITY_ADDR,
                keys::env::IDENTITY_SERVER_NAME,
                keys::env::TRUST_ROOTS,
                keys::env::OPERATOR_SERVER_NAME
            ]
        );
    }
}
