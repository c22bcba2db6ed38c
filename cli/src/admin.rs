//! How the CLI reads a meshed pod's proxy admin endpoints (`/metrics`, `/config`).
//!
//! ```text
//! default        API server ─▶ /api/v1/namespaces/NS/pods/NAME:15021/proxy/PATH ─▶ pod IP
//! --admin-url    http://host:port/PATH directly (a `kubectl port-forward`, or a test)
//! ```
//!
//! The API server's pod proxy connects from the API server's own address, so the proxy
//! treats it as remote: `/metrics` is served, `/config` is not (it reveals the mesh's
//! topology and is loopback-only). `explain` therefore reads `/config` through a port-forward,
//! whose connections arrive on the pod's loopback; see `explain`.
//!
//! Reads through the pod proxy use a client without retries ([`pod_proxy_client`]) and are
//! bounded by [`POD_TIMEOUT`].
//!
//! The operator's admin endpoint (`/proxies`, `/version`) is read by [`OperatorAdmin`],
//! every call bounded by [`OPERATOR_TIMEOUT`]:
//!
//! ```text
//! default         API server ─▶ /api/v1/namespaces/NS/services/NAME:PORT/proxy/PATH ─▶ an endpoint
//! --operator-url  http://host:port/PATH directly
//! ```

use std::{collections::BTreeMap, time::Duration};

/// The operator's admin endpoint as the chart exposes it: Service `weft-operator-metrics`,
/// port `http-metrics` (reached through the API server's service proxy).
pub const DEFAULT_OPERATOR_SERVICE: &str = "weft-operator-metrics:http-metrics";

/// How long one call to the operator's admin endpoint may take. Through the API server, a
/// Service without endpoints answers 503, which the Kubernetes client would retry with
/// backoff for minutes; an endpoint that accepts but never answers would hold the call
/// as long.
pub const OPERATOR_TIMEOUT: Duration = Duration::from_secs(10);

use anyhow::{Context, anyhow, bail};
use kube::Client;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// Where the operator's admin endpoint is, and a client to reach it.
#[derive(Clone)]
pub enum OperatorAdmin {
    /// Through the API server's service proxy.
    Service {
        /// A client that does not retry (a 503 is an answer here, not a hiccup).
        client: Client,
        /// The operator's namespace.
        namespace: String,
        /// `NAME` or `NAME:PORT` as given (`--operator-service`).
        service: String,
    },
    /// Directly at `http://host:port` (`--operator-url`).
    Url(String),
}

/// Why the operator's admin endpoint gave no answer; the message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum OperatorAdminError {
    /// No Kubernetes client could be built (no kubeconfig, or a broken one).
    #[error("no Kubernetes client for the operator's admin endpoint (KUBECONFIG): {0}")]
    Client(String),
    /// The call through the API server's service proxy did not finish in time.
    #[error(
        "the operator's admin endpoint (Service {namespace}/{service} through the API server's service proxy) did not answer {path} within {}s: {}",
        .timeout.as_secs(),
        service_hint(.namespace, .service)
    )]
    ServiceTimedOut {
        /// The operator's namespace.
        namespace: String,
        /// `NAME` or `NAME:PORT`.
        service: String,
        /// The path asked for.
        path: String,
        /// The bound that passed.
        timeout: Duration,
    },
    /// The API server answered with an error (a 503 when the Service has no endpoints).
    #[error(
        "the operator's admin endpoint (Service {namespace}/{service} through the API server's service proxy) refused {path}: {cause}; {}",
        service_hint(.namespace, .service)
    )]
    ServiceFailed {
        /// The operator's namespace.
        namespace: String,
        /// `NAME` or `NAME:PORT`.
        service: String,
        /// The path asked for.
        path: String,
        /// What the API server said.
        cause: String,
    },
    /// `--operator-url` did not answer in time.
    #[error(
        "the operator's admin endpoint {url} did not answer {path} within {}s: check the address given with --operator-url",
        .timeout.as_secs()
    )]
    UrlTimedOut {
        /// `--operator-url`.
        url: String,
        /// The path asked for.
        path: String,
        /// The bound that passed.
        timeout: Duration,
    },
    /// `--operator-url` answered with an error, or not at all.
    #[error("the operator's admin endpoint {url}: {cause}")]
    UrlFailed {
        /// `--operator-url`.
        url: String,
        /// What went wrong.
        cause: String,
    },
}

/// What to check when the operator's Service does not answer.
fn service_hint(namespace: &str, service: &str) -> String {
    let name = service.split_once(':').map_or(service, |(name, _)| name);
    format!(
        "check that the Service has ready endpoints with `kubectl -n {namespace} get endpoints {name}` (none means no operator pod is Ready: `kubectl -n {namespace} get pods`), or pass --operator-url"
    )
}

impl OperatorAdmin {
    /// The operator's admin endpoint at `url` when given, else Service `service`
    /// (`NAME` or `NAME:PORT`) in `namespace` through the API server (client from
    /// KUBECONFIG, without the client's retries of 503).
    pub async fn new(
        namespace: &str,
        service: &str,
        url: Option<&str>,
    ) -> Result<Self, OperatorAdminError> {
        if let Some(url) = url {
            return Ok(OperatorAdmin::Url(url.trim_end_matches('/').to_owned()));
        }
        let mut config = kube::Config::infer()
            .await
            .map_err(|e| OperatorAdminError::Client(e.to_string()))?;
        config.default_retry = false;
        let client =
            Client::try_from(config).map_err(|e| OperatorAdminError::Client(e.to_string()))?;
        Ok(OperatorAdmin::Service {
            client,
            namespace: namespace.to_owned(),
            service: service.to_owned(),
        })
    }

    /// GETs `path` (`/proxies`) within [`OPERATOR_TIMEOUT`]: the body of a 2xx.
    pub async fn get(&self, path: &str) -> Result<String, OperatorAdminError> {
        self.get_within(path, OPERATOR_TIMEOUT).await
    }

    /// GETs `path` within `timeout`.
    pub async fn get_within(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<String, OperatorAdminError> {
        match self {
            OperatorAdmin::Url(url) => {
                match tokio::time::timeout(timeout, get_direct(url, path)).await {
                    Err(_) => Err(OperatorAdminError::UrlTimedOut {
                        url: url.clone(),
                        path: path.to_owned(),
                        timeout,
                    }),
                    Ok(Err(e)) => Err(OperatorAdminError::UrlFailed {
                        url: url.clone(),
                        cause: format!("{e:#}"),
                    }),
                    Ok(Ok(body)) => Ok(body),
                }
            }
            OperatorAdmin::Service {
                client,
                namespace,
                service,
            } => {
                let at = format!("/api/v1/namespaces/{namespace}/services/{service}/proxy{path}");
                let answer = async {
                    let req = http::Request::get(&at)
                        .body(Vec::new())
                        .map_err(|e| e.to_string())?;
                    client.request_text(req).await.map_err(|e| match e {
                        // The API server's own words, without the Status dump.
                        kube::Error::Api(status) => format!("{} {}", status.code, status.message),
                        other => other.to_string(),
                    })
                };
                match tokio::time::timeout(timeout, answer).await {
                    Err(_) => Err(OperatorAdminError::ServiceTimedOut {
                        namespace: namespace.clone(),
                        service: service.clone(),
                        path: path.to_owned(),
                        timeout,
                    }),
                    Ok(Err(cause)) => Err(OperatorAdminError::ServiceFailed {
                        namespace: namespace.clone(),
                        service: service.clone(),
                        path: path.to_owned(),
                        cause,
                    }),
                    Ok(Ok(body)) => Ok(body),
                }
            }
        }
    }
}

/// The largest admin answer read (a `/config` of thousands of services fits).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// Per-pod overrides of where the admin endpoint is: `namespace/pod` → `http://host:port`.
#[derive(Clone, Debug, Default)]
pub struct AdminUrls(BTreeMap<String, String>);

impl AdminUrls {
    /// Parses `--admin-url` values: `NAMESPACE/POD=http://host:port`.
    pub fn parse(values: &[String]) -> anyhow::Result<Self> {
        let mut map = BTreeMap::new();
        for v in values {
            let (pod, url) = v.split_once('=').ok_or_else(|| {
                anyhow!("--admin-url {v}: expected NAMESPACE/POD=http://HOST:PORT")
            })?;
            if !pod.contains('/') || !url.starts_with("http://") {
                bail!("--admin-url {v}: expected NAMESPACE/POD=http://HOST:PORT");
            }
            map.insert(pod.to_owned(), url.trim_end_matches('/').to_owned());
        }
        Ok(AdminUrls(map))
    }

    /// The override for `namespace/pod`, if any.
    pub fn get(&self, namespace: &str, pod: &str) -> Option<&str> {
        self.0
            .get(&format!("{namespace}/{pod}"))
            .map(String::as_str)
    }
}

/// How long one read of a pod's admin endpoint may take. Through the API server, an
/// unreachable pod answers 503 or 504, which the Kubernetes client would retry with
/// backoff for minutes, and a pod that accepts but never answers would hold the call as
/// long; the same bound as [`OPERATOR_TIMEOUT`].
pub const POD_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for reads through the API server's pod proxy, built from `config`: without the
/// client's retries of 429/503/504 (the answer is the pod's, not a hiccup of the API
/// server's), as [`OperatorAdmin`]'s.
pub fn pod_proxy_client(mut config: kube::Config) -> anyhow::Result<Client> {
    config.default_retry = false;
    Client::try_from(config).context("build a Kubernetes client for the pod proxy")
}

/// GETs `path` from the admin endpoint of pod `namespace/name`: the override if there is
/// one, else through the API server's pod proxy to `port`, with `client` (one from
/// [`pod_proxy_client`], so that nothing is retried). Bounded by [`POD_TIMEOUT`].
pub async fn get(
    client: &Client,
    urls: &AdminUrls,
    namespace: &str,
    name: &str,
    port: u16,
    path: &str,
) -> anyhow::Result<String> {
    get_within(client, urls, namespace, name, port, path, POD_TIMEOUT).await
}

/// As [`get`], bounded by `timeout`.
pub async fn get_within(
    client: &Client,
    urls: &AdminUrls,
    namespace: &str,
    name: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    if let Some(url) = urls.get(namespace, name) {
        return get_direct(url, path).await;
    }
    let at = format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy{path}");
    let req = http::Request::get(&at).body(Vec::new())?;
    match tokio::time::timeout(timeout, client.request_text(req)).await {
        Err(_) => bail!(
            "GET {at} (the API server's pod proxy): no answer within {}s",
            timeout.as_secs_f64()
        ),
        Ok(answer) => answer.with_context(|| format!("GET {at} (the API server's pod proxy)")),
    }
}

/// The most pods one command reaches at once (a port-forward each).
pub const MAX_PODS: usize = 10;

/// Which pods a command on proxies' admin endpoints (`tap`, `log-level`) acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodTarget {
    /// One pod, by name (`web-0`, `pod/web-0`).
    Pod(String),
    /// A Deployment's running meshed pods (`deploy/web`).
    Deployment(String),
}

impl std::str::FromStr for PodTarget {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<PodTarget> {
        let Some((kind, name)) = s.split_once('/') else {
            return Ok(PodTarget::Pod(s.to_owned()));
        };
        if name.is_empty() || name.contains('/') {
            bail!("{s}: expected POD, pod/NAME or deploy/NAME");
        }
        match kind.parse::<crate::stat::Target>().map(|t| t.kind) {
            Ok(crate::stat::Kind::Pod) => Ok(PodTarget::Pod(name.to_owned())),
            Ok(crate::stat::Kind::Deployment) => Ok(PodTarget::Deployment(name.to_owned())),
            _ => bail!("{s}: expected a pod or a Deployment: POD, pod/NAME or deploy/NAME"),
        }
    }
}

impl PodTarget {
    /// The pods' names: the pod, or the Deployment's running meshed pods in `namespace`
    /// (at most [`MAX_PODS`], saying so on stderr when there are more), from the API
    /// server (KUBECONFIG).
    pub async fn pods(&self, namespace: &str) -> anyhow::Result<Vec<String>> {
        let name = match self {
            PodTarget::Pod(pod) => return Ok(vec![pod.clone()]),
            PodTarget::Deployment(name) => name,
        };
        let client = Client::try_default()
            .await
            .context("no Kubernetes client (KUBECONFIG)")?;
        let target = crate::stat::Target {
            kind: crate::stat::Kind::Deployment,
            name: Some(name.clone()),
        };
        let pods: Vec<String> = crate::stat::workloads(&client, namespace, &target)
            .await?
            .into_iter()
            .flat_map(|(_, pods)| pods)
            .filter(|p| {
                crate::stat::is_meshed(p)
                    && p.metadata.deletion_timestamp.is_none()
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
            .filter_map(|p| p.metadata.name)
            .collect();
        if pods.is_empty() {
            bail!("deployment {namespace}/{name} has no running meshed pod");
        }
        if pods.len() > MAX_PODS {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!(
                    "deployment {namespace}/{name} has {} running meshed pods: the first {MAX_PODS} only\n",
                    pods.len()
                )
                .as_bytes(),
            );
        }
        Ok(pods.into_iter().take(MAX_PODS).collect())
    }

    /// Where to reach pods' admin endpoints without a port-forward, from `--admin-url`
    /// values: `NAMESPACE/POD=URL`, or one bare URL for a pod target.
    pub fn admin_urls(&self, namespace: &str, values: &[String]) -> anyhow::Result<AdminUrls> {
        match (self, values) {
            (PodTarget::Pod(pod), [url]) if url.starts_with("http://") => {
                AdminUrls::parse(&[format!("{namespace}/{pod}={url}")])
            }
            (_, values) => AdminUrls::parse(values),
        }
    }
}

/// A pod's proxy admin endpoint as a loopback peer reaches it: through one `kubectl
/// port-forward` (connections arrive on the pod's loopback, the only peers the proxy
/// shows its config to and takes changes from), or at a URL given (`--admin-url`).
pub struct PodAdmin {
    url: String,
    forward: Option<tokio::process::Child>,
}

impl PodAdmin {
    /// Opens the way to pod `namespace/pod`'s admin `port`: `url` when given, else a
    /// `kubectl port-forward` (killed by [`PodAdmin::close`], or when dropped).
    pub async fn open(
        namespace: &str,
        pod: &str,
        port: u16,
        url: Option<&str>,
    ) -> anyhow::Result<PodAdmin> {
        if let Some(url) = url {
            return Ok(PodAdmin {
                url: url.to_owned(),
                forward: None,
            });
        }
        let mut child = tokio::process::Command::new("kubectl")
            .args([
                "port-forward",
                "-n",
                namespace,
                &format!("pod/{pod}"),
                &format!(":{port}"),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("run kubectl port-forward (is kubectl on PATH? or pass --admin-url)")?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("kubectl port-forward: no stdout"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        // "Forwarding from 127.0.0.1:40123 -> 15021"
        let local = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:")
                    && let Some((p, _)) = rest.split_once(' ')
                {
                    return anyhow::Ok(p.parse::<u16>()?);
                }
            }
            bail!("kubectl port-forward exited before forwarding")
        })
        .await
        .map_err(|_| anyhow!("kubectl port-forward did not start forwarding within 15s"))??;
        // kubectl prints a line per forwarded connection, and dies of SIGPIPE (resetting
        // the connection it forwards) once nobody reads them: read them until it exits.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(PodAdmin {
            url: format!("http://127.0.0.1:{local}"),
            forward: Some(child),
        })
    }

    /// `http://host:port` of the endpoint.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Ends the port-forward, if one was started.
    pub async fn close(mut self) {
        if let Some(child) = self.forward.as_mut() {
            let _ = child.kill().await;
        }
    }
}

/// GETs `path` from `url` (`http://host:port`) over plain HTTP/1.1; the body of a 200.
pub async fn get_direct(url: &str, path: &str) -> anyhow::Result<String> {
    call_direct(url, "GET", path, None).await
}

/// `method` `path` at `url` (`http://host:port`) over plain HTTP/1.1, with `body` if
/// given; the body of a 200, else an error with the status and the answer's text.
pub async fn call_direct(
    url: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<String> {
    let authority = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url}: must start with http://"))?
        .trim_end_matches('/');
    let work = async {
        let mut s = tokio::net::TcpStream::connect(authority)
            .await
            .with_context(|| format!("connect to {authority}"))?;
        let body = body.unwrap_or_default();
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        let read = (&mut s)
            .take(MAX_ANSWER_BYTES as u64)
            .read_to_end(&mut out)
            .await;
        match read {
            // A port-forwarded stream may end in a reset after the answer: what arrived is
            // judged below (a head, and a body as long as it says).
            Err(e) if out.is_empty() => Err(e.into()),
            _ => anyhow::Ok(out),
        }
    };
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), work)
        .await
        .map_err(|_| anyhow!("{method} {url}{path}: no answer within 10s"))??;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed answer from {authority}"))?;
    let status = head.lines().next().unwrap_or_default();
    // The admin listener answers with content-length; chunked answers are not expected.
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    if length.is_some_and(|n| body.len() < n) {
        bail!(
            "{method} {url}{path}: the answer ended after {} of its {} bytes",
            body.len(),
            length.unwrap_or_default()
        );
    }
    if !status.starts_with("HTTP/1.1 200") {
        bail!("{method} {url}{path} answered {status}: {}", body.trim());
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_a_pod_or_a_deployment() {
        for (given, want) in [
            ("web-0", PodTarget::Pod("web-0".to_owned())),
            ("pod/web-0", PodTarget::Pod("web-0".to_owned())),
            ("po/web-0", PodTarget::Pod("web-0".to_owned())),
            ("deploy/web", PodTarget::Deployment("web".to_owned())),
            (
                "deployment.apps/web",
                PodTarget::Deployment("web".to_owned()),
            ),
        ] {
            assert_eq!(given.parse::<PodTarget>().unwrap(), want, "{given}");
        }
        for bad in ["svc/web", "deploy/", "deploy/a/b", "route/web"] {
            assert!(bad.parse::<PodTarget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_service_that_does_not_answer_is_named_with_what_to_check() {
        let e = OperatorAdminError::ServiceTimedOut {
            namespace: "weft-system".to_owned(),
            service: "weft-operator-metrics:http-metrics".to_owned(),
            path: "/proxies".to_owned(),
            timeout: Duration::from_secs(10),
        };
        let text = e.to_string();
        assert!(
            text.contains("Service weft-system/weft-operator-metrics:http-metrics")
                && text.contains("within 10s")
                && text.contains("`kubectl -n weft-system get endpoints weft-operator-metrics`"),
            "{text}"
        );
    }

    /// Through the API server's pod proxy: a 503 (the pod unreachable) is answered at once,
    /// after one request (no retries), and an API server that never answers gives up
    /// within the bound.
    #[tokio::test]
    async fn a_pod_read_through_the_api_server_is_neither_retried_nor_unbounded() {
        use std::sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        };
        use tokio::io::AsyncWriteExt;

        let unavailable = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = unavailable.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = unavailable.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"no endpoints","reason":"ServiceUnavailable","code":503}"#;
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let client =
            pod_proxy_client(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
        let urls = AdminUrls::default();
        let started = std::time::Instant::now();
        let e = get_within(
            &client,
            &urls,
            "shop",
            "web-0",
            15021,
            "/metrics",
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(format!("{e:#}").contains("503"), "{e:#}");
        assert_eq!(requests.load(Ordering::SeqCst), 1, "retried");
        assert!(started.elapsed() < Duration::from_secs(2));

        // Accepted by the kernel (the backlog), never answered.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let client = pod_proxy_client(kube::Config::new(url.parse().unwrap())).unwrap();
        let started = std::time::Instant::now();
        let e = get_within(
            &client,
            &urls,
            "shop",
            "web-0",
            15021,
            "/metrics",
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(format!("{e:#}").contains("no answer within"), "{e:#}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn an_operator_url_that_never_answers_gives_up_within_the_bound() {
        // Accepted by the kernel (the backlog), never answered: the call must end anyway.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let admin = OperatorAdmin::new("weft-system", DEFAULT_OPERATOR_SERVICE, Some(&url))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let e = admin
            .get_within("/proxies", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{e}");
        assert!(matches!(e, OperatorAdminError::UrlTimedOut { .. }), "{e}");
        assert!(e.to_string().contains("--operator-url"), "{e}");
    }
}
