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

use std::collections::BTreeMap;

/// The operator's admin endpoint as the chart exposes it: Service `weft-operator-metrics`,
/// port `http-metrics` (reached through the API server's service proxy).
pub const DEFAULT_OPERATOR_SERVICE: &str = "weft-operator-metrics:http-metrics";

use anyhow::{Context, anyhow, bail};
use kube::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// GETs `path` from the admin endpoint of pod `namespace/name`: the override if there is
/// one, else through the API server's pod proxy to `port`.
pub async fn get(
    client: &Client,
    urls: &AdminUrls,
    namespace: &str,
    name: &str,
    port: u16,
    path: &str,
) -> anyhow::Result<String> {
    if let Some(url) = urls.get(namespace, name) {
        return get_direct(url, path).await;
    }
    let at = format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy{path}");
    let req = http::Request::get(&at).body(Vec::new())?;
    client
        .request_text(req)
        .await
        .with_context(|| format!("GET {at} (the API server's pod proxy)"))
}

/// GETs `path` from `url` (`http://host:port`) over plain HTTP/1.1; the body of a 200.
pub async fn get_direct(url: &str, path: &str) -> anyhow::Result<String> {
    let authority = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url}: must start with http://"))?
        .trim_end_matches('/');
    let work = async {
        let mut s = tokio::net::TcpStream::connect(authority)
            .await
            .with_context(|| format!("connect to {authority}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        (&mut s)
            .take(MAX_ANSWER_BYTES as u64)
            .read_to_end(&mut out)
            .await?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), work)
        .await
        .map_err(|_| anyhow!("GET {url}{path}: no answer within 10s"))??;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed answer from {authority}"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        bail!("GET {url}{path} answered {status}: {}", body.trim());
    }
    // The admin listener answers with content-length; chunked answers are not expected.
    Ok(body.to_owned())
}
