//! The control plane against the test bed's real API server: the operator watches a test
//! namespace, real weft-proxy config clients (in this process, on loopback) subscribe with
//! real projected ServiceAccount tokens checked by TokenReview, and the status written to
//! the real Routes is read back.
//!
//! There is no kubelet: the test creates a Node object, binds Pods to it and writes their
//! status, so the real EndpointSlice controller publishes their addresses.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use anyhow::{Context, anyhow, ensure};
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{Event, Node, Pod, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use weft_crds::Route;
use weft_e2e::shared::{self, eventually};
use weft_operator::{
    mesh::{self, Handles, Settings},
    push::Authenticator,
    status::lease::LeaseConfig,
};
use weft_proxy::{
    Proxy,
    control::{ControlClient, ControlConfig, ControlStatus},
    server::ListenerKind,
    shutdown::ListenerGroup,
};

const WAIT: Duration = Duration::from_secs(30);

struct Bed {
    client: Client,
    ns: String,
    node: String,
}

impl Bed {
    async fn new(prefix: &str) -> Bed {
        let client = shared::client().await.unwrap();
        shared::install_crds(&client).await.unwrap();
        let ns = shared::namespace(&client, prefix).await.unwrap();
        let node = format!("node-{ns}");
        let n: Node = serde_json::from_value(json!({"metadata": {"name": node}})).unwrap();
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &n)
            .await
            .unwrap();
        Bed { client, ns, node }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn service_account(&self, name: &str) {
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        self.api::<ServiceAccount>()
            .create(&PostParams::default(), &sa)
            .await
            .unwrap();
    }

    async fn service(&self, name: &str, app: &str) {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .unwrap();
        self.api::<Service>()
            .create(&PostParams::default(), &svc)
            .await
            .unwrap();
    }

    /// A meshed, running, ready pod with `ip` (a documentation address: only data).
    async fn pod(&self, name: &str, sa: &str, app: &str, ip: &str) -> Pod {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": app, "weft.dev/meshed": "true"}},
            "spec": {"serviceAccountName": sa, "nodeName": self.node,
                     "containers": [{"name": "app", "image": "weft.invalid/app:1", "ports": [{"containerPort": 8080}]}]}
        }))
        .unwrap();
        let pods = self.api::<Pod>();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
        }});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap()
    }

    /// A projected-style token for `pod`'s ServiceAccount, audience `weft`, bound to the pod.
    async fn token(&self, pod: &Pod) -> String {
        let sa = pod
            .spec
            .as_ref()
            .unwrap()
            .service_account_name
            .clone()
            .unwrap();
        let req: TokenRequest = serde_json::from_value(json!({
            "spec": {"audiences": ["weft"], "expirationSeconds": 3600,
                     "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.name_any(), "uid": pod.uid().unwrap()}}
        }))
        .unwrap();
        let out: TokenRequest = self
            .api::<ServiceAccount>()
            .create_subresource("token", &sa, &PostParams::default(), &req)
            .await
            .unwrap();
        out.status.unwrap().token
    }

    async fn route(&self, name: &str, spec: serde_json::Value) {
        let route: Route =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
        self.api::<Route>()
            .patch(
                name,
                &PatchParams::apply("weft-test").force(),
                &Patch::Apply(&route),
            )
            .await
            .unwrap();
    }

    /// Waits until the Route's condition `type_` matches and its `observedGeneration` is the
    /// Route's generation; returns the condition's message.
    async fn route_condition(&self, name: &str, type_: &str, status: &str) -> String {
        let routes = self.api::<Route>();
        let name = name.to_owned();
        eventually(WAIT, || {
            let routes = routes.clone();
            let name = name.clone();
            async move {
                let r = routes.get(&name).await?;
                let st = r.status.clone().unwrap_or_default();
                ensure!(
                    st.observed_generation == r.metadata.generation,
                    "observedGeneration {:?}, generation {:?}",
                    st.observed_generation,
                    r.metadata.generation
                );
                let c = st
                    .conditions
                    .0
                    .iter()
                    .find(|c| c.type_ == type_)
                    .ok_or_else(|| anyhow!("no {type_} condition in {st:?}"))?;
                ensure!(c.status == status, "{type_} is {}: {}", c.status, c.message);
                Ok(c.message.clone())
            }
        })
        .await
        .unwrap()
    }

    async fn cleanup(&self) {
        let _ = Api::<Node>::all(self.client.clone())
            .delete(&self.node, &DeleteParams::default())
            .await;
    }
}

struct Operator {
    handles: Handles,
    admin: std::net::SocketAddr,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Operator {
    async fn start(bed: &Bed, push: TcpListener) -> Operator {
        let stop = CancellationToken::new();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let settings = Settings {
            push,
            admin: Some(admin),
            trust_domain: "cluster.local".into(),
            auth: Authenticator::token_review(bed.client.clone(), vec!["weft".into()]),
            lease: Some(LeaseConfig {
                namespace: bed.ns.clone(),
                name: "weft-operator".into(),
                identity: format!("op-{:08x}", rand::random::<u32>()),
                duration: Duration::from_secs(6),
            }),
            namespace: Some(bed.ns.clone()),
        };
        let (handles, done) = mesh::run(bed.client.clone(), settings, stop.clone());
        Operator {
            handles,
            admin: admin_addr,
            stop,
            done,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.done)
            .await
            .expect("the operator stops within 10s")
            .unwrap();
    }
}

struct TestProxy {
    proxy: Arc<Proxy>,
    status: watch::Receiver<ControlStatus>,
    stop: CancellationToken,
    _token: tempfile::NamedTempFile,
}

impl TestProxy {
    async fn start(bed: &Bed, operator: &str, pod: &Pod, max_services: Option<usize>) -> Self {
        let token = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token.path(), bed.token(pod).await).unwrap();
        let proxy = Proxy::new();
        let mut config = ControlConfig::new(operator, format!("{}/{}", bed.ns, pod.name_any()));
        config.token_file = Some(token.path().to_owned());
        config.max_services = max_services;
        config.backoff_base = Duration::from_millis(50);
        config.backoff_max = Duration::from_millis(500);
        let client = ControlClient::new(config, proxy.store.clone());
        let status = client.status();
        let stop = CancellationToken::new();
        tokio::spawn(client.run(stop.clone()));
        TestProxy {
            proxy,
            status,
            stop,
            _token: token,
        }
    }

    /// Waits for the first version this proxy acknowledged. `Programmed=True` alone does not
    /// say the proxy is connected: with no connected proxy it reads "no connected proxy needs
    /// this Route".
    async fn acked(&self) -> u64 {
        let mut status = self.status.clone();
        let acked = tokio::time::timeout(WAIT, status.wait_for(|s| s.acked.is_some()))
            .await
            .expect("the proxy acknowledged a config in time")
            .expect("the config client is running")
            .acked;
        acked.unwrap()
    }

    /// The active config's services as (name, endpoint addresses, timeout).
    fn services(&self) -> Vec<(String, Vec<String>, Option<String>)> {
        self.proxy
            .store
            .load()
            .map(|s| {
                s.raw
                    .services
                    .iter()
                    .map(|svc| {
                        (
                            svc.name.clone(),
                            svc.endpoints.iter().map(|e| e.address.clone()).collect(),
                            svc.timeout.as_ref().map(|t| t.as_str().to_owned()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test]
async fn subscribers_get_their_config_and_a_route_change_is_programmed_everywhere() {
    let bed = Bed::new("push-route").await;
    let ns = bed.ns.clone();
    for sa in ["web", "client"] {
        bed.service_account(sa).await;
    }
    bed.service("web", "web").await;
    let _web0 = bed.pod("web-0", "web", "web", "192.0.2.10").await;
    let web1 = bed.pod("web-1", "web", "web", "192.0.2.11").await;
    let client_pod = bed.pod("client", "client", "client", "192.0.2.20").await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let op = Operator::start(&bed, listener).await;
    let client = TestProxy::start(&bed, &addr, &client_pod, None).await;
    let web = TestProxy::start(&bed, &addr, &web1, None).await;

    let web_svc = format!("web.{ns}.80");
    eventually(WAIT, || async {
        let services = client.services();
        let found = services
            .iter()
            .find(|(n, _, _)| *n == web_svc)
            .ok_or_else(|| anyhow!("no {web_svc} yet: {services:?}"))?;
        ensure!(
            found.1 == vec!["192.0.2.10:8080", "192.0.2.11:8080"],
            "endpoints {:?}",
            found.1
        );
        Ok(())
    })
    .await
    .unwrap();
    // Identities are the endpoint pods' ServiceAccounts.
    let snapshot = client.proxy.store.load().unwrap();
    let svc = snapshot
        .raw
        .services
        .iter()
        .find(|s| s.name == web_svc)
        .unwrap();
    assert!(
        svc.endpoints
            .iter()
            .all(|e| e.identity.as_deref()
                == Some(&*format!("spiffe://cluster.local/ns/{ns}/sa/web"))),
        "{svc:?}"
    );
    // The proxy's version is the operator's.
    assert_eq!(
        Some(snapshot.version.parse::<u64>().unwrap()),
        client.status.borrow().acked
    );

    // A Route with a backend that does not exist yet.
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web", "weight": 90}, {"name": "web-v2", "weight": 10}]}]}),
    )
    .await;
    let msg = bed.route_condition("web", "ResolvedRefs", "False").await;
    assert!(
        msg.contains(&format!("Service {ns}/web-v2 not found")),
        "{msg}"
    );
    bed.route_condition("web", "Accepted", "True").await;
    // The reason is on an Event too.
    eventually(WAIT, || async {
        let events = bed.api::<Event>().list(&ListParams::default()).await?;
        ensure!(
            events
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("BackendNotFound")
                    && e.involved_object.name.as_deref() == Some("web")),
            "no BackendNotFound event yet"
        );
        Ok(())
    })
    .await
    .unwrap();

    bed.service("web-v2", "web-v2").await;
    bed.route_condition("web", "ResolvedRefs", "True").await;

    // Change the Route: every proxy that needs it acknowledges the new generation.
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "5s"}]}),
    )
    .await;
    let msg = bed.route_condition("web", "Programmed", "True").await;
    assert!(msg.contains("acknowledged by 2 of 2 proxies"), "{msg}");
    let services = client.services();
    let web_cfg = services.iter().find(|(n, _, _)| *n == web_svc).unwrap();
    assert_eq!(
        web_cfg.2.as_deref(),
        Some("5s"),
        "the Route's timeout reached the proxy"
    );
    assert!(web.status.borrow().acked.is_some());

    // The operator reports both proxies in sync.
    let rows = mesh::proxy_rows(&op.handles);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.connected), "{rows:?}");

    // The admin endpoints: health, readiness (the index is synced), metrics, proxies.
    assert_eq!(http_get(op.admin, "/healthz").await.0, 200);
    assert_eq!(http_get(op.admin, "/readyz").await.0, 200);
    let (status, metrics) = http_get(op.admin, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "weft_operator_subscribers 2",
        "weft_operator_index_objects{kind=\"Pod\"} 3",
        "weft_operator_index_objects{kind=\"Route\"} 1",
        "weft_operator_updates_pushed_total",
        "weft_operator_push_bytes_total",
        "weft_operator_nacks_total 0",
        "weft_operator_change_to_ack_seconds_count",
    ] {
        assert!(metrics.contains(needle), "no {needle:?} in\n{metrics}");
    }
    let (_, proxies) = http_get(op.admin, "/proxies").await;
    let proxies: serde_json::Value = serde_json::from_str(&proxies).unwrap();
    assert_eq!(proxies.as_array().unwrap().len(), 2, "{proxies}");
    assert!(
        proxies
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["inSync"] == true),
        "{proxies}"
    );

    op.stop().await;
    bed.cleanup().await;
}

#[tokio::test]
async fn two_conflicting_routes_are_both_told_and_the_older_wins() {
    let bed = Bed::new("push-conflict").await;
    bed.service("web", "web").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let op = Operator::start(&bed, listener).await;
    bed.route(
        "first",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}]}]}),
    )
    .await;
    // Creation timestamps have one-second resolution: make "first" clearly older.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    bed.route(
        "second",
        json!({"service": {"name": "web", "port": 80}, "rules": [{"backends": [{"name": "web"}]}]}),
    )
    .await;
    let loser = bed.route_condition("second", "Accepted", "False").await;
    assert!(loser.contains("Route first"), "{loser}");
    let winner = bed.route_condition("first", "Accepted", "True").await;
    assert!(winner.contains("second"), "{winner}");
    let routes = bed.api::<Route>();
    let second = routes.get("second").await.unwrap();
    let reason = second
        .status
        .unwrap()
        .conditions
        .0
        .into_iter()
        .find(|c| c.type_ == "Accepted")
        .unwrap()
        .reason;
    assert_eq!(reason, "Conflicted");

    // Once the winner is gone, the other Route is accepted.
    routes
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    bed.route_condition("second", "Accepted", "True").await;
    op.stop().await;
    bed.cleanup().await;
}

#[tokio::test]
async fn a_rejected_config_shows_in_status_and_the_proxy_keeps_its_last_good_version() {
    let bed = Bed::new("push-nack").await;
    let ns = bed.ns.clone();
    bed.service_account("client").await;
    bed.service("web", "web").await;
    let pod = bed.pod("client", "client", "client", "192.0.2.30").await;
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}]}]}),
    )
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let op = Operator::start(&bed, listener).await;
    // This proxy accepts one service at most.
    let proxy = TestProxy::start(&bed, &addr, &pod, Some(1)).await;
    let good = proxy.acked().await;
    let msg = bed.route_condition("web", "Programmed", "True").await;
    assert!(msg.contains("acknowledged by 1 of 1"), "{msg}");

    // A second Service and a new Route generation: the config now has two services.
    bed.service("api", "api").await;
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "2s"}]}),
    )
    .await;
    let msg = bed.route_condition("web", "Programmed", "False").await;
    assert!(msg.contains(&format!("{ns}/client")), "{msg}");
    assert!(msg.contains("at most 1"), "{msg}");
    let routes = bed.api::<Route>();
    let programmed = routes
        .get("web")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions
        .0
        .into_iter()
        .find(|c| c.type_ == "Programmed")
        .unwrap();
    assert_eq!(programmed.reason, "Rejected");
    // The proxy still runs its last good version.
    let active = proxy.proxy.store.load().unwrap();
    assert_eq!(active.version, good.to_string());
    assert_eq!(active.raw.services.len(), 1);
    let rows = mesh::proxy_rows(&op.handles);
    assert!(!rows[0].in_sync && rows[0].rejected.is_some(), "{rows:?}");

    // Remove the extra Service: the next version fits and is acknowledged.
    bed.api::<Service>()
        .delete("api", &DeleteParams::default())
        .await
        .unwrap();
    bed.route_condition("web", "Programmed", "True").await;
    assert_eq!(proxy.services()[0].2.as_deref(), Some("2s"));
    op.stop().await;
    bed.cleanup().await;
}

#[tokio::test]
async fn a_subscriber_with_a_token_for_another_service_account_is_refused() {
    let bed = Bed::new("push-auth").await;
    for sa in ["a", "b"] {
        bed.service_account(sa).await;
    }
    let pod_a = bed.pod("pod-a", "a", "a", "192.0.2.40").await;
    let pod_b = bed.pod("pod-b", "b", "b", "192.0.2.41").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let op = Operator::start(&bed, listener).await;
    // Pod a presents pod b's token.
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), bed.token(&pod_b).await).unwrap();
    let proxy = Proxy::new();
    let mut config = ControlConfig::new(&addr, format!("{}/{}", bed.ns, pod_a.name_any()));
    config.token_file = Some(token.path().to_owned());
    let client = ControlClient::new(config, proxy.store.clone());
    let status = client.status();
    let stop = CancellationToken::new();
    tokio::spawn(client.run(stop.clone()));
    // The genuine pod b gets its config meanwhile.
    let b = TestProxy::start(&bed, &addr, &pod_b, None).await;
    eventually(WAIT, || async {
        ensure!(b.status.borrow().acked.is_some(), "pod b has no config yet");
        Ok(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(status.borrow().connects, 0, "pod a was never subscribed");
    assert!(proxy.store.load().is_none(), "pod a got no config");
    stop.cancel();
    op.stop().await;
    bed.cleanup().await;
}

/// This host's own non-loopback IPv4 address (EndpointSlices may not hold loopback
/// addresses): the source address of the default route. A UDP connect sends nothing.
/// A test host: a network namespace joined to this one by a veth pair, with addresses
/// only the two ends know (10.251.<n>.1 here, .2 there). The API server refuses loopback
/// addresses in EndpointSlices, so the backend lives on this host instead of 127.0.0.1;
/// traffic never leaves the machine. Removed on drop.
struct TestHost {
    name: String,
    addr: std::net::Ipv4Addr,
}

impl TestHost {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = (std::process::id() % 200) as u8;
        let name = format!("weftpush{}-{n}", std::process::id());
        let (here, there) = (format!("wph{id}x{n}"), format!("wpt{id}x{n}"));
        let subnet = format!("10.251.{}", id + n as u8);
        let run = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("running ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        run(&["netns", "add", &name]);
        let host = TestHost {
            name: name.clone(),
            addr: format!("{subnet}.2").parse().unwrap(),
        };
        run(&["link", "add", &here, "type", "veth", "peer", "name", &there]);
        run(&["link", "set", &there, "netns", &name]);
        run(&["addr", "add", &format!("{subnet}.1/30"), "dev", &here]);
        run(&["link", "set", &here, "up"]);
        run(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{subnet}.2/30"),
            "dev",
            &there,
        ]);
        run(&["netns", "exec", &name, "ip", "link", "set", &there, "up"]);
        run(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        host
    }

    /// A listener bound inside the test host, served by this process's runtime.
    fn listen(&self) -> std::net::TcpListener {
        let path = format!("/var/run/netns/{}", self.name);
        let addr = self.addr;
        // Only this short-lived thread enters the namespace; a socket stays in the
        // namespace it was created in after the thread is gone.
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&path).expect("opening the test host's namespace");
            #[allow(unsafe_code)]
            // SAFETY: setns on this thread only, with a valid namespace fd it owns.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let l = std::net::TcpListener::bind((addr, 0)).expect("binding in the test host");
            l.set_nonblocking(true).unwrap();
            l
        })
        .join()
        .unwrap()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Deleting the namespace removes its veth end, and with it the peer here.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A plain HTTP/1.1 backend answering 200 `hello` to every request, on a test host.
async fn backend() -> (std::net::SocketAddr, TestHost) {
    let host = TestHost::new();
    let l = TcpListener::from_std(host.listen()).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
                    )
                    .await;
            });
        }
    });
    (addr, host)
}

/// A GET over HTTP/1.1: (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: op\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn get(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .context("response timed out")??;
    let text = String::from_utf8_lossy(&out);
    ensure!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("hello"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn proxies_keep_serving_while_the_operator_restarts_and_then_resync() {
    let bed = Bed::new("push-restart").await;
    let ns = bed.ns.clone();
    bed.service_account("client").await;
    let (backend, _host) = backend().await;
    // A Service without a selector and its EndpointSlice, written by the test: the backend
    // is a real server on loopback.
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    bed.api::<Service>()
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "weft-test"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": backend.port()}],
        "endpoints": [{"addresses": [backend.ip().to_string()], "conditions": {"ready": true}}],
    }))
    .unwrap();
    bed.api::<EndpointSlice>()
        .create(&PostParams::default(), &slice)
        .await
        .unwrap();
    let pod = bed.pod("client", "client", "client", "192.0.2.50").await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let push_addr = listener.local_addr().unwrap();
    let op = Operator::start(&bed, listener).await;
    let proxy = TestProxy::start(&bed, &push_addr.to_string(), &pod, None).await;
    let web = format!("web.{ns}.80");
    let forward = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forward_addr = forward.local_addr().unwrap();
    let mut group = ListenerGroup::new();
    group.spawn(
        forward,
        ListenerKind::Forward(Arc::from(web.as_str())),
        proxy.proxy.clone(),
    );
    eventually(WAIT, || async { get(forward_addr).await })
        .await
        .unwrap();

    // Traffic flows continuously while the operator goes away and comes back.
    let traffic_stop = CancellationToken::new();
    let traffic = tokio::spawn({
        let stop = traffic_stop.clone();
        async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.is_cancelled() {
                match get(forward_addr).await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(format!("{e:#}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failed)
        }
    });
    let first_version = proxy.acked().await;
    op.stop().await;
    eventually(WAIT, || async {
        ensure!(!proxy.status.borrow().connected, "still connected");
        Ok(())
    })
    .await
    .unwrap();
    // The operator is away for a while; the proxy keeps its config.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(proxy.status.borrow().acked, Some(first_version));

    // A change made while the operator is down reaches the proxy after the restart: the
    // resync is a full snapshot.
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "7s"}]}),
    )
    .await;
    let listener = TcpListener::bind(push_addr).await.unwrap();
    let op = Operator::start(&bed, listener).await;
    eventually(WAIT, || async {
        let s = proxy.status.borrow().clone();
        ensure!(s.connects >= 2 && s.connected, "not resubscribed: {s:?}");
        let services = proxy.services();
        ensure!(
            services
                .iter()
                .any(|(n, _, t)| *n == web && t.as_deref() == Some("7s")),
            "no resync yet: {services:?}"
        );
        Ok(())
    })
    .await
    .unwrap();
    bed.route_condition("web", "Programmed", "True").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    traffic_stop.cancel();
    let (ok, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 50, "only {ok} requests were made");
    group.stop().await;
    op.stop().await;
    bed.cleanup().await;
}
