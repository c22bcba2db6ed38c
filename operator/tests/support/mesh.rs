//! The control plane's test rig against the test bed's real API server: a namespace with a
//! Node ([`Bed`]), the operator in this process ([`Operator`]), weft-proxy config clients
//! ([`TestProxy`]), and a backend on a test host in a network namespace ([`TestHost`]).
//!
//! There is no kubelet: the rig creates a Node object, binds Pods to it and writes their
//! status, so the real EndpointSlice controller publishes their addresses.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, anyhow, ensure};
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{Node, Pod, Service, ServiceAccount},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
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
};

pub const WAIT: Duration = Duration::from_secs(30);

pub struct Bed {
    pub client: Client,
    pub ns: String,
    pub node: String,
}

impl Bed {
    /// A namespace and a Node on the shared test bed.
    pub async fn new(prefix: &str) -> Bed {
        Bed::with_client(shared::client().await.unwrap(), prefix).await
    }

    /// A namespace and a Node on the API server `client` talks to.
    pub async fn with_client(client: Client, prefix: &str) -> Bed {
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

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn service_account(&self, name: &str) {
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        self.api::<ServiceAccount>()
            .create(&PostParams::default(), &sa)
            .await
            .unwrap();
    }

    pub async fn service(&self, name: &str, app: &str) {
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
    pub async fn pod(&self, name: &str, sa: &str, app: &str, ip: &str) -> Pod {
        // No declared port: one would put the pod in its namespace's `pods.<ns>` config
        // (meshed pods no Service lists), which the tests here do not count on.
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": app, "weft.dev/meshed": "true"}},
            "spec": {"serviceAccountName": sa, "nodeName": self.node,
                     "containers": [{"name": "app", "image": "weft.invalid/app:1"}]}
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
    pub async fn token(&self, pod: &Pod) -> String {
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

    pub async fn route(&self, name: &str, spec: serde_json::Value) {
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
    pub async fn route_condition(&self, name: &str, type_: &str, status: &str) -> String {
        self.route_condition_where(name, type_, status, |_| true)
            .await
    }

    /// Waits until the Route's current generation is `Programmed` on `n` of `n` proxies:
    /// acknowledged, and reported enforced, by each.
    pub async fn route_programmed(&self, name: &str, n: usize) -> String {
        let want = format!("acknowledged by {n} of {n} proxies, and enforced by all");
        self.route_condition_where(name, "Programmed", "True", |m| m.contains(&want))
            .await
    }

    /// As [`Bed::route_condition`], also waiting until `accept` takes the message.
    pub async fn route_condition_where(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        accept: impl Fn(&str) -> bool,
    ) -> String {
        let routes = self.api::<Route>();
        let name = name.to_owned();
        let accept = &accept;
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
                ensure!(accept(&c.message), "{type_} message: {}", c.message);
                Ok(c.message.clone())
            }
        })
        .await
        .unwrap()
    }

    /// Server-side applies the example `examples/<file>` in the bed's namespace; returns
    /// its name.
    pub async fn apply_example<K>(&self, file: &str) -> String
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
    {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let object: K = serde_yaml::from_str(&text).unwrap();
        let name = object.meta().name.clone().unwrap();
        self.api::<K>()
            .patch(
                &name,
                &PatchParams::apply("weft-test").force(),
                &Patch::Apply(&object),
            )
            .await
            .unwrap();
        name
    }

    /// Waits until the `K` named `name` has condition `type_` at `status` for its current
    /// generation; returns the condition's reason and message.
    pub async fn condition<K>(&self, name: &str, type_: &str, status: &str) -> (String, String)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
    {
        let api = self.api::<K>();
        eventually(WAIT, || {
            let api = api.clone();
            async move {
                let object = serde_json::to_value(api.get(name).await?)?;
                let generation = &object["metadata"]["generation"];
                let observed = &object["status"]["observedGeneration"];
                ensure!(
                    observed == generation,
                    "observedGeneration {observed}, generation {generation}"
                );
                let c = object["status"]["conditions"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
                    .ok_or_else(|| anyhow!("no {type_} condition in {}", object["status"]))?;
                ensure!(c["status"] == status, "{type_}: {c}");
                let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                Ok((text("reason"), text("message")))
            }
        })
        .await
        .unwrap()
    }

    pub async fn cleanup(&self) {
        let _ = Api::<Node>::all(self.client.clone())
            .delete(&self.node, &DeleteParams::default())
            .await;
    }
}

/// The DNS name of the test push server's certificate.
pub const PUSH_SERVER_NAME: &str = "weft-operator.push.test";

/// A mesh root generated for one test, and the push server TLS that an operator with
/// identity serves with it (a serving certificate from that root, as `weft-operator` issues).
pub struct PushTls {
    /// The operator's side ([`Settings::push_tls`]).
    pub server: Arc<rustls::ServerConfig>,
    /// The root's PEM, as proxies are given it.
    pub root_pem: String,
}

impl PushTls {
    pub fn generate() -> PushTls {
        let (ca, _) = weft_operator::identity::IdentityCa::generate().unwrap();
        let serving = weft_operator::identity::ServingSettings {
            dns_names: vec![PUSH_SERVER_NAME.to_owned()],
            lifetime: Duration::from_secs(3600),
        };
        let certs = weft_operator::identity::serving_store(&ca, &serving).unwrap();
        PushTls {
            server: weft_operator::identity::push_tls(&certs),
            root_pem: ca.trust_bundle().to_owned(),
        }
    }

    /// A proxy's side: verifying the operator against this root for `server_name`.
    pub fn client(&self, server_name: &str) -> weft_proxy::control::OperatorTls {
        let roots = weft_proxy::identity::client::IdentityClientConfig::parse_trust_roots(
            self.root_pem.as_bytes(),
            std::path::Path::new("test root"),
        )
        .unwrap();
        weft_proxy::control::OperatorTls::new(
            roots,
            rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap(),
        )
        .unwrap()
    }
}

/// The in-process operator's settings as `weft-operator` defaults them, pushing on `push`:
/// no TLS, no admin endpoint, no Lease, the whole cluster watched.
pub fn operator_settings(client: &Client, push: TcpListener) -> Settings {
    Settings {
        push,
        push_tls: None,
        admin: None,
        trust_domain: "cluster.local".into(),
        mesh_mtls: Default::default(),
        auth: Authenticator::token_review(client.clone(), vec!["weft".into()]),
        push_ack_timeout: weft_operator::push::DEFAULT_ACK_TIMEOUT,
        lease: None,
        namespace: None,
    }
}

pub struct Operator {
    pub handles: Handles,
    pub admin: std::net::SocketAddr,
    pub stop: CancellationToken,
    pub done: tokio::task::JoinHandle<()>,
}

impl Operator {
    pub async fn start(bed: &Bed, push: TcpListener) -> Operator {
        Operator::start_as(bed, push, &format!("op-{:08x}", rand::random::<u32>())).await
    }

    /// An operator replica with Lease identity `identity`.
    pub async fn start_as(bed: &Bed, push: TcpListener, identity: &str) -> Operator {
        Operator::start_with(bed, push, identity, |_| {}).await
    }

    /// As [`Operator::start_as`], with `configure` changing the settings first.
    pub async fn start_with(
        bed: &Bed,
        push: TcpListener,
        identity: &str,
        configure: impl FnOnce(&mut Settings),
    ) -> Operator {
        let stop = CancellationToken::new();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let mut settings = Settings {
            admin: Some(admin),
            lease: Some(LeaseConfig::new(
                bed.ns.clone(),
                "weft-operator".into(),
                identity.to_owned(),
                Duration::from_secs(6),
            )),
            namespace: Some(bed.ns.clone()),
            ..operator_settings(&bed.client, push)
        };
        configure(&mut settings);
        let (handles, done) = mesh::run(bed.client.clone(), settings, stop.clone());
        Operator {
            handles,
            admin: admin_addr,
            stop,
            done,
        }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.done)
            .await
            .expect("the operator stops within 10s")
            .unwrap();
    }
}

pub struct TestProxy {
    pub proxy: Arc<Proxy>,
    pub status: watch::Receiver<ControlStatus>,
    pub stop: CancellationToken,
    pub _token: tempfile::NamedTempFile,
}

impl TestProxy {
    pub async fn start(bed: &Bed, operator: &str, pod: &Pod, max_services: Option<usize>) -> Self {
        Self::start_tls(bed, operator, pod, max_services, None).await
    }

    /// As [`TestProxy::start`], subscribing over TLS when `tls` is given.
    pub async fn start_tls(
        bed: &Bed,
        operator: &str,
        pod: &Pod,
        max_services: Option<usize>,
        tls: Option<weft_proxy::control::OperatorTls>,
    ) -> Self {
        let token = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token.path(), bed.token(pod).await).unwrap();
        let proxy = Proxy::new();
        let mut config = ControlConfig::new(operator, format!("{}/{}", bed.ns, pod.name_any()));
        config.token_file = Some(token.path().to_owned());
        config.max_services = max_services;
        config.backoff_base = Duration::from_millis(50);
        config.backoff_max = Duration::from_millis(500);
        config.tls = tls;
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

    /// Waits for the first version this proxy acknowledged (`Programmed` counts connected
    /// proxies only: before this one connects, it does not wait for it).
    pub async fn acked(&self) -> u64 {
        let mut status = self.status.clone();
        let acked = tokio::time::timeout(WAIT, status.wait_for(|s| s.acked.is_some()))
            .await
            .expect("the proxy acknowledged a config in time")
            .expect("the config client is running")
            .acked;
        acked.unwrap()
    }

    /// The active config's services as (name, endpoint addresses, timeout): the timeout of
    /// the service's Route's last compiled rule (the catch-all, which every request no
    /// other rule matches reaches), or the service's own.
    pub fn services(&self) -> Vec<(String, Vec<String>, Option<String>)> {
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
                            svc.route
                                .as_ref()
                                .and_then(|r| r.rules.last())
                                .and_then(|r| r.timeout.as_ref())
                                .or(svc.timeout.as_ref())
                                .map(|t| t.as_str().to_owned()),
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

/// A test host: a network namespace joined to this one by a veth pair, with addresses
/// only the two ends know (10.251.<n>.1 here, .2 there). The API server refuses loopback
/// addresses in EndpointSlices, so the backend lives on this host instead of 127.0.0.1;
/// traffic never leaves the machine. Removed on drop.
pub struct TestHost {
    pub name: String,
    pub addr: std::net::Ipv4Addr,
}

impl TestHost {
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = (std::process::id() % 200) as u8;
        let name = format!("weftpush{}-{n}", std::process::id());
        let (here, there) = (format!("wph{id}x{n}"), format!("wpt{id}x{n}"));
        // Inside 198.18.0.0/15 (benchmarking range), apart from the proxy tests' 198.18.20-119.
        let subnet = format!("198.18.{}", 128 + (u32::from(id) + n) % 100);
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

    /// This namespace's end of the veth pair (`.1`): an address of this machine that the
    /// API server accepts in EndpointSlices, where processes of the test can listen.
    pub fn near(&self) -> std::net::Ipv4Addr {
        let [a, b, c, _] = self.addr.octets();
        std::net::Ipv4Addr::new(a, b, c, 1)
    }

    /// A listener bound inside the test host, served by this process's runtime.
    pub fn listen(&self) -> std::net::TcpListener {
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
pub async fn backend() -> (std::net::SocketAddr, TestHost) {
    backend_answering("hello", Duration::ZERO).await
}

/// A plain HTTP/1.1 backend on a test host answering 200 `body` to every request, after
/// `delay` (to hold requests in flight).
pub async fn backend_answering(
    body: &'static str,
    delay: Duration,
) -> (std::net::SocketAddr, TestHost) {
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
                tokio::time::sleep(delay).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(response.as_bytes()).await;
            });
        }
    });
    (addr, host)
}

/// An HTTP/1.1 response as a test reads it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Header lines as (lower-case name, value).
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A GET over HTTP/1.1 on loopback: (status, body); times out after 5 s.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let r = http_request(addr, path).await?;
    Ok((r.status, r.body))
}

/// A GET over HTTP/1.1 on loopback, with the response's headers; times out after 5 s.
pub async fn http_request(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<Reply> {
    http_call(addr, "GET", path).await
}

/// A `method` request without a body over HTTP/1.1 on loopback, with the response's
/// headers; times out after 5 s.
pub async fn http_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<Reply> {
    // GETs go out as before this helper took a method: without a content-length.
    let length = if method == "GET" {
        ""
    } else {
        "content-length: 0\r\n"
    };
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nhost: t\r\n{length}connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .context("response timed out")??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).unwrap_or("0").parse()?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_owned(),
    })
}
