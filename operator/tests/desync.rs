//! A watch desync against a real control plane: the operator's API server is stopped, the
//! cluster changes meanwhile through a second API server on the same etcd (as in an HA
//! control plane), and the first one comes back. The operator's watches break, resume or
//! re-list, and its index — and so the config it pushes — converges on what etcd holds,
//! deletions included.
//!
//! This test runs its own test bed: stopping the shared one's API server would break every
//! other test.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use anyhow::ensure;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use serde_json::json;
use support::mesh::*;
use tokio::net::TcpListener;
use weft_e2e::{TestBed, shared};

/// Watches back off up to 30 s between attempts (kube-runtime's default backoff), so
/// convergence after the API server returns may take that long.
const CONVERGE: Duration = Duration::from_secs(90);

/// A Service without a selector and an EndpointSlice for it, written by the test.
async fn service_with_endpoint(client: &Client, ns: &str, name: &str, ip: &str) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "weft-test"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
    }))
    .unwrap();
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &slice)
        .await
        .unwrap();
}

/// Runs `f` on a thread outside the runtime: the test bed's start and stop block.
fn blocking<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    tokio::task::block_in_place(|| std::thread::scope(|s| s.spawn(f).join().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_converges_after_the_api_server_restarts_and_changes_were_missed() {
    shared::init_tracing();
    let mut testbed = blocking(TestBed::start_attached).unwrap();
    let client = testbed.client().await.unwrap();
    shared::install_crds(&client).await.unwrap();
    let bed = Bed::with_client(client.clone(), "desync").await;
    let ns = bed.ns.clone();
    bed.service_account("client").await;
    service_with_endpoint(&client, &ns, "web", "198.18.240.70").await;
    service_with_endpoint(&client, &ns, "gone", "198.18.240.71").await;
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "3s"}]}),
    )
    .await;
    let pod = bed.pod("client", "client", "client", "198.18.240.72").await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let op = Operator::start(&bed, listener).await;
    let proxy = TestProxy::start(&bed, &addr, &pod, None).await;
    let (web, gone, new) = (
        format!("web.{ns}.80"),
        format!("gone.{ns}.80"),
        format!("new.{ns}.80"),
    );
    shared::eventually(WAIT, || async {
        let names: Vec<String> = proxy.services().into_iter().map(|s| s.0).collect();
        ensure!(
            names.contains(&web) && names.contains(&gone),
            "services {names:?}"
        );
        Ok(())
    })
    .await
    .unwrap();
    bed.route_programmed("web", 1).await;

    // The operator's API server goes away; the cluster changes through another one.
    blocking(|| testbed.stop_apiserver()).unwrap();
    let second = blocking(|| testbed.start_second_apiserver()).unwrap();
    let other = testbed.client_at(Some(&second)).await.unwrap();
    Api::<Service>::namespaced(other.clone(), &ns)
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    service_with_endpoint(&other, &ns, "new", "198.18.240.73").await;
    let route = Bed {
        client: other.clone(),
        ns: ns.clone(),
        node: bed.node.clone(),
    };
    route
        .route(
            "web",
            json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "9s"}]}),
        )
        .await;
    blocking(|| testbed.stop_second_apiserver()).unwrap();
    // The proxy keeps its config while the API server is away.
    assert!(proxy.services().iter().any(|s| s.0 == gone));
    blocking(|| testbed.start_apiserver()).unwrap();

    shared::eventually(CONVERGE, || async {
        let services = proxy.services();
        let names: Vec<&str> = services.iter().map(|s| s.0.as_str()).collect();
        ensure!(
            !names.contains(&gone.as_str()),
            "{gone} still there: {names:?}"
        );
        ensure!(names.contains(&new.as_str()), "no {new} yet: {names:?}");
        // Each kind re-lists on its own: the Service may be back before its endpoints.
        let new_endpoints = services
            .iter()
            .find(|s| s.0 == new)
            .map(|s| s.1.clone())
            .unwrap_or_default();
        ensure!(
            new_endpoints == ["198.18.240.73:8080"],
            "{new}: endpoints {new_endpoints:?}"
        );
        let timeout = services
            .iter()
            .find(|s| s.0 == web)
            .and_then(|s| s.2.clone());
        ensure!(timeout.as_deref() == Some("9s"), "web timeout {timeout:?}");
        Ok(())
    })
    .await
    .unwrap();
    bed.route_programmed("web", 1).await;

    // The watches did break (the convergence is not a watch that never noticed).
    let (status, metrics) = http_get(op.admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let errors: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("weft_operator_watch_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(errors > 0.0, "no watch error counted:\n{metrics}");

    op.stop().await;
    drop(proxy);
    bed.cleanup().await;
    blocking(move || drop(testbed));
}
