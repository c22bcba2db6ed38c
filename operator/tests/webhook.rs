//! The injection webhook against the test bed's real API server, which calls it over TLS
//! for every pod creation its registration selects.
//!
//! Each test runs its own webhook (own port, own MutatingWebhookConfiguration scoped by a
//! namespace label to the test's namespace), so tests cannot see each other's webhooks.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, time::Duration};

use anyhow::{anyhow, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Namespace, Pod},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use weft_e2e::shared::{self, eventually};
use weft_operator::{
    inject::{InjectConfig, keys},
    mesh,
    webhook::{CaChange, FailurePolicy, WebhookMetrics},
};

mod support;

use support::*;

#[tokio::test]
async fn an_annotated_pod_gets_the_sidecar_the_init_container_and_the_token() {
    let t = Injecting::start("inject-pod", FailurePolicy::Ignore).await;
    let created = t.create("web", json!({"weft.dev/inject": "enabled"})).await;
    let spec = created.spec.clone().unwrap();
    let inits = spec.init_containers.clone().unwrap();
    assert_eq!(init_names(&created), ["weft-init", "weft-proxy"]);
    let proxy = &inits[1];
    assert_eq!(
        proxy.restart_policy.as_deref(),
        Some("Always"),
        "a native sidecar"
    );
    let sc = proxy.security_context.clone().unwrap();
    assert_eq!(sc.run_as_user, Some(5150));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    assert!(
        proxy.startup_probe.is_some()
            && proxy.readiness_probe.is_some()
            && proxy.liveness_probe.is_some()
    );
    let init_caps = inits[0]
        .security_context
        .clone()
        .unwrap()
        .capabilities
        .unwrap();
    assert_eq!(init_caps.add.unwrap(), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(init_caps.drop.unwrap(), ["ALL"]);
    let args = inits[0].args.clone().unwrap().join(" ");
    assert!(
        args.contains("--inbound-port=15006") && args.contains("--outbound-port=15001"),
        "{args}"
    );
    assert!(
        args.contains("--proxy-uid=5150") && args.contains("--skip-inbound-ports=15021"),
        "{args}"
    );

    let volume = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == keys::TOKEN_VOLUME)
        .unwrap();
    let token = volume.projected.unwrap().sources.unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(token.audience.as_deref(), Some("weft"));
    let env: Vec<String> = proxy
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    for name in [
        "WEFT_POD_NAME",
        "WEFT_POD_NAMESPACE",
        "WEFT_OPERATOR_ADDR",
        "WEFT_TOKEN_FILE",
        "WEFT_LOG",
    ] {
        assert!(env.iter().any(|e| e == name), "{name} missing from {env:?}");
    }
    assert_eq!(
        created
            .annotations()
            .get(keys::PROXY_VERSION)
            .map(String::as_str),
        Some("0.1.0-test")
    );
    assert_eq!(
        created.labels().get(keys::MESHED_LABEL).map(String::as_str),
        Some("true")
    );
    assert!(t.hook.metrics.count("injected") >= 1);
    let metrics = https_get(&t.client, t.port, "/metrics").await;
    assert!(
        metrics.contains("weft_webhook_admissions_total{outcome=\"injected\"}"),
        "{metrics}"
    );
    t.hook.stop().await;
}

/// The real API server stores the injected pod with its HTTP, TCP and gRPC probes pointed
/// at the proxy's admin port (so that a Strict Policy cannot fail them, nor the proxy
/// pass a TCP probe for a dead application) and the originals in the proxy's
/// environment; an opted-out pod's probes stay as written.
#[tokio::test]
async fn an_injected_pods_http_probes_point_at_the_admin_port() {
    let t = Injecting::start("inject-probes", FailurePolicy::Ignore).await;
    let probed = |name: &str, annotations: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"containers": [{
                "name": "app",
                "image": "weft.invalid/app:1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 2, "timeoutSeconds": 3},
                "livenessProbe": {"httpGet": {"path": "/live", "port": 8081}},
                "startupProbe": {"tcpSocket": {"port": "http"}, "timeoutSeconds": 4},
            }, {
                "name": "api",
                "image": "weft.invalid/api:1",
                "readinessProbe": {"grpc": {"port": 9090, "service": "shop.Cart"}},
            }]}
        }))
        .unwrap()
    };

    let created = t
        .create_pod(&probed("web", json!({"weft.dev/inject": "enabled"})))
        .await
        .unwrap();
    let spec = created.spec.clone().unwrap();
    let app = &spec.containers[0];
    let ready = app.readiness_probe.clone().unwrap();
    let get = ready.http_get.clone().unwrap();
    assert_eq!(
        (get.port, get.path.as_deref(), get.scheme.as_deref()),
        (
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021),
            Some("/app-health/app/readyz"),
            Some("HTTP")
        )
    );
    assert_eq!(
        (ready.period_seconds, ready.timeout_seconds),
        (Some(2), Some(3))
    );
    let live = app.liveness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(live.path.as_deref(), Some("/app-health/app/livez"));
    let startup = app.startup_probe.clone().unwrap();
    assert!(startup.tcp_socket.is_none(), "{startup:?}");
    assert_eq!(
        startup.http_get.unwrap().path.as_deref(),
        Some("/app-health/app/startupz")
    );
    let api = spec.containers[1].readiness_probe.clone().unwrap();
    assert!(api.grpc.is_none(), "{api:?}");
    assert_eq!(
        api.http_get.unwrap().path.as_deref(),
        Some("/app-health/api/readyz")
    );
    let proxy = spec
        .init_containers
        .unwrap()
        .into_iter()
        .find(|c| c.name == keys::PROXY_CONTAINER)
        .unwrap();
    let probes = proxy
        .env
        .unwrap()
        .into_iter()
        .find(|e| e.name == keys::env::APP_PROBES)
        .and_then(|e| e.value)
        .unwrap();
    let probes: serde_json::Value = serde_json::from_str(&probes).unwrap();
    assert_eq!(probes["app/readyz"]["port"], 8080, "{probes}");
    assert_eq!(probes["app/readyz"]["path"], "/healthz", "{probes}");
    assert_eq!(probes["app/livez"]["port"], 8081, "{probes}");
    assert_eq!(probes["app/startupz"]["handler"], "tcpSocket", "{probes}");
    assert_eq!(probes["app/startupz"]["port"], 8080, "{probes}");
    assert_eq!(probes["app/startupz"]["timeoutSeconds"], 4, "{probes}");
    assert_eq!(probes["api/readyz"]["handler"], "grpc", "{probes}");
    assert_eq!(probes["api/readyz"]["service"], "shop.Cart", "{probes}");

    let kept = t
        .create_pod(&probed(
            "kept",
            json!({"weft.dev/inject": "enabled", "weft.dev/rewrite-probes": "false"}),
        ))
        .await
        .unwrap();
    assert!(has_proxy(&kept));
    let app = &kept.spec.unwrap().containers[0];
    let get = app.readiness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(
        (get.port, get.path.as_deref()),
        (
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into()),
            Some("/healthz")
        )
    );
    assert!(app.startup_probe.as_ref().unwrap().tcp_socket.is_some());
    t.hook.stop().await;
}

#[tokio::test]
async fn a_labelled_namespace_injects_deployment_pods_but_honours_opt_out() {
    let client = shared::client().await.unwrap();
    let ns = scoped_namespace(&client, "inject-ns", Some("enabled")).await;
    let hook = start_webhook(&client, &ns, FailurePolicy::Ignore).await;

    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "shop"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "shop"}},
            "template": {
                "metadata": {"labels": {"app": "shop"}},
                "spec": {"containers": [{"name": "shop", "image": "weft.invalid/shop:1"}]}
            }
        }
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let created = eventually(Duration::from_secs(30), || async {
        let list = pods.list(&ListParams::default().labels("app=shop")).await?;
        ensure!(list.items.len() == 2, "{} pods so far", list.items.len());
        Ok(list.items)
    })
    .await
    .unwrap();
    for p in &created {
        assert!(has_proxy(p), "deployment pod {} not injected", p.name_any());
    }

    // Opt-out by annotation, and by label.
    let out = pods
        .create(
            &PostParams::default(),
            &pod("opted-out", json!({"weft.dev/inject": "disabled"})),
        )
        .await
        .unwrap();
    assert!(!has_proxy(&out));
    let mut labelled = pod("opted-out-label", json!({}));
    labelled.metadata.labels = Some(BTreeMap::from([(
        keys::INJECT.to_owned(),
        "disabled".to_owned(),
    )]));
    let out = pods
        .create(&PostParams::default(), &labelled)
        .await
        .unwrap();
    assert!(!has_proxy(&out));
    hook.stop().await;
}

#[tokio::test]
async fn beside_the_operator_the_webhook_reads_namespace_labels_from_its_index() {
    let client = shared::client().await.unwrap();
    shared::install_crds(&client).await.unwrap();
    // The operator's index over the whole cluster, as `weft-operator` runs it.
    let stop = tokio_util::sync::CancellationToken::new();
    let settings = support::mesh::operator_settings(
        &client,
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let (handles, done) = mesh::run(client.clone(), settings, stop.clone());
    eventually(Duration::from_secs(30), || async {
        ensure!(handles.index.is_synced(), "index not synced");
        Ok(())
    })
    .await
    .unwrap();
    let ns = scoped_namespace(&client, "inject-shared", None).await;
    let hook = start_webhook_sharing(&client, &ns, handles.index.clone()).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let plain = pods
        .create(&dry_run, &pod("plain", json!({})))
        .await
        .unwrap();
    assert!(!has_proxy(&plain), "the namespace has not opted in yet");

    // Opting the namespace in reaches the webhook through the index's Namespace watch.
    let label = |v: &str| json!({"metadata": {"labels": {keys::INJECT: v}}});
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(label("enabled")),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(30), || async {
        let p = pods.create(&dry_run, &pod("plain", json!({}))).await?;
        ensure!(has_proxy(&p), "not injected yet");
        Ok(())
    })
    .await
    .unwrap();
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(label("disabled")),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(30), || async {
        let p = pods.create(&dry_run, &pod("plain", json!({}))).await?;
        ensure!(!has_proxy(&p), "still injected");
        Ok(())
    })
    .await
    .unwrap();
    hook.stop().await;
    stop.cancel();
    done.await.unwrap();
}

#[tokio::test]
async fn pods_that_did_not_opt_in_or_cannot_be_meshed_are_left_alone() {
    let t = Injecting::start("inject-skip", FailurePolicy::Ignore).await;
    let plain = t.create("plain", json!({})).await;
    assert!(!has_proxy(&plain));

    let mut host = pod("host", json!({"weft.dev/inject": "enabled"}));
    host.spec.as_mut().unwrap().host_network = Some(true);
    let host = t.create_pod(&host).await.unwrap();
    assert!(!has_proxy(&host), "hostNetwork pods are never injected");
    t.hook.stop().await;
}

#[tokio::test]
async fn injection_is_idempotent_and_keeps_existing_init_containers_and_volumes() {
    let t = Injecting::start("inject-idem", FailurePolicy::Ignore).await;

    let mut with_init: Pod = serde_json::from_value(json!({
        "metadata": {"name": "migrate", "annotations": {"weft.dev/inject": "enabled"}},
        "spec": {
            "initContainers": [{"name": "migrate-db", "image": "weft.invalid/migrate:1"}],
            "containers": [{"name": "app", "image": "weft.invalid/app:1", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "emptyDir": {}}]
        }
    }))
    .unwrap();
    let created = t.create_pod(&with_init).await.unwrap();
    assert_eq!(
        init_names(&created),
        ["weft-init", "weft-proxy", "migrate-db"]
    );
    let volumes: Vec<String> = created
        .spec
        .clone()
        .unwrap()
        .volumes
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert!(
        volumes.contains(&"data".to_owned()) && volumes.contains(&keys::TOKEN_VOLUME.to_owned()),
        "{volumes:?}"
    );

    // A manifest that was injected already (by `kubectl weft inject`) is not injected again.
    with_init.metadata.name = Some("migrate-again".to_owned());
    let (mut meta, mut spec) = (with_init.metadata.clone(), with_init.spec.clone().unwrap());
    weft_operator::inject::inject(&mut meta, &mut spec, &InjectConfig::default()).unwrap();
    let pre_injected = Pod {
        metadata: meta,
        spec: Some(spec),
        status: None,
    };
    let created = t.create_pod(&pre_injected).await.unwrap();
    let names = init_names(&created);
    assert_eq!(
        names.iter().filter(|n| *n == "weft-proxy").count(),
        1,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| *n == "weft-init").count(),
        1,
        "{names:?}"
    );
    assert!(t.hook.metrics.count("already_injected") >= 1);
    t.hook.stop().await;
}

#[tokio::test]
async fn a_pod_whose_port_clashes_with_the_proxy_is_rejected_with_the_reason() {
    let t = Injecting::start("inject-clash", FailurePolicy::Ignore).await;
    let clash: Pod = serde_json::from_value(json!({
        "metadata": {"name": "clash", "annotations": {"weft.dev/inject": "enabled"}},
        "spec": {"containers": [{"name": "app", "image": "weft.invalid/app:1", "ports": [{"containerPort": 15006}]}]}
    }))
    .unwrap();
    match t.create_pod(&clash).await {
        Err(kube::Error::Api(e)) => {
            assert!(e.message.contains("15006"), "{}", e.message);
            assert!(
                e.message.contains("weft.dev/inject: disabled"),
                "says how to get out: {}",
                e.message
            );
        }
        other => panic!("want a rejection, got {other:?}"),
    }
    let bad_annotation = pod(
        "bad",
        json!({"weft.dev/inject": "enabled", "weft.dev/skip-outbound-ports": "http"}),
    );
    match t.create_pod(&bad_annotation).await {
        Err(kube::Error::Api(e)) => assert!(
            e.message.contains("weft.dev/skip-outbound-ports"),
            "{}",
            e.message
        ),
        other => panic!("want a rejection, got {other:?}"),
    }
    // A container of the pod's own named as the proxy is a clash too, not a proxy: skipped
    // as injected, the pod would run outside the mesh with no error.
    let named: Pod = serde_json::from_value(json!({
        "metadata": {"name": "named", "annotations": {"weft.dev/inject": "enabled"}},
        "spec": {"containers": [
            {"name": "app", "image": "weft.invalid/app:1"},
            {"name": "weft-proxy", "image": "weft.invalid/own-proxy:1"}
        ]}
    }))
    .unwrap();
    match t.create_pod(&named).await {
        Err(kube::Error::Api(e)) => assert!(
            e.message.contains("container named \"weft-proxy\"")
                && e.message.contains("weft.dev/inject: disabled"),
            "{}",
            e.message
        ),
        other => panic!("want a rejection, got {other:?}"),
    }
    t.hook.stop().await;
}

/// A pod's timeout annotations reach its proxy as the settings they name, through the real
/// API server; one the proxy would refuse at start is refused at admission, by name, so it
/// cannot leave the pod with a proxy that never starts.
#[tokio::test]
async fn timeout_annotations_reach_the_proxy_or_are_refused_by_name() {
    let t = Injecting::start("inject-timeouts", FailurePolicy::Ignore).await;
    let created = t
        .create(
            "tuned",
            json!({
                "weft.dev/inject": "enabled",
                "weft.dev/app-idle-timeout": "500ms",
                "weft.dev/upstream-idle-timeout": "20s",
                "weft.dev/http1-idle-timeout": "10m",
                "weft.dev/http2-idle-timeout": "2h",
                "weft.dev/proxy-log-level": "warn,weft_proxy=debug",
            }),
        )
        .await;
    let inits = created.spec.unwrap().init_containers.unwrap();
    let proxy = inits.iter().find(|c| c.name == "weft-proxy").unwrap();
    let env: BTreeMap<String, String> = proxy
        .env
        .clone()
        .unwrap()
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect();
    for (name, value) in [
        ("WEFT_APP_IDLE_TIMEOUT", "500ms"),
        ("WEFT_UPSTREAM_IDLE_TIMEOUT", "20s"),
        ("WEFT_HTTP1_IDLE_TIMEOUT", "10m"),
        ("WEFT_HTTP2_IDLE_TIMEOUT", "2h"),
        ("WEFT_LOG", "warn,weft_proxy=debug"),
    ] {
        assert_eq!(env.get(name).map(String::as_str), Some(value), "{env:?}");
    }
    let untuned = t
        .create("untuned", json!({"weft.dev/inject": "enabled"}))
        .await;
    let inits = untuned.spec.unwrap().init_containers.unwrap();
    let proxy = inits.iter().find(|c| c.name == "weft-proxy").unwrap();
    assert!(
        !proxy
            .env
            .iter()
            .flatten()
            .any(|e| e.name.ends_with("IDLE_TIMEOUT")),
        "no annotation, the proxy's defaults"
    );
    let bad = pod(
        "bad",
        json!({"weft.dev/inject": "enabled", "weft.dev/app-idle-timeout": "1.5s"}),
    );
    match t.create_pod(&bad).await {
        Err(kube::Error::Api(e)) => assert!(
            e.message.contains("weft.dev/app-idle-timeout")
                && e.message.contains("units are h, m, s and ms"),
            "{}",
            e.message
        ),
        other => panic!("want a rejection, got {other:?}"),
    }
    // A log filter whose typo would silence the proxy (EnvFilter reads `degub` as a target).
    let silent = pod(
        "silent",
        json!({"weft.dev/inject": "enabled", "weft.dev/proxy-log-level": "degub"}),
    );
    match t.create_pod(&silent).await {
        Err(kube::Error::Api(e)) => assert!(
            e.message.contains("weft.dev/proxy-log-level")
                && e.message.contains("\"degub\" names no level"),
            "{}",
            e.message
        ),
        other => panic!("want a rejection, got {other:?}"),
    }
    t.hook.stop().await;
}

/// A misspelt `weft.dev/` annotation does nothing, so the webhook says so: the real API
/// server hands its warning to the client (kubectl prints it) with the created pod.
#[tokio::test]
async fn a_misspelt_annotation_comes_back_from_the_api_server_as_a_warning() {
    let t = Injecting::start("inject-typo", FailurePolicy::Fail).await;
    // The warnings the API server hands back for a dry-run create of `pod`.
    let warned = |pod: Pod| {
        let req = http::Request::post(format!("/api/v1/namespaces/{}/pods?dryRun=All", t.ns))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&pod).unwrap().into())
            .unwrap();
        let client = t.client.clone();
        async move {
            let resp = client.send(req).await.unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());
            resp.headers()
                .get_all("warning")
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<String>>()
        }
    };
    let warnings = warned(pod(
        "typo",
        json!({"weft.dev/inject": "enabled", "weft.dev/opaque-port": "3306"}),
    ))
    .await;
    assert!(
        warnings.iter().any(|w| w.contains(
            "annotation weft.dev/opaque-port is not one Weft reads, so it does nothing; did you mean weft.dev/opaque-ports?"
        )),
        "{warnings:?}"
    );
    // Istio's spelling: opts nothing in (nor, in an injected namespace, out).
    let warnings = warned(pod("istio", json!({"weft.dev/inject": "true"}))).await;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("annotation weft.dev/inject:")
                && w.contains("true")
                && w.contains(
                    "is neither enabled nor disabled, so it opts the pod neither in nor out"
                )),
        "{warnings:?}"
    );
    t.hook.stop().await;
}

#[tokio::test]
async fn with_the_operator_down_failure_policy_decides() {
    let client = shared::client().await.unwrap();

    // Ignore (the default): pods are created, without the proxy.
    let ns = scoped_namespace(&client, "inject-down", None).await;
    let hook = start_webhook(&client, &ns, FailurePolicy::Ignore).await;
    hook.stop().await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let created = eventually(Duration::from_secs(20), || async {
        let p = pods
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &pod("unmeshed", json!({"weft.dev/inject": "enabled"})),
            )
            .await?;
        ensure!(!has_proxy(&p), "webhook still answering");
        Ok(p)
    })
    .await
    .unwrap();
    assert!(!has_proxy(&created));
    let real = pods
        .create(
            &PostParams::default(),
            &pod("unmeshed", json!({"weft.dev/inject": "enabled"})),
        )
        .await
        .unwrap();
    assert!(
        !has_proxy(&real),
        "created uninjected while the webhook is down"
    );

    // Fail: pod creation is refused while the webhook is down.
    let ns = scoped_namespace(&client, "inject-fail", None).await;
    let hook = start_webhook(&client, &ns, FailurePolicy::Fail).await;
    hook.stop().await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let err = eventually(Duration::from_secs(20), || async {
        match pods
            .create(
                &PostParams::default(),
                &pod("blocked", json!({"weft.dev/inject": "enabled"})),
            )
            .await
        {
            Err(kube::Error::Api(e)) => Ok(e),
            Ok(p) => {
                pods.delete(&p.name_any(), &Default::default()).await?;
                Err(anyhow!("created while the webhook should be down"))
            }
            Err(e) => Err(e.into()),
        }
    })
    .await
    .unwrap();
    assert!(
        err.message.contains("inject.weft.dev"),
        "names the webhook: {}",
        err.message
    );
}

/// A namespace the webhook has not seen, whose labels the API will not give it (here: its
/// client may not read namespaces), gets an HTTP 500 answer, so the registration's failure
/// policy decides: `Fail` refuses the pod of an opted-in namespace (never "not opted in,
/// let it through unmeshed"), `Ignore` admits it without the proxy.
#[tokio::test]
async fn a_namespace_whose_labels_cannot_be_read_leaves_it_to_the_failure_policy() {
    use kube::runtime::reflector;
    use weft_operator::{ca, webhook::server};

    let client = shared::client().await.unwrap();
    let ns = scoped_namespace(&client, "inject-unread", Some("enabled")).await;
    ensure_namespace(&client, "weft-system").await;
    // A client the API server refuses namespace reads: an impersonated user without roles.
    let kubeconfig = kube::config::Kubeconfig::read_from(shared::testbed().kubeconfig()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some("weft-test-nobody".to_owned());
    let nobody = Client::try_from(config).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut settings = settings(&ns, port, FailurePolicy::Fail);
    let ca = ca::load_or_create(client.clone(), &settings.ca_namespace, &settings.ca_secret)
        .await
        .unwrap();
    let leaf = ca
        .issue_serving(&settings.dns_names, &settings.ips, settings.cert_lifetime)
        .unwrap();
    let certs = weft_operator::webhook::CertStore::new(&leaf.cert_pem, &leaf.key_pem).unwrap();
    // An empty store: the webhook has not seen the namespace yet.
    let (store, _writer) = reflector::store();
    let metrics = WebhookMetrics::default();
    let handler = std::sync::Arc::new(server::Handler::new(
        settings.inject.clone(),
        server::NamespaceLabels::Store(store),
        nobody,
        metrics.clone(),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let connections = metrics.connections.clone();
    let serving = tokio::spawn(server::serve(
        listener,
        certs,
        handler,
        connections,
        async {
            let _ = stopped.await;
        },
    ));
    settings
        .registration
        .apply(client.clone(), ca.cert_pem())
        .await
        .unwrap();

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let called = || metrics.count("namespace_unreadable") + metrics.count("not_opted_in");
    // Dry runs until the API server calls this webhook (it picks up registrations late).
    eventually(Duration::from_secs(30), || async {
        let params = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let _ = pods.create(&params, &pod("probe", json!({}))).await;
        ensure!(called() >= 1, "webhook not called yet");
        Ok(())
    })
    .await
    .unwrap();
    let refused = pods
        .create(&PostParams::default(), &pod("unread", json!({})))
        .await;
    match refused {
        Err(kube::Error::Api(e)) => assert!(
            e.message.contains("inject.weft.dev"),
            "names the webhook: {}",
            e.message
        ),
        Ok(p) => panic!(
            "admitted with failurePolicy Fail (proxy: {}): the lookup failed open",
            has_proxy(&p)
        ),
        Err(e) => panic!("{e}"),
    }
    assert!(metrics.count("namespace_unreadable") >= 1);

    // Ignore: the same failure admits the pod, without the proxy.
    settings.registration.failure_policy = FailurePolicy::Ignore;
    settings
        .registration
        .apply(client.clone(), ca.cert_pem())
        .await
        .unwrap();
    let admitted = eventually(Duration::from_secs(30), || async {
        Ok(pods
            .create(&PostParams::default(), &pod("ignored", json!({})))
            .await?)
    })
    .await
    .unwrap();
    assert!(!has_proxy(&admitted));
    settings.registration.delete(client.clone()).await.unwrap();
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
}

/// The unmeshed-pod audit agrees with the webhook and its registration, on the real API
/// server: a host-network pod in an opted-in namespace (the webhook skips it) and an
/// annotated pod in a namespace labelled `disabled` (the API server never sends it) are
/// created without the proxy and not flagged; a pod created while the webhook is down is.
#[tokio::test]
async fn the_audit_flags_only_pods_the_webhook_would_have_injected() {
    let client = shared::client().await.unwrap();
    let on = scoped_namespace(&client, "audit-on", Some("enabled")).await;
    // Served by the same webhook as `on`: the same scope label.
    let off = shared::namespace(&client, "audit-off").await.unwrap();
    let patch = json!({"metadata": {"labels": {(SCOPE_LABEL): on, (keys::INJECT): "disabled"}}});
    Api::<Namespace>::all(client.clone())
        .patch(&off, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let hook = start_webhook(&client, &on, FailurePolicy::Ignore).await;
    let create = |ns: &str, pod: serde_json::Value| {
        let api = Api::<Pod>::namespaced(client.clone(), ns);
        let pod: Pod = serde_json::from_value(pod).unwrap();
        async move { api.create(&PostParams::default(), &pod).await.unwrap() }
    };
    let host = create(
        &on,
        json!({
            "metadata": {"name": "host"},
            "spec": {"hostNetwork": true, "containers": [{"name": "app", "image": "weft.invalid/app:1"}]}
        }),
    )
    .await;
    let annotated = create(
        &off,
        serde_json::to_value(pod("annotated", json!({"weft.dev/inject": "enabled"}))).unwrap(),
    )
    .await;
    let meshed = create(&on, serde_json::to_value(pod("meshed", json!({}))).unwrap()).await;
    assert!(
        !has_proxy(&host) && !has_proxy(&annotated),
        "the webhook left them alone"
    );
    assert!(has_proxy(&meshed));
    assert_eq!(hook.metrics.count("host_network"), 1);

    // The positive control: opted in, created while the webhook is down.
    hook.stop().await;
    let pods = Api::<Pod>::namespaced(client.clone(), &on);
    eventually(Duration::from_secs(20), || async {
        let p = pods
            .create(&PostParams::default(), &pod("missed", json!({})))
            .await?;
        if has_proxy(&p) {
            pods.delete("missed", &Default::default()).await?;
            return Err(anyhow!("webhook still answering"));
        }
        Ok(())
    })
    .await
    .unwrap();
    let entries = settings(&on, 0, FailurePolicy::Ignore)
        .registration
        .entries();
    let found: Vec<String> =
        weft_operator::inject::audit::scan(&client, &InjectConfig::default(), &entries)
            .await
            .unwrap()
            .unmeshed
            .into_iter()
            .filter(|u| u.namespace == on || u.namespace == off)
            .map(|u| format!("{}/{}", u.namespace, u.name))
            .collect();
    assert_eq!(found, [format!("{on}/missed")]);
}

/// With `--webhook-namespace-scope`, the webhook is never sent pods outside the scope, so
/// the audit does not flag them: restarting one would not mesh it.
#[tokio::test]
async fn the_audit_of_a_scoped_webhook_flags_no_pod_outside_its_scope() {
    let client = shared::client().await.unwrap();
    // No webhook runs: an opted-in pod created in either namespace runs without the proxy.
    let inside = scoped_namespace(&client, "audit-in", Some("enabled")).await;
    let outside = shared::namespace(&client, "audit-out").await.unwrap();
    let patch = json!({"metadata": {"labels": {(keys::INJECT): "enabled"}}});
    Api::<Namespace>::all(client.clone())
        .patch(&outside, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    for ns in [&inside, &outside] {
        let p = Api::<Pod>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &pod("missed", json!({})))
            .await
            .unwrap();
        assert!(!has_proxy(&p), "{ns}: no webhook serves it");
    }
    let cfg = InjectConfig::default();
    let flagged = |entries: Vec<weft_operator::inject::selection::Entry>| {
        let client = client.clone();
        let cfg = cfg.clone();
        let (inside, outside) = (inside.clone(), outside.clone());
        async move {
            weft_operator::inject::audit::scan(&client, &cfg, &entries)
                .await
                .unwrap()
                .unmeshed
                .into_iter()
                .filter(|u| u.namespace == inside || u.namespace == outside)
                .map(|u| format!("{}/{}", u.namespace, u.name))
                .collect::<Vec<String>>()
        }
    };

    // The control: a webhook without a scope would have been sent both.
    let unscoped = weft_operator::inject::selection::entries(true, &cfg.excluded_namespaces, None);
    let mut both = [format!("{inside}/missed"), format!("{outside}/missed")];
    both.sort();
    let mut found = flagged(unscoped).await;
    found.sort();
    assert_eq!(found, both);

    // Scoped to `inside`, as the registration the operator applies.
    let scoped = settings(&inside, 0, FailurePolicy::Ignore)
        .registration
        .entries();
    assert_eq!(flagged(scoped).await, [format!("{inside}/missed")]);
}

/// A TLS connection to the webhook, verified against the CA in the operator's Secret.
async fn connect(
    client: &Client,
    port: u16,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use k8s_openapi::api::core::v1::Secret;
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

    let secret = Api::<Secret>::namespaced(client.clone(), "weft-system")
        .get("weft-ca")
        .await
        .unwrap();
    let ca_pem = secret.data.unwrap()["tls.crt"].0.clone();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    connector
        .connect(name, tcp)
        .await
        .expect("handshake verified against the CA")
}

/// The serving certificate a fresh TLS connection to the webhook gets.
async fn served_certificate(client: &Client, port: u16) -> Vec<u8> {
    let tls = connect(client, port).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A plain HTTP/1.1 GET over a verified TLS connection; returns the whole response.
async fn https_get(client: &Client, port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = connect(client, port).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn failed_tls_handshakes_at_the_webhook_are_counted_by_reason() {
    // The API server calls the webhook over TLS: one that does not trust the webhook's
    // certificate (a stale caBundle) fails before any request, so its failed handshakes
    // are the webhook's only trace of it.
    let t = Injecting::start("inject-handshakes", FailurePolicy::Fail).await;
    let created = t
        .create("through-tls", json!({"weft.dev/inject": "enabled"}))
        .await;
    assert!(has_proxy(&created), "the API server's handshake succeeds");
    // A client trusting another CA refuses the webhook's certificate.
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = other
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    assert!(
        connect_trusting(t.port, &other).await.is_err(),
        "a client of another CA trusted the webhook"
    );
    // A TCP probe: connects and goes.
    drop(
        tokio::net::TcpStream::connect(("127.0.0.1", t.port))
            .await
            .unwrap(),
    );
    let failures = |text: &str, reason: &str| {
        let series = format!("weft_webhook_tls_handshake_failures_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let text = eventually(Duration::from_secs(10), || async {
        let text = https_get(&t.client, t.port, "/metrics").await;
        ensure!(
            failures(&text, "closed") >= 1,
            "the probe is not counted yet: {text}"
        );
        Ok(text)
    })
    .await
    .unwrap();
    assert_eq!(failures(&text, "certificate"), 1, "{text}");
    assert!(text.contains("weft_webhook_connections "), "{text}");
    assert!(
        text.contains("weft_webhook_connections_refused_total 0"),
        "{text}"
    );
    t.hook.stop().await;
}

#[tokio::test]
async fn the_serving_certificate_is_renewed_before_it_expires() {
    // Renewed at two thirds of its life: after 4 s of a 6 s certificate.
    let t =
        Injecting::start_with("inject-renew", FailurePolicy::Fail, Duration::from_secs(6)).await;
    let first = served_certificate(&t.client, t.port).await;
    let renewed = eventually(Duration::from_secs(10), || async {
        let now = served_certificate(&t.client, t.port).await;
        ensure!(now != first, "same certificate still served");
        Ok(now)
    })
    .await
    .unwrap();
    assert_ne!(renewed, first);
    // Past the first certificate's expiry, with failurePolicy Fail, injection still works:
    // the API server's new connections trust the renewed certificate through the same CA.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let created = t
        .create("after-renewal", json!({"weft.dev/inject": "enabled"}))
        .await;
    assert!(has_proxy(&created));
    t.hook.stop().await;
}

#[tokio::test]
async fn a_registration_whose_ca_bundle_another_client_removed_is_restored_but_never_recreated() {
    use base64::Engine as _;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let t = Injecting::start("inject-restore", FailurePolicy::Fail).await;
    let api = Api::<MutatingWebhookConfiguration>::all(t.client.clone());
    let name = format!("weft-injector-{}", t.ns);
    let bundles = |c: &MutatingWebhookConfiguration| -> Vec<Option<Vec<u8>>> {
        c.webhooks
            .iter()
            .flatten()
            .map(|w| w.client_config.ca_bundle.clone().map(|b| b.0))
            .collect()
    };
    let before = api.get(&name).await.unwrap();
    let want = bundles(&before);
    assert!(
        want.iter()
            .all(|b| b.as_ref().is_some_and(|b| !b.is_empty()))
    );
    // As a GitOps sync of the chart's manifest (which has no bundle) would leave it.
    let ops: Vec<serde_json::Value> = (0..want.len())
        .map(|i| json!({"op": "remove", "path": format!("/webhooks/{i}/clientConfig/caBundle")}))
        .collect();
    let patch: json_patch::Patch = serde_json::from_value(json!(ops)).unwrap();
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .unwrap();
    eventually(Duration::from_secs(15), || async {
        let now = bundles(&api.get(&name).await?);
        ensure!(now == want, "bundle not restored yet: {now:?}");
        Ok(())
    })
    .await
    .unwrap();
    // With failurePolicy Fail, a pod is admitted (and injected) again.
    let created = eventually(Duration::from_secs(15), || async {
        Ok(
            t.create_pod(&pod("after-restore", json!({"weft.dev/inject": "enabled"})))
                .await?,
        )
    })
    .await
    .unwrap();
    assert!(has_proxy(&created));

    // Another CA's bundle (another replica's, after the CA Secret was regenerated) is not
    // fought over.
    let other = ["-----BEGIN CERTIFICATE-----\nb3RoZXI=\n-----END CERTIFICATE-----\n"];
    let ops: Vec<serde_json::Value> = (0..want.len())
        .map(|i| {
            json!({"op": "replace", "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                        "value": base64::engine::general_purpose::STANDARD.encode(other[0])})
        })
        .collect();
    let patch: json_patch::Patch = serde_json::from_value(json!(ops)).unwrap();
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = bundles(&api.get(&name).await.unwrap());
    assert!(
        now.iter()
            .all(|b| b.as_deref() == Some(other[0].as_bytes())),
        "another CA's bundle was overwritten: {now:?}"
    );

    // Deleted (as `helm uninstall` does), it stays deleted while the webhook runs on.
    api.delete(&name, &Default::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        api.get_opt(&name).await.unwrap().is_none(),
        "the operator re-created a registration that was deleted"
    );
    t.hook.stop().await;
}

#[tokio::test]
async fn the_webhook_injects_with_the_settings_in_the_clusters_configmap() {
    use weft_operator::{inject::settings, webhook::settings as webhook_settings};

    let client = shared::client().await.unwrap();
    // The operator's namespace, where the chart keeps the settings.
    let op_ns = shared::namespace(&client, "weft-op").await.unwrap();
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &op_ns);
    let base = InjectConfig::for_operator(&op_ns, "weft-operator");

    // No ConfigMap: the operator's own defaults.
    let none = webhook_settings::load(&client, &op_ns, settings::CONFIG_MAP, &base)
        .await
        .unwrap();
    assert!(!none.found);
    assert_eq!(none.config, base);

    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": settings::CONFIG_MAP},
        "data": {
            settings::PROXY_IMAGE: "registry.test/weft-proxy:from-cluster",
            settings::LOG_LEVEL: "debug",
            settings::INBOUND_PORT: "16006",
            settings::TRACE_COLLECTOR: "otel.observability:4317",
            settings::TRACE_SAMPLING: "0.05",
        }
    }))
    .unwrap();
    configmaps
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let loaded = webhook_settings::load(&client, &op_ns, settings::CONFIG_MAP, &base)
        .await
        .unwrap();
    assert!(loaded.found);

    let t = Injecting::start_injecting("inject-settings", loaded.config).await;
    let created = t.create("web", json!({"weft.dev/inject": "enabled"})).await;
    // The mesh-wide tracing default, and pods overriding it by annotation.
    let own_collector = t
        .create(
            "own-collector",
            json!({"weft.dev/inject": "enabled", keys::TRACE_COLLECTOR: "tempo.tracing:4317"}),
        )
        .await;
    let own_sampling = t
        .create(
            "own-sampling",
            json!({"weft.dev/inject": "enabled", keys::TRACE_SAMPLING: "1"}),
        )
        .await;
    let untraced = t
        .create(
            "untraced",
            json!({"weft.dev/inject": "enabled", keys::TRACE_COLLECTOR: "disabled"}),
        )
        .await;
    t.hook.stop().await;
    let tracing_env = |p: &Pod| {
        let inits = p.spec.as_ref().unwrap().init_containers.as_ref().unwrap();
        let proxy = inits
            .iter()
            .find(|c| c.name == keys::PROXY_CONTAINER)
            .unwrap();
        let get = |name: &str| {
            proxy
                .env
                .iter()
                .flatten()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        (
            get(keys::env::TRACE_COLLECTOR),
            get(keys::env::TRACE_SAMPLING),
        )
    };
    let expect = |c: Option<&str>, s: Option<&str>| (c.map(str::to_owned), s.map(str::to_owned));
    assert_eq!(
        tracing_env(&created),
        expect(Some("otel.observability:4317"), Some("0.05"))
    );
    assert_eq!(
        tracing_env(&own_collector),
        expect(Some("tempo.tracing:4317"), Some("0.05"))
    );
    assert_eq!(
        tracing_env(&own_sampling),
        expect(Some("otel.observability:4317"), Some("1"))
    );
    assert_eq!(tracing_env(&untraced), expect(None, None));
    let inits = created.spec.unwrap().init_containers.unwrap();
    let (init, proxy) = (&inits[0], &inits[1]);
    assert_eq!(
        proxy.image.as_deref(),
        Some("registry.test/weft-proxy:from-cluster")
    );
    assert_eq!(init.image, proxy.image);
    let log = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == keys::env::LOG)
        .and_then(|e| e.value.clone());
    assert_eq!(log.as_deref(), Some("debug"));
    assert!(
        init.args
            .iter()
            .flatten()
            .any(|a| a == "--inbound-port=16006"),
        "{:?}",
        init.args
    );
    // The proxy listens where init redirects to: the setting moves both.
    let inbound_addr = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == keys::env::INBOUND_ADDR)
        .and_then(|e| e.value.clone());
    assert_eq!(inbound_addr.as_deref(), Some("[::]:16006"));

    // A ConfigMap with a setting the operator does not know stops it from starting.
    let typo = json!({"data": {"proxyImg": "typo/p:1"}});
    configmaps
        .patch(
            settings::CONFIG_MAP,
            &PatchParams::default(),
            &Patch::Merge(&typo),
        )
        .await
        .unwrap();
    let err = webhook_settings::load(&client, &op_ns, settings::CONFIG_MAP, &base)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown setting \"proxyImg\""),
        "{err}"
    );
}

/// Runs the operator binary with its webhook, in `ns`, until it exits (at most 30 s).
fn operator_exit(ns: &str) -> std::process::Output {
    use std::process::Stdio;

    use support::processes::{free_addr, operator_command};

    let mut child = operator_command(ns, free_addr(), free_addr(), free_addr(), 1)
        .args(["--webhook-addr", &free_addr().to_string()])
        .args(["--webhook-name", &format!("weft-{ns}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            panic!(
                "the operator kept running; its last lines:\n{}",
                lines[lines.len().saturating_sub(10)..].join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn the_operator_refuses_to_start_with_injection_settings_nobody_chose() {
    use weft_operator::inject::settings;

    let client = shared::client().await.unwrap();
    let ns = shared::namespace(&client, "weft-op-bad").await.unwrap();
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": settings::CONFIG_MAP},
        "data": {"proxyImg": "typo/p:1"}
    }))
    .unwrap();
    configmaps
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking({
        let ns = ns.clone();
        move || operator_exit(&ns)
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("unknown setting \"proxyImg\""),
        "{stderr}"
    );

    // A trust domain other than the CA's would give proxies identities nobody issues.
    let other = json!({"data": {"proxyImg": null, settings::TRUST_DOMAIN: "other.example"}});
    configmaps
        .patch(
            settings::CONFIG_MAP,
            &PatchParams::default(),
            &Patch::Merge(&other),
        )
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || operator_exit(&ns))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("differs from --trust-domain"),
        "{stderr}"
    );
}

/// A serving-certificate lifetime too short to renew sanely (renewal at two thirds of
/// `0s` is a loop issuing keys without pause) is refused at start-up, before any port is
/// bound or the API server is called.
#[test]
fn the_operator_refuses_a_webhook_certificate_lifetime_under_a_minute() {
    let bin = std::env::var_os("WEFT_TEST_OPERATOR_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_weft-operator").into());
    for lifetime in ["0s", "59s"] {
        let out = std::process::Command::new(&bin)
            // No cluster: without the check the operator fails later, for another reason.
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .args(["--webhook-cert-lifetime", lifetime])
            .args(["--push-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args([
                "--webhook-addr",
                "127.0.0.1:0",
                "--identity-addr",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("--webhook-cert-lifetime must be at least 1m"),
            "{lifetime}: {stderr}"
        );
    }
}

/// A webhook (failure policy Fail) whose CA lives in Secret `weft-ca` of the test's own
/// namespace, so that replacing or deleting it touches no other test's webhook.
async fn injecting_with_own_ca(prefix: &str) -> Injecting {
    let client = shared::client().await.unwrap();
    let ns = scoped_namespace(&client, prefix, None).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut settings = settings(&ns, port, FailurePolicy::Fail);
    settings.ca_namespace = ns.clone();
    let hook = spawn_webhook(&client, settings, listener);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let t = Injecting {
        client,
        ns,
        hook,
        port,
        pods,
    };
    eventually(Duration::from_secs(30), || t.admitted("probe"))
        .await
        .unwrap();
    t
}

/// Runs a webhook with `settings` on `listener`, as one replica of the operator does, until
/// stopped.
fn spawn_webhook(
    client: &Client,
    settings: weft_operator::webhook::WebhookSettings,
    listener: tokio::net::TcpListener,
) -> Webhook {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = WebhookMetrics::default();
    let task = tokio::spawn({
        let (client, metrics) = (client.clone(), metrics.clone());
        async move {
            weft_operator::webhook::run_with(client, settings, None, listener, metrics, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        }
    });
    Webhook {
        stop: Some(stop),
        task,
        metrics,
    }
}

impl Injecting {
    /// Dry-runs an opted-in pod `name`: admitted by the API server only through the webhook
    /// (failure policy Fail), so only when it trusts the certificate the webhook serves.
    async fn admitted(&self, name: &str) -> anyhow::Result<()> {
        let created = self
            .pods
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &pod(name, json!({"weft.dev/inject": "enabled"})),
            )
            .await?;
        ensure!(has_proxy(&created), "not injected");
        Ok(())
    }

    /// As [`Injecting::admitted`], within 15 s (the API server reads a new bundle a moment
    /// after it is written).
    async fn admits(&self, name: &str) {
        eventually(Duration::from_secs(15), || self.admitted(name))
            .await
            .unwrap();
    }

    /// The CA Secret of a webhook from [`injecting_with_own_ca`].
    fn ca_secrets(&self) -> Api<k8s_openapi::api::core::v1::Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// The certificate (PEM) in the CA Secret.
    async fn secret_ca(&self) -> anyhow::Result<String> {
        let secret = self.ca_secrets().get("weft-ca").await?;
        let data = secret.data.unwrap_or_default();
        let pem = data.get("tls.crt").ok_or_else(|| anyhow!("no tls.crt"))?;
        Ok(String::from_utf8(pem.0.clone())?)
    }

    /// Puts `cert` and `key` (PEM) into the CA Secret, as a user replacing the CA does.
    async fn put_ca(&self, cert: &str, key: &str) {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let patch = json!({"data": {"tls.crt": b64(cert), "tls.key": b64(key)}});
        self.ca_secrets()
            .patch("weft-ca", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// The registration's bundle of each of its webhooks.
    async fn bundles(&self) -> anyhow::Result<Vec<String>> {
        use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
        let name = format!("weft-injector-{}", self.ns);
        let live = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .get(&name)
            .await?;
        Ok(live
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| {
                String::from_utf8_lossy(&w.client_config.ca_bundle.unwrap_or_default().0)
                    .into_owned()
            })
            .collect())
    }
}

/// A TLS connection to the webhook on `port` trusting `ca_pem` alone: it succeeds only when
/// the webhook serves a certificate chaining to that CA.
async fn connect_trusting(
    port: u16,
    ca_pem: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    Ok(connector
        .connect(ServerName::try_from("127.0.0.1")?, tcp)
        .await?)
}

/// The certificate a fresh connection gets, verified against `ca_pem`.
async fn served_by(port: u16, ca_pem: &str) -> anyhow::Result<Vec<u8>> {
    let tls = connect_trusting(port, ca_pem).await?;
    let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
    Ok(certs.first().map(|c| c.to_vec()).unwrap_or_default())
}

/// An HTTP/1.1 client kept open over `tls`, to send several requests on one connection.
async fn http1_over(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// The status of a GET of `/metrics` on `sender`'s connection.
async fn status_on(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) -> anyhow::Result<http::StatusCode> {
    Ok(metrics_on(sender).await?.0)
}

/// The status and body of a GET of `/metrics` on `sender`'s connection.
async fn metrics_on(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) -> anyhow::Result<(http::StatusCode, String)> {
    use http_body_util::BodyExt as _;
    sender.ready().await?;
    let req = http::Request::get("/metrics")
        .header(http::header::HOST, "127.0.0.1")
        .body(http_body_util::Empty::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    // Read to the end, so that the connection is free for the next request.
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The bundle of `pems` in this order, as the operator writes it (one newline after each).
fn bundle_of(pems: &[&str]) -> String {
    pems.iter().map(|p| format!("{}\n", p.trim_end())).collect()
}

/// A CA certificate and key (PEM) valid from `from` to `to` around now.
fn ca_valid(from: time::Duration, to: time::Duration) -> (String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + from;
    params.not_after = now + to;
    let key = KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

/// How long [`follows`] and [`all_follow`] wait for a change of CA to be followed.
const FOLLOW_WITHIN: Duration = Duration::from_secs(20);

/// Waits until the webhook serves from `ca_pem` and the registration trusts it, and
/// returns the bundles.
async fn follows(t: &Injecting, ca_pem: &str) -> Vec<String> {
    follows_within(t, ca_pem, FOLLOW_WITHIN).await
}

/// As [`follows`], within `timeout`.
async fn follows_within(t: &Injecting, ca_pem: &str, timeout: Duration) -> Vec<String> {
    all_follow_within(t, &[t.port], ca_pem, timeout).await
}

/// Waits until the webhook on each of `ports` (replicas sharing `t`'s registration) serves
/// from `ca_pem` and the registration trusts it, and returns the bundles.
async fn all_follow(t: &Injecting, ports: &[u16], ca_pem: &str) -> Vec<String> {
    all_follow_within(t, ports, ca_pem, FOLLOW_WITHIN).await
}

/// As [`all_follow`], within `timeout`.
async fn all_follow_within(
    t: &Injecting,
    ports: &[u16],
    ca_pem: &str,
    timeout: Duration,
) -> Vec<String> {
    eventually(timeout, || async {
        for port in ports {
            served_by(*port, ca_pem)
                .await
                .map_err(|e| e.context(format!("the webhook on port {port}")))?;
        }
        let bundles = t.bundles().await?;
        ensure!(
            !bundles.is_empty() && bundles.iter().all(|b| b.contains(ca_pem.trim_end())),
            "the bundle does not trust the new CA yet"
        );
        Ok(bundles)
    })
    .await
    .unwrap()
}

/// Checks that each of `bundles` (one per webhook of the registration) is exactly `pems`,
/// in this order, as the operator writes them; `when` names the moment in a failure.
#[track_caller]
fn assert_bundles(bundles: &[String], pems: &[&str], when: &str) {
    assert!(
        !bundles.is_empty(),
        "{when}: the registration has no webhooks"
    );
    for bundle in bundles {
        assert_eq!(
            bundle,
            &bundle_of(pems),
            "{when}: the bundle is not the {} certificate(s) expected, in order",
            pems.len()
        );
    }
}

/// A user replaces the CA in its Secret: the running webhook serves a certificate from the
/// new CA within seconds, without a restart, and the registration trusts both CAs (a
/// replica that has not switched yet still verifies). A connection opened before the
/// switch is not dropped, and the API server (failure policy Fail) still calls the webhook.
#[tokio::test]
async fn a_replaced_ca_is_served_from_and_trusted_without_a_restart() {
    let t = injecting_with_own_ca("ca-replace").await;
    let old_pem = t.secret_ca().await.unwrap();
    let mut before = http1_over(connect_trusting(t.port, &old_pem).await.unwrap()).await;
    assert_eq!(status_on(&mut before).await.unwrap(), 200);

    let (new, new_key) = weft_operator::ca::Ca::generate("a user's CA").unwrap();
    t.put_ca(new.cert_pem(), &new_key).await;
    // A request every 2 s on the connection opened before, while the webhook switches: the
    // server closes a connection idle for 10 s, and the switch may take longer under load.
    let bundles = {
        let followed = follows(&t, new.cert_pem());
        tokio::pin!(followed);
        loop {
            tokio::select! {
                bundles = &mut followed => break bundles,
                () = tokio::time::sleep(Duration::from_secs(2)) => assert_eq!(
                    status_on(&mut before).await.unwrap(),
                    200,
                    "the connection opened before the switch, during it"
                ),
            }
        }
    };
    assert_bundles(
        &bundles,
        &[new.cert_pem(), &old_pem],
        "the new CA, then the old one",
    );
    assert!(
        connect_trusting(t.port, &old_pem).await.is_err(),
        "a new connection still gets the old CA's certificate"
    );
    assert_eq!(
        status_on(&mut before).await.unwrap(),
        200,
        "the connection opened before the switch was dropped"
    );
    t.admits("after-replace").await;
    // Counted once, and served at /metrics.
    let mut after = http1_over(connect_trusting(t.port, new.cert_pem()).await.unwrap()).await;
    let (status, metrics) = metrics_on(&mut after).await.unwrap();
    assert_eq!(status, 200);
    for (result, n) in [("followed", 1), ("generated", 0), ("refused", 0)] {
        let line = format!("weft_webhook_ca_changes_total{{result=\"{result}\"}} {n}\n");
        assert!(
            metrics.contains(&line),
            "no `{}` in:\n{metrics}",
            line.trim_end()
        );
    }
    t.hook.stop().await;
}

/// The documented way out of an expired CA: delete the Secret. The running webhook
/// generates a new CA into a new Secret and serves from it, and the registration trusts
/// it, without a restart.
#[tokio::test]
async fn a_deleted_ca_secret_is_generated_again_and_served_from() {
    let t = injecting_with_own_ca("ca-delete").await;
    let old_pem = t.secret_ca().await.unwrap();
    t.ca_secrets()
        .delete("weft-ca", &Default::default())
        .await
        .unwrap();
    let new_pem = eventually(Duration::from_secs(20), || async {
        let pem = t.secret_ca().await?;
        ensure!(pem != old_pem, "still the old CA");
        Ok(pem)
    })
    .await
    .unwrap();
    assert_bundles(
        &follows(&t, &new_pem).await,
        &[&new_pem, &old_pem],
        "the generated CA, then the deleted one",
    );
    t.admits("after-delete").await;
    assert_eq!(t.hook.metrics.ca_changes(CaChange::Generated), 1);
    assert_eq!(t.hook.metrics.ca_changes(CaChange::Followed), 0);
    t.hook.stop().await;
}

/// A Secret that holds no usable CA (garbage, an expired CA, a key not the certificate's)
/// is refused: the webhook keeps serving from the CA it had. Each is followed by a usable
/// CA, and the watch handles the Secret's changes in order, so once the webhook serves
/// from that one the refusal has happened; the bundle it writes then (the new CA, then the
/// one served before it) shows the unusable one was never taken.
#[tokio::test]
async fn an_unusable_ca_secret_leaves_the_webhook_serving_as_before() {
    let t = injecting_with_own_ca("ca-garbage").await;
    let mut served_pem = t.secret_ca().await.unwrap();
    assert_bundles(&t.bundles().await.unwrap(), &[&served_pem], "at start");

    let expired = ca_valid(-time::Duration::days(2), -time::Duration::days(1));
    let (mismatched, _) = weft_operator::ca::Ca::generate("mismatched").unwrap();
    let (_, other_key) = weft_operator::ca::Ca::generate("another").unwrap();
    for (what, cert, key) in [
        ("garbage", "not a certificate", "not a key"),
        ("an expired CA", expired.0.as_str(), expired.1.as_str()),
        ("another key", mismatched.cert_pem(), other_key.as_str()),
    ] {
        t.put_ca(cert, key).await;
        let (next, next_key) = weft_operator::ca::Ca::generate("next").unwrap();
        t.put_ca(next.cert_pem(), &next_key).await;
        // The bundle after it is the next CA and the one served before.
        let bundles = follows(&t, next.cert_pem()).await;
        assert_bundles(&bundles, &[next.cert_pem(), &served_pem], what);
        t.admitted("after-refusal").await.unwrap();
        served_pem = next.cert_pem().to_owned();
    }
    // Each refused once, each CA after it followed once.
    assert_eq!(t.hook.metrics.ca_changes(CaChange::Refused), 3);
    assert_eq!(t.hook.metrics.ca_changes(CaChange::Followed), 3);
    t.hook.stop().await;
}

/// A new CA that is not valid yet on this node's clock (cert-manager does not backdate, and
/// a node's clock may lag the issuer's) is refused, then taken once it is valid, though the
/// Secret does not change again.
#[tokio::test]
async fn a_ca_not_valid_yet_is_followed_once_it_is() {
    let t = injecting_with_own_ca("ca-early").await;
    let old_pem = t.secret_ca().await.unwrap();
    // Valid 9 to 10 s from now (X.509 times are whole seconds): long enough that the
    // webhook reads it before, however loaded the machine.
    let lead = Duration::from_secs(10);
    let valid_at = std::time::Instant::now() + lead - Duration::from_secs(1);
    let early = ca_valid(
        time::Duration::try_from(lead).unwrap(),
        time::Duration::hours(1),
    );
    t.put_ca(&early.0, &early.1).await;
    // Refused while not valid yet, the webhook still serving from the old CA.
    eventually(lead / 2, || async {
        ensure!(
            t.hook.metrics.ca_changes(CaChange::Refused) == 1,
            "not refused yet"
        );
        Ok(())
    })
    .await
    .unwrap();
    assert!(
        std::time::Instant::now() < valid_at,
        "refused only once valid: the test proves nothing"
    );
    served_by(t.port, &old_pem)
        .await
        .expect("serving from the old CA while the new one is not valid yet");
    assert_eq!(t.hook.metrics.ca_changes(CaChange::Followed), 0);
    // Read again about a second after it starts, then a rotation (a second's settle).
    assert_bundles(
        &follows_within(&t, &early.0, lead + FOLLOW_WITHIN).await,
        &[&early.0, &old_pem],
        "once valid",
    );
    t.admits("after-early").await;
    // Refused once (not at each read until valid), then followed.
    assert_eq!(t.hook.metrics.ca_changes(CaChange::Refused), 1);
    assert_eq!(t.hook.metrics.ca_changes(CaChange::Followed), 1);
    t.hook.stop().await;
}

/// A CA replaced a week before it expires stays in the bundle beside its successor until
/// then, and leaves it when it expires, without another change of CA or a restart: else
/// `kubectl weft check` would find an expired certificate in the bundle. (Here the
/// replaced CA lasts seconds.)
#[tokio::test]
async fn the_previous_ca_leaves_the_bundle_when_it_expires() {
    let t = injecting_with_own_ca("ca-expiry").await;
    let first_pem = t.secret_ca().await.unwrap();
    let lifetime = Duration::from_secs(15);
    let short = ca_valid(
        -time::Duration::hours(1),
        time::Duration::try_from(lifetime).unwrap(),
    );
    let expires = std::time::Instant::now() + lifetime;
    t.put_ca(&short.0, &short.1).await;
    assert_bundles(
        &follows(&t, &short.0).await,
        &[&short.0, &first_pem],
        "the short-lived CA",
    );
    let (new, new_key) = weft_operator::ca::Ca::generate("successor").unwrap();
    t.put_ca(new.cert_pem(), &new_key).await;
    let bundles = follows(&t, new.cert_pem()).await;
    // Read before the short CA's end (with a margin for the read itself): it is still in.
    if std::time::Instant::now() + Duration::from_secs(2) < expires {
        assert_bundles(&bundles, &[new.cert_pem(), &short.0], "before it expires");
    }
    eventually(lifetime + Duration::from_secs(20), || async {
        let bundles = t.bundles().await?;
        ensure!(
            bundles.iter().all(|b| *b == bundle_of(&[new.cert_pem()])),
            "the expired CA is still in the bundle (certificates in each: {:?})",
            bundles
                .iter()
                .map(|b| b.matches("BEGIN CERTIFICATE").count())
                .collect::<Vec<_>>()
        );
        Ok(())
    })
    .await
    .unwrap();
    t.admitted("after-expiry").await.unwrap();
    t.hook.stop().await;
}

/// A GitOps sync that empties the bundle in the second between a rotation's write of the
/// bundle and the switch to the new CA: the repair writes the CA of then (the old one),
/// and the rotation then writes its bundle again, so the API server ends trusting the CA
/// served from.
#[tokio::test]
async fn a_bundle_emptied_during_a_rotation_ends_trusting_the_new_ca() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let t = injecting_with_own_ca("ca-empty-race").await;
    let old_pem = t.secret_ca().await.unwrap();
    let (new, new_key) = weft_operator::ca::Ca::generate("new").unwrap();
    t.put_ca(new.cert_pem(), &new_key).await;
    // The rotation's first write: from it, a second passes before the webhook switches.
    let mut seen = false;
    for _ in 0..2000 {
        let bundles = t.bundles().await.unwrap();
        if bundles
            .iter()
            .all(|b| b.contains(new.cert_pem().trim_end()))
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "the rotation never wrote the new CA into the bundle");
    let name = format!("weft-injector-{}", t.ns);
    let api = Api::<MutatingWebhookConfiguration>::all(t.client.clone());
    let ops: Vec<_> = (0..t.bundles().await.unwrap().len())
        .map(|i| json!({"op": "remove", "path": format!("/webhooks/{i}/clientConfig/caBundle")}))
        .collect();
    let patch: json_patch::Patch = serde_json::from_value(json!(ops)).unwrap();
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .unwrap();
    assert_bundles(
        &follows(&t, new.cert_pem()).await,
        &[new.cert_pem(), &old_pem],
        "after the race",
    );
    t.admits("after-race").await;
    t.hook.stop().await;
}

/// A TCP switch on loopback standing in for the webhook's Service in front of several
/// replicas: the registration's URL leads here, and each connection is relayed to the
/// replica chosen last. Choosing another closes the connections relayed so far, so that
/// the API server's next call opens one to the replica chosen. Stops when dropped.
struct Switch {
    port: u16,
    to: tokio::sync::watch::Sender<u16>,
    task: tokio::task::JoinHandle<()>,
}

impl Switch {
    /// A switch on a free loopback port, relaying nowhere until [`Switch::route_to`].
    async fn start() -> Switch {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (to, chosen) = tokio::sync::watch::channel(0u16);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut chosen = chosen.clone();
                let target = *chosen.borrow_and_update();
                // Ends with its connection, at the next choice, or when the switch drops.
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = chosen.changed() => {}
                    }
                });
            }
        });
        Switch { port, to, task }
    }

    /// Sends new connections to the webhook on `port`, and closes the others.
    fn route_to(&self, port: u16) {
        self.to.send_replace(port);
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks that the API server (failure policy Fail) admits pod `name` through the replica
/// `hook` on `port` alone: the switch sends it there, and that replica counts the injection.
async fn admits_through(t: &Injecting, switch: &Switch, hook: &Webhook, port: u16, name: &str) {
    switch.route_to(port);
    let before = hook.metrics.count("injected");
    eventually(Duration::from_secs(15), || async {
        t.admitted(name).await?;
        ensure!(
            hook.metrics.count("injected") > before,
            "admitted through another replica"
        );
        Ok(())
    })
    .await
    .unwrap();
}

/// What [`probing_while`] saw: per replica, the admissions it sent there that passed, and
/// every one that failed.
struct Probes {
    passed: [u64; 2],
    failed: Vec<String>,
}

/// Runs `work` while dry-running opted-in pods through the switch, sending each to the
/// other replica of `hooks` (on `ports`) than the one before, until `work` ends (and at
/// most 2000 of them): with failure policy Fail, any that the API server denies is a pod
/// that a real cluster would have failed to create. Checks that none failed, that each
/// replica answered some, and that each answered exactly those sent to it (so the switch
/// did send each where it was told); `when` names the moment in a failure.
async fn probing_while<T>(
    t: &Injecting,
    switch: &Switch,
    hooks: [&Webhook; 2],
    ports: [u16; 2],
    when: &str,
    work: impl std::future::Future<Output = T>,
) -> T {
    let done = std::cell::Cell::new(false);
    let injected = hooks.map(|h| h.metrics.count("injected"));
    let (out, probes) = tokio::join!(
        async {
            let out = work.await;
            done.set(true);
            out
        },
        async {
            let mut probes = Probes {
                passed: [0; 2],
                failed: Vec::new(),
            };
            for i in 0..2000 {
                if done.get() {
                    break;
                }
                let r = i % 2;
                switch.route_to(ports[r]);
                // The API server's idle connection to the replica before is closed by the
                // switch: a moment for it to see so before the next call.
                tokio::time::sleep(Duration::from_millis(50)).await;
                match t.admitted(&format!("probe-{i}")).await {
                    Ok(()) => probes.passed[r] += 1,
                    Err(e) => probes
                        .failed
                        .push(format!("probe {i} to replica {r}: {e:#}")),
                }
            }
            probes
        }
    );
    assert!(
        probes.failed.is_empty(),
        "{when}: {} of {} admissions failed, the first: {:#?}",
        probes.failed.len(),
        probes.failed.len() as u64 + probes.passed.iter().sum::<u64>(),
        &probes.failed[..probes.failed.len().min(3)]
    );
    for (r, hook) in hooks.into_iter().enumerate() {
        assert!(probes.passed[r] > 0, "{when}: nothing sent to replica {r}");
        assert_eq!(
            hook.metrics.count("injected") - injected[r],
            probes.passed[r],
            "{when}: replica {r} did not answer exactly the admissions sent to it"
        );
    }
    out
}

/// Two replicas, as the chart runs them: one CA Secret, one MutatingWebhookConfiguration,
/// and a URL that leads (as the Service would) to either replica. Both start at once (one
/// creates the Secret, the other reads it). A user replaces the CA: both end serving from
/// the new CA, the bundle holds the new CA then the old one, and the API server admits
/// through each. The Secret is deleted: both end on the one CA that was created first
/// (the Secret holds it still), the bundle holds it then the one before, and the API
/// server admits through each. Each replica counts each change once. From just before each
/// change until both replicas serve the new CA, the API server admits every pod sent to
/// either replica: no moment trusts only one of the CAs served.
#[tokio::test]
async fn two_replicas_sharing_a_ca_secret_end_on_the_same_ca_after_a_replacement_and_a_deletion() {
    let client = shared::client().await.unwrap();
    let ns = scoped_namespace(&client, "ca-replicas", None).await;
    let switch = Switch::start().await;
    let mut settings = settings(&ns, switch.port, FailurePolicy::Fail);
    settings.ca_namespace = ns.clone();
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let (first, second) = (bind().await.unwrap(), bind().await.unwrap());
    let ports = [
        first.local_addr().unwrap().port(),
        second.local_addr().unwrap().port(),
    ];
    switch.route_to(ports[0]);
    // `t` holds the first replica, `other` the second.
    let t = Injecting {
        hook: spawn_webhook(&client, settings.clone(), first),
        pods: Api::<Pod>::namespaced(client.clone(), &ns),
        client,
        ns,
        port: ports[0],
    };
    let other = spawn_webhook(&t.client, settings, second);
    let hooks = [&t.hook, &other];
    let created_pem = eventually(Duration::from_secs(30), || t.secret_ca())
        .await
        .unwrap();
    assert_bundles(
        &all_follow(&t, &ports, &created_pem).await,
        &[&created_pem],
        "at start",
    );
    for (i, (hook, port)) in hooks.into_iter().zip(ports).enumerate() {
        admits_through(&t, &switch, hook, port, &format!("start-{i}")).await;
    }

    let (replaced, replaced_key) = weft_operator::ca::Ca::generate("a user's CA").unwrap();
    let when = "during the replacement";
    let bundles = probing_while(&t, &switch, hooks, ports, when, async {
        t.put_ca(replaced.cert_pem(), &replaced_key).await;
        all_follow(&t, &ports, replaced.cert_pem()).await
    })
    .await;
    assert_bundles(
        &bundles,
        &[replaced.cert_pem(), &created_pem],
        "after the replacement: the new CA, then the old one",
    );
    for (i, (hook, port)) in hooks.into_iter().zip(ports).enumerate() {
        assert!(
            connect_trusting(port, &created_pem).await.is_err(),
            "replica {i} still serves from the replaced CA"
        );
        admits_through(&t, &switch, hook, port, &format!("replaced-{i}")).await;
        assert_eq!(
            hook.metrics.ca_changes(CaChange::Followed),
            1,
            "replica {i}"
        );
    }

    let (generated_pem, bundles) =
        probing_while(&t, &switch, hooks, ports, "during the deletion", async {
            t.ca_secrets()
                .delete("weft-ca", &Default::default())
                .await
                .unwrap();
            let generated_pem = eventually(Duration::from_secs(20), || async {
                let pem = t.secret_ca().await?;
                ensure!(pem != replaced.cert_pem(), "still the replaced CA");
                Ok(pem)
            })
            .await
            .unwrap();
            let bundles = all_follow(&t, &ports, &generated_pem).await;
            (generated_pem, bundles)
        })
        .await;
    assert_bundles(
        &bundles,
        &[&generated_pem, replaced.cert_pem()],
        "after the deletion: the generated CA, then the deleted one",
    );
    // Exact for each replica, the loser of the creation's race too: each watch sees the
    // deletion (only a watch made to relist after it, its resource version expired, would
    // see the new CA alone, counted `followed`), and a rotation to the created CA
    // that fails (both replicas patch the one registration) and succeeds from a later read
    // of the Secret still counts `generated`.
    for (i, (hook, port)) in hooks.into_iter().zip(ports).enumerate() {
        admits_through(&t, &switch, hook, port, &format!("generated-{i}")).await;
        assert_eq!(
            hook.metrics.ca_changes(CaChange::Generated),
            1,
            "replica {i}"
        );
        assert_eq!(
            hook.metrics.ca_changes(CaChange::Followed),
            1,
            "replica {i}"
        );
        assert_eq!(hook.metrics.ca_changes(CaChange::Refused), 0, "replica {i}");
    }
    assert_eq!(
        t.secret_ca().await.unwrap(),
        generated_pem,
        "a second CA replaced the one created first"
    );
    other.stop().await;
    t.hook.stop().await;
}
