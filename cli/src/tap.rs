//! `kubectl weft tap POD|deploy/NAME`: the requests a meshed pod's proxy handles, live,
//! one line each as they finish, from its admin port's `/tap` (whether or not the pod has
//! an access log), so that what a workload is doing right now can be seen without
//! restarting it.
//!
//! ```text
//! flags ─▶ the proxy's own TapRequest::parse (refused here, before anything is opened)
//! deploy/NAME ─▶ its running meshed pods (at most MAX_PODS), one tap each, at once
//! kubectl port-forward (or --admin-url) ─▶ GET /tap?… ─▶ JSON lines ─▶ a line each, or -o json
//! ```
//!
//! The proxy serves `/tap` to loopback peers only: a port-forward's connections arrive on
//! the pod's loopback and are authorized by the caller's RBAC (`pods/portforward`). Each
//! pod's tap ends after `--max` requests or `--for`, whichever comes first, and the proxy
//! ends it itself if this command goes away.

use std::{io::Write, time::Duration};

use anyhow::{Context, anyhow, bail};
use http_body_util::BodyExt;
use serde_json::Value;
use weft_proxy::tap::TapRequest;

use crate::admin::{AdminUrls, PodAdmin, PodTarget};

/// The flags `tap` and `top` share: whose proxies, how they are reached, which requests.
#[derive(Clone, Debug, clap::Args)]
pub struct TapScope {
    /// A meshed pod (`web-0`, `pod/web-0`), or a Deployment's running meshed pods
    /// (`deploy/web`, at most 10), each tapped at once.
    pub target: String,
    /// The pod's namespace.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Only requests of this direction: `inbound` (to the pod) or `outbound` (from it).
    #[arg(long)]
    pub direction: Option<String>,
    /// Only requests of this method (`GET`).
    #[arg(long)]
    pub method: Option<String>,
    /// Only requests to this authority (`web.shop:8080`, or the host alone for any port).
    #[arg(long)]
    pub authority: Option<String>,
    /// Only requests whose path starts with this (`/api`).
    #[arg(long)]
    pub path: Option<String>,
    /// The proxies' admin port.
    #[arg(long, default_value_t = 15021)]
    pub admin_port: u16,
    /// Reach a pod's proxy admin endpoint here instead of running `kubectl port-forward`:
    /// `http://127.0.0.1:PORT` (an existing port-forward) for a pod target, or
    /// `NAMESPACE/POD=http://127.0.0.1:PORT`, repeated, for any.
    #[arg(long)]
    pub admin_url: Vec<String>,
}

impl TapScope {
    /// `/tap`'s path and query for these filters, `max` requests and `duration` (the
    /// `--for` flag), checked with the proxy's own parser and refused by flag name.
    pub fn path_and_query(&self, max: u64, duration: &str) -> anyhow::Result<String> {
        let mut query = Vec::new();
        for (key, value) in [
            ("direction", self.direction.as_deref()),
            ("method", self.method.as_deref()),
            ("authority", self.authority.as_deref()),
            ("path", self.path.as_deref()),
            ("max", Some(&*max.to_string())),
            ("duration", Some(duration)),
        ] {
            if let Some(v) = value {
                query.push(format!("{key}={}", percent_encode(v)));
            }
        }
        let query = query.join("&");
        TapRequest::parse(Some(&query)).map_err(|e| {
            // The proxy's names are its query's; these are the flags'.
            anyhow!(
                "{}",
                e.to_string()
                    .replacen("duration=", "--for ", 1)
                    .replacen("direction=", "--direction ", 1)
                    .replacen("method=", "--method ", 1)
                    .replacen("authority=", "--authority ", 1)
                    .replacen("path=", "--path ", 1)
                    .replacen("max=", "--max ", 1)
            )
        })?;
        Ok(format!("/tap?{query}"))
    }
}

/// Flags of `kubectl weft tap`.
#[derive(Debug, clap::Args)]
pub struct TapArgs {
    /// Whose requests, which, and how the proxies are reached.
    #[command(flatten)]
    pub scope: TapScope,
    /// Stop each pod's tap after this many requests (at most 100000).
    #[arg(long, default_value_t = weft_proxy::tap::DEFAULT_MAX_EVENTS)]
    pub max: u64,
    /// Stop each pod's tap after this long (`30s`, `5m`; at most 30m).
    #[arg(long = "for", default_value = "1m")]
    pub duration: String,
    /// Output: `text` (a line per request) or `json` (the proxy's JSON lines as they are;
    /// with a Deployment, each with the pod's `namespace/name` as `"pod"`).
    #[arg(short = 'o', long, default_value = "text")]
    pub output: String,
}

/// Every byte but the unreserved ones and `/` as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs the command: a line per request on stdout until every pod's tap ends, each pod's
/// end saying how; an error if any pod could not be tapped.
pub async fn run(args: TapArgs) -> anyhow::Result<()> {
    let json = match args.output.as_str() {
        "json" => true,
        "text" => false,
        other => bail!("-o {other}: expected text or json"),
    };
    let target: PodTarget = args.scope.target.parse()?;
    let path = args.scope.path_and_query(args.max, &args.duration)?;
    let many = matches!(target, PodTarget::Deployment(_));
    let pods = Pods::find(&target, &args.scope).await?;
    pods.tap(
        &path,
        |_| {},
        move |pod, key, line| {
            let text = match (json, many) {
                (true, false) => line.to_owned(),
                (true, true) => with_pod(line, key),
                (false, false) => format_line(key, line),
                // The end line names its pod already.
                (false, true) if line.starts_with("{\"tapEnd\"") => format_line(key, line),
                (false, true) => format!("{pod} {}", format_line(key, line)),
            };
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}").and_then(|()| out.flush())
        },
    )
    .await
}

/// The pods a command taps, and how each one's admin port is reached.
pub struct Pods {
    namespace: String,
    names: Vec<String>,
    admin_port: u16,
    urls: AdminUrls,
}

impl Pods {
    /// `target`'s pods in the scope's namespace (a Deployment's from the API server),
    /// reached at `--admin-url` values where given, else through `kubectl port-forward`.
    pub async fn find(target: &PodTarget, scope: &TapScope) -> anyhow::Result<Pods> {
        let urls = target.admin_urls(&scope.namespace, &scope.admin_url)?;
        Ok(Pods {
            namespace: scope.namespace.clone(),
            names: target.pods(&scope.namespace).await?,
            admin_port: scope.admin_port,
            urls,
        })
    }

    /// How many pods.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are none (never, once found).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Opens `path` (`/tap?…`) on every pod at once and hands each line to `each(pod,
    /// namespace/pod, line)` until every tap ends; `opened(namespace/pod)` as each tap's
    /// stream begins. A pod that cannot be tapped is named on stderr while the others go
    /// on, and makes the whole an error.
    pub async fn tap<O, F>(self, path: &str, opened: O, each: F) -> anyhow::Result<()>
    where
        O: Fn(&str) + Clone + Send + Sync + 'static,
        F: Fn(&str, &str, &str) -> std::io::Result<()> + Clone + Send + Sync + 'static,
    {
        let mut taps = tokio::task::JoinSet::new();
        for pod in self.names {
            let (namespace, port, path) =
                (self.namespace.clone(), self.admin_port, path.to_owned());
            let url = self.urls.get(&namespace, &pod).map(str::to_owned);
            let (opened, each) = (opened.clone(), each.clone());
            taps.spawn(async move {
                let key = format!("{namespace}/{pod}");
                let result = async {
                    let admin = PodAdmin::open(&namespace, &pod, port, url.as_deref()).await?;
                    let shown = stream(
                        admin.url(),
                        &path,
                        || opened(&key),
                        |line| each(&pod, &key, line),
                    )
                    .await;
                    admin.close().await;
                    shown
                }
                .await;
                result.with_context(|| format!("tap of {key}"))
            });
        }
        let mut failed = 0;
        while let Some(done) = taps.join_next().await {
            if let Err(e) = done.map_err(anyhow::Error::from).and_then(|r| r) {
                failed += 1;
                let _ = writeln!(std::io::stderr(), "error: {e:#}");
            }
        }
        if failed > 0 {
            bail!("{failed} pod(s) could not be tapped");
        }
        Ok(())
    }
}

/// A JSON line with the pod it came from as its last field, `"pod"` (the proxy's fields
/// kept in their order).
fn with_pod(line: &str, pod: &str) -> String {
    match line.strip_suffix('}') {
        Some(head) if line.starts_with('{') && head.len() > 1 => {
            format!("{head},\"pod\":{}}}", Value::String(pod.to_owned()))
        }
        _ => line.to_owned(),
    }
}

/// GETs `path` at `url`, calls `on_open` once the proxy has accepted, and hands each line of
/// the streamed answer to `each`, until the answer ends; an error for anything but a 200
/// (with the proxy's reason) or a cut stream.
pub async fn stream(
    url: &str,
    path: &str,
    on_open: impl FnOnce(),
    mut each: impl FnMut(&str) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let authority = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url}: must start with http://"))?
        .trim_end_matches('/')
        .to_owned();
    let opened = async {
        let tcp = tokio::net::TcpStream::connect(&authority)
            .await
            .with_context(|| format!("connect to {authority}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(path)
            .header(http::header::HOST, &authority)
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        anyhow::Ok(send.send_request(req).await?)
    };
    let resp = tokio::time::timeout(Duration::from_secs(10), opened)
        .await
        .map_err(|_| anyhow!("GET {url}{path}: no answer within 10s"))??;
    let status = resp.status();
    let mut body = resp.into_body();
    if status != http::StatusCode::OK {
        let text = body
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        bail!("the proxy refused the tap ({status}): {text}");
    }
    on_open();
    let mut pending = Vec::new();
    let mut ended = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the tap's stream was cut")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(at) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=at).collect();
            let line = String::from_utf8_lossy(&line[..at]);
            ended |= line.starts_with("{\"tapEnd\"");
            if let Err(e) = each(&line) {
                // A closed pipe (`| head`) ends the command quietly.
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(e.into());
            }
        }
    }
    if !ended {
        bail!(
            "the tap's stream ended before the proxy said why (the pod or the port-forward went away?)"
        );
    }
    Ok(())
}

/// One of the proxy's JSON lines as a line of text: when, which way, what, the answer,
/// how long, and who (the client inbound, the endpoint outbound).
pub fn format_line(pod: &str, line: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return line.to_owned();
    };
    let s = |key: &str| v.get(key).and_then(Value::as_str).unwrap_or_default();
    if let Some(end) = v.get("tapEnd") {
        let n = |key: &str| end.get(key).and_then(Value::as_u64).unwrap_or_default();
        let why = match end.get("why").and_then(Value::as_str) {
            Some("max") => "its --max requests were shown",
            Some("duration") => "its --for time ran out",
            Some("shutdown") => "the proxy is shutting down",
            _ => "the proxy ended it",
        };
        let mut out = format!(
            "# tap of {pod} ended: {} request(s) shown; {why}",
            n("events")
        );
        if n("dropped") > 0 {
            out.push_str(&format!(
                "; {} more matched but were not shown, as they came faster than they were read",
                n("dropped")
            ));
        }
        return out;
    }
    let time = s("timestamp").split_once('T').map_or("", |(_, t)| t);
    let status = match v.get("status").and_then(Value::as_u64) {
        Some(0) => "---".to_owned(),
        Some(code) => code.to_string(),
        None => "?".to_owned(),
    };
    let ms = v.get("duration_ms").and_then(Value::as_f64).unwrap_or(0.0);
    let mut out = format!(
        "{time} {:<8} {} {}{} {status} {ms:.1}ms",
        s("direction"),
        s("method"),
        s("authority"),
        s("path"),
    );
    let reason = s("reason");
    if !reason.is_empty() {
        out.push_str(&format!(" weft-error={reason}"));
    }
    if s("direction") == "inbound" {
        match (s("source_identity"), s("source_addr")) {
            ("", "") => {}
            ("", addr) => out.push_str(&format!(" from {addr} (no mesh identity)")),
            (id, _) => out.push_str(&format!(" from {id}")),
        }
    } else {
        match (s("upstream"), s("destination_identity")) {
            ("", _) => {}
            (addr, "") => out.push_str(&format!(" to {addr}")),
            (addr, id) => out.push_str(&format!(" to {addr} ({id})")),
        }
    }
    if status == "---" {
        out.push_str(" (the client went away first)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_name_their_pod_last() {
        assert_eq!(
            with_pod(r#"{"status":200,"path":"/"}"#, "shop/web-0"),
            r#"{"status":200,"path":"/","pod":"shop/web-0"}"#
        );
        assert_eq!(
            with_pod(r#"{"tapEnd":{"events":1}}"#, "a/b"),
            r#"{"tapEnd":{"events":1},"pod":"a/b"}"#
        );
    }

    /// The path and query `kubectl weft tap web-0 EXTRA…` asks for.
    fn path(extra: &[&str]) -> anyhow::Result<String> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            tap: TapArgs,
        }
        let mut argv = vec!["tap", "web-0"];
        argv.extend_from_slice(extra);
        let tap = Cli::parse_from(argv).tap;
        tap.scope.path_and_query(tap.max, &tap.duration)
    }

    #[test]
    fn flags_become_the_query_and_bad_ones_are_named_as_flags() {
        assert_eq!(path(&[]).unwrap(), "/tap?max=1000&duration=1m");
        assert_eq!(
            path(&["--path", "/a b&c", "--direction", "inbound", "--for", "5m"]).unwrap(),
            "/tap?direction=inbound&path=/a%20b%26c&max=1000&duration=5m"
        );
        for (flags, says) in [
            (&["--for", "2h"][..], "--for \"2h\""),
            (&["--direction", "in"][..], "--direction \"in\""),
            (&["--path", "api"][..], "--path \"api\""),
            (&["--max", "0"][..], "--max \"0\""),
        ] {
            let e = path(flags).unwrap_err().to_string();
            assert!(e.contains(says), "{flags:?}: {e}");
        }
    }

    #[test]
    fn lines_say_what_who_and_how_it_ended() {
        let inbound = r#"{"timestamp":"2026-12-05T01:02:03.456Z","direction":"inbound","source_identity":"spiffe://cluster.local/ns/shop/sa/client","source_addr":"198.18.0.5","method":"GET","authority":"web.shop","path":"/api","status":403,"duration_ms":0.42,"bytes_in":0,"bytes_out":10,"attempts":0,"reason":"forbidden"}"#;
        assert_eq!(
            format_line("shop/web-0", inbound),
            "01:02:03.456Z inbound  GET web.shop/api 403 0.4ms weft-error=forbidden from spiffe://cluster.local/ns/shop/sa/client"
        );
        let outbound = r#"{"timestamp":"2026-12-05T01:02:03.456Z","direction":"outbound","method":"POST","authority":"web","path":"/","status":0,"duration_ms":12.0,"upstream":"198.18.1.2:8080","destination_identity":"spiffe://cluster.local/ns/shop/sa/web","attempts":1}"#;
        assert_eq!(
            format_line("shop/client", outbound),
            "01:02:03.456Z outbound POST web/ --- 12.0ms to 198.18.1.2:8080 (spiffe://cluster.local/ns/shop/sa/web) (the client went away first)"
        );
        assert_eq!(
            format_line(
                "shop/web-0",
                r#"{"tapEnd":{"events":3,"dropped":2,"why":"duration"}}"#
            ),
            "# tap of shop/web-0 ended: 3 request(s) shown; its --for time ran out; 2 more matched but were not shown, as they came faster than they were read"
        );
        assert_eq!(format_line("p", "not json"), "not json");
    }
}
