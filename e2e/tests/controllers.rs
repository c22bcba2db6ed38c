//! The test bed's controller manager does its job: a Deployment gets a ReplicaSet and
//! Pods, and a Service gets EndpointSlices once those Pods are bound to a Node and have
//! IPs. There is no kubelet yet, so the test plays scheduler and kubelet through the API:
//! it creates a Node object, binds the Pods and writes their status.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{anyhow, ensure};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{Binding, Node, ObjectReference, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use weft_e2e::shared::{self, eventually};

#[tokio::test]
async fn deployment_gets_pods_and_service_gets_endpoint_slices() {
    let client = shared::client().await.unwrap();
    let ns = shared::namespace(&client, "controllers").await.unwrap();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let replicasets = Api::<ReplicaSet>::namespaced(client.clone(), &ns);
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), &ns);

    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "weft.invalid/web:1", "ports": [{"containerPort": 8080, "name": "http"}]}]}
            }
        }
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();

    let rs = eventually(Duration::from_secs(30), || async {
        let list = replicasets.list(&ListParams::default()).await?;
        list.items
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no ReplicaSet yet"))
    })
    .await
    .unwrap();
    assert_eq!(
        rs.owner_references()[0].name,
        "web",
        "ReplicaSet owned by the Deployment"
    );

    let created = eventually(Duration::from_secs(30), || async {
        let list = pods.list(&ListParams::default().labels("app=web")).await?;
        ensure!(list.items.len() == 2, "{} pods so far", list.items.len());
        Ok(list.items)
    })
    .await
    .unwrap();

    // No endpoints for pods that are not running yet.
    let before = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap();
    let ready_before: usize = before.items.iter().map(|s| s.endpoints.len()).sum();
    assert_eq!(
        ready_before, 0,
        "endpoints before any pod has an IP: {before:?}"
    );

    // Play scheduler and kubelet: a Node, a binding per Pod, and a running status.
    let node_name = format!("node-{ns}");
    let node: Node = serde_json::from_value(json!({"metadata": {"name": node_name}})).unwrap();
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let mut ips = Vec::new();
    for (i, pod) in created.iter().enumerate() {
        let name = pod.name_any();
        let binding = Binding {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            target: ObjectReference {
                kind: Some("Node".into()),
                name: Some(node_name.clone()),
                ..Default::default()
            },
        };
        let _: serde_json::Value = pods
            .create_subresource("binding", &name, &PostParams::default(), &binding)
            .await
            .unwrap();
        // Documentation range (RFC 5737): the address is only data in the API, never dialled.
        let ip = format!("198.18.240.{}", 10 + i);
        let status = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
        }});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
        ips.push(ip);
    }

    let addresses = eventually(Duration::from_secs(30), || async {
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await?;
        let mut found: Vec<String> = list
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
            .flat_map(|e| e.addresses.clone())
            .collect();
        found.sort();
        ensure!(found.len() == 2, "ready endpoints so far: {found:?}");
        Ok(found)
    })
    .await
    .unwrap();
    assert_eq!(addresses, ips);

    let slice = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap()
        .items
        .remove(0);
    let port = &slice.ports.unwrap_or_default()[0];
    assert_eq!(port.port, Some(8080), "targetPort resolved by name");
    assert_eq!(port.name.as_deref(), Some("http"));

    Api::<Node>::all(client)
        .delete(&node_name, &Default::default())
        .await
        .unwrap();
}
