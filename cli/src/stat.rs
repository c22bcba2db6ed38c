//! `kubectl weft stat`: golden signals (success rate, requests per second, p50/p95/p99
//! latency) of deployments, pods, Services and Routes, from the proxies' own `/metrics`,
//! with no Prometheus: every proxy involved is scraped twice, `--window` apart, and the
//! rows are computed from the counters' increase in between.
//!
//! ```text
//! resolve rows (API server) ─▶ scrape 0 ─▶ wait window ─▶ scrape 1 ─▶ Δ per pod and series
//!                                                                 └─▶ sum over the row's
//!                                                                     pods, by view ─▶ table / JSON
//! ```
//!
//! Which proxies and which series a row reads (its [`View`]):
//!
//! | target | proxies scraped | series |
//! | --- | --- | --- |
//! | `deploy/X`, `pod/X` | X's pods | `direction="inbound"` (requests X served) |
//! | `deploy/X --to svc/Y` | X's pods | `direction="outbound"`, service Y |
//! | `deploy/X --from deploy/Z` | Z's pods | outbound, to the Services selecting X's pods |
//! | `svc/Y` `[--from deploy/Z]` | meshed pods of the namespace (or Z's) | outbound, service Y |
//! | `route/R` | as `svc/<R's service>` | the same, and per rule the series labelled `route="ns/R", rule=…`, with `weft_route_events_total{route="ns/R"}` |
//!
//! The proxies label a request's series with the Route rule that handled it (`route`,
//! `rule`; absent when none did), so a Route's row is its Service's, and each rule's row
//! is the part of it that rule handled. Requests no rule matched are in the Route's row
//! and in no rule's.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Pod, Service},
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{Api, Client, ResourceExt, api::ListParams};
use serde::Serialize;
use weft_inject::keys::MESHED_LABEL;

use crate::{
    admin::{self, AdminUrls},
    prom::{self, Sample},
};

/// The proxies' request counter.
pub const REQUESTS: &str = "weft_requests_total";
/// The proxies' response counter, by status class.
pub const RESPONSES: &str = "weft_responses_total";
/// The proxies' latency histogram's buckets.
pub const LATENCY_BUCKETS: &str = "weft_request_duration_seconds_bucket";
/// What Route rules did.
pub const ROUTE_EVENTS: &str = "weft_route_events_total";

/// Flags of `kubectl weft stat`.
#[derive(Debug, clap::Args)]
pub struct StatArgs {
    /// What to report on: `deploy`, `pod`, `svc` or `route`, optionally `/NAME`
    /// (`deploy/web`, `svc/web`, `routes`).
    pub target: String,
    /// The namespace.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Only requests sent by this resource's pods (`deploy/X`, `pod/X`): their proxies'
    /// outbound view.
    #[arg(long, conflicts_with = "to")]
    pub from: Option<String>,
    /// Only requests the target's pods sent to this Service (`svc/Y`): their outbound view.
    #[arg(long)]
    pub to: Option<String>,
    /// How long between the two scrapes a rate is computed from.
    #[arg(long, default_value = "5s")]
    pub window: weft_api::Duration,
    /// Keep reporting, one table per window.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// With `--watch`: stop after this many tables (default: until interrupted).
    #[arg(long, requires = "watch")]
    pub count: Option<u32>,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table")]
    pub output: Output,
    /// The proxies' admin port, reached through the API server's pod proxy.
    #[arg(long, default_value_t = 15021)]
    pub admin_port: u16,
    /// Read this pod's proxy admin endpoint directly instead (`NAMESPACE/POD=http://HOST:PORT`,
    /// repeatable): a `kubectl port-forward`, or a test bed whose pod IPs do not route.
    #[arg(long = "admin-url", value_name = "NS/POD=URL")]
    pub admin_urls: Vec<String>,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table for people.
    Table,
    /// One JSON document per window.
    Json,
}

/// The kinds of resource `stat` reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A Deployment: the pods its selector selects.
    Deployment,
    /// One pod.
    Pod,
    /// A Service: requests its clients' proxies sent to it.
    Service,
    /// A Route: as its Service, plus what each rule did.
    Route,
}

/// A parsed `KIND[/NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The kind.
    pub kind: Kind,
    /// The name; `None`: every resource of the kind in the namespace.
    pub name: Option<String>,
}

impl std::str::FromStr for Target {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Target> {
        let (kind, name) = match s.split_once('/') {
            Some((k, n)) if !n.is_empty() && !n.contains('/') => (k, Some(n.to_owned())),
            Some(_) => bail!("{s}: expected KIND or KIND/NAME"),
            None => (s, None),
        };
        let kind = match kind.to_ascii_lowercase().as_str() {
            "deploy" | "deployment" | "deployments" | "deployment.apps" => Kind::Deployment,
            "po" | "pod" | "pods" => Kind::Pod,
            "svc" | "service" | "services" => Kind::Service,
            "route" | "routes" | "route.weft.dev" | "routes.weft.dev" => Kind::Route,
            other => bail!("{other}: stat reports on deploy, pod, svc or route"),
        };
        Ok(Target { kind, name })
    }
}

/// Which series of which proxies make a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Outbound: the service labels' prefixes (`web.shop.`) to count; `None`: every one.
    pub services: Option<Vec<String>>,
    /// The Route (`namespace/name`) whose rules to report.
    pub route: Option<String>,
    /// That Route's rules' labels (name, or index) in its order, so that each gets a row,
    /// traffic or not.
    pub rules: Vec<String>,
}

impl View {
    fn takes(&self, s: &Sample) -> bool {
        s.label("direction") == self.direction
            && self.services.as_ref().is_none_or(|prefixes| {
                let svc = s.label("service");
                prefixes.iter().any(|p| svc.starts_with(p.as_str()))
            })
    }
}

/// The service-label prefix of Service `name` in `namespace`: the proxies name services
/// `name.namespace.port`.
pub fn service_prefix(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.")
}

/// Each pod's (`namespace/name`) scrape, or why it failed.
type Scrapes = BTreeMap<String, anyhow::Result<Vec<Sample>>>;

/// One pod's two scrapes.
#[derive(Clone, Debug, Default)]
pub struct PodScrapes {
    /// The first scrape.
    pub before: Vec<Sample>,
    /// The second.
    pub after: Vec<Sample>,
}

/// The increase of every series of one pod between its two scrapes.
fn deltas(p: &PodScrapes) -> Vec<Sample> {
    let key = |s: &Sample| (s.name.clone(), s.labels.clone());
    let before: BTreeMap<_, f64> = p.before.iter().map(|s| (key(s), s.value)).collect();
    p.after
        .iter()
        .map(|s| Sample {
            value: prom::increase(before.get(&key(s)).copied().unwrap_or(0.0), s.value),
            ..s.clone()
        })
        .collect()
}

/// The golden signals of one set of series over one window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Signals {
    /// Requests the proxies received.
    pub requests: u64,
    /// Responses by status class (`2xx`, `5xx`, …).
    pub responses: BTreeMap<String, u64>,
    /// The share of responses that are not 5xx; `None` without responses.
    pub success_rate: Option<f64>,
    /// Requests per second over the window.
    pub rps: f64,
    /// Latency quantiles in seconds, from the proxies' histograms; `None` without requests.
    pub p50_seconds: Option<f64>,
    /// 95th percentile.
    pub p95_seconds: Option<f64>,
    /// 99th percentile.
    pub p99_seconds: Option<f64>,
}

/// What one rule of a Route handled during the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleStats {
    /// The rule's name or index.
    pub rule: String,
    /// The signals of the requests this rule handled.
    #[serde(flatten)]
    pub signals: Signals,
    /// Events by name (`retry`, `fault_injected`, …), with how many.
    pub events: BTreeMap<String, u64>,
}

/// The golden signals of one row over one window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    /// The signals of every request in the row's view.
    #[serde(flatten)]
    pub signals: Signals,
    /// Per rule of the row's Route, when it has one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleStats>,
}

/// The increases of one set of request series, summed over pods.
#[derive(Debug, Default)]
struct Tally {
    requests: f64,
    responses: BTreeMap<String, f64>,
    /// Cumulative counts keyed by the bound's bits: the proxies all use the same bounds.
    buckets: BTreeMap<u64, (f64, f64)>,
}

impl Tally {
    fn add(&mut self, s: &Sample) {
        match s.name.as_str() {
            REQUESTS => self.requests += s.value,
            RESPONSES => {
                *self
                    .responses
                    .entry(s.label("status_class").to_owned())
                    .or_default() += s.value;
            }
            LATENCY_BUCKETS => {
                if let Some(le) = prom_le(s.label("le")) {
                    self.buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
                }
            }
            _ => {}
        }
    }

    fn signals(&self, window: Duration) -> Signals {
        let buckets: Vec<(f64, f64)> = self.buckets.values().copied().collect();
        let total: f64 = self.responses.values().sum();
        let failed = self.responses.get("5xx").copied().unwrap_or(0.0);
        Signals {
            requests: count(self.requests),
            success_rate: (total > 0.0).then(|| (total - failed) / total),
            responses: self
                .responses
                .iter()
                .map(|(k, v)| (k.clone(), count(*v)))
                .collect(),
            rps: self.requests / window.as_secs_f64().max(f64::EPSILON),
            p50_seconds: prom::quantile(0.5, &buckets),
            p95_seconds: prom::quantile(0.95, &buckets),
            p99_seconds: prom::quantile(0.99, &buckets),
        }
    }
}

/// A counter's increase as the whole number it is (sums of floats may be off by a hair).
fn count(v: f64) -> u64 {
    v.round() as u64
}

/// Sums the pods' increases that `view` takes into the row's signals and, for a Route,
/// each rule's: its request series labelled with the Route and the rule, and its events.
pub fn compute(pods: &[&PodScrapes], view: &View, window: Duration) -> Stats {
    let mut row = Tally::default();
    let mut rules: BTreeMap<String, (Tally, BTreeMap<String, f64>)> = BTreeMap::new();
    let route = view.route.as_deref();
    for p in pods {
        for s in deltas(p) {
            if s.name == ROUTE_EVENTS {
                if route == Some(s.label("route")) {
                    *rules
                        .entry(s.label("rule").to_owned())
                        .or_default()
                        .1
                        .entry(s.label("event").to_owned())
                        .or_default() += s.value;
                }
                continue;
            }
            if !view.takes(&s) {
                continue;
            }
            row.add(&s);
            if route.is_some() && route == Some(s.label("route")) {
                rules
                    .entry(s.label("rule").to_owned())
                    .or_default()
                    .0
                    .add(&s);
            }
        }
    }
    // The Route's rules in its order, then any the proxies still count that it no longer
    // has (the Route changed during the window).
    let mut ordered: Vec<RuleStats> = Vec::new();
    let mut take = |rule: String, (tally, events): (Tally, BTreeMap<String, f64>)| {
        ordered.push(RuleStats {
            signals: tally.signals(window),
            events: events.into_iter().map(|(k, v)| (k, count(v))).collect(),
            rule,
        });
    };
    if route.is_some() {
        for rule in &view.rules {
            let found = rules.remove(rule).unwrap_or_default();
            take(rule.clone(), found);
        }
    }
    for (rule, found) in rules {
        take(rule, found);
    }
    Stats {
        signals: row.signals(window),
        rules: ordered,
    }
}

fn prom_le(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        _ => s.parse().ok(),
    }
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What the row is about.
    pub kind: Kind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `inbound` or `outbound`: which proxies' view the numbers are.
    pub direction: &'static str,
    /// The pods whose proxies were read (`namespace/name`).
    pub pods: Vec<String>,
    /// Of the pods the row selects, how many are meshed (carry a proxy).
    pub meshed: usize,
    /// How many pods the row selects.
    pub selected: usize,
    /// Pods whose proxy could not be read, with why.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unreachable: BTreeMap<String, String>,
    /// The numbers; `None` when no proxy could be read.
    pub stats: Option<Stats>,
}

/// A row before its numbers: what to read.
#[derive(Clone, Debug)]
struct Plan {
    kind: Kind,
    namespace: String,
    name: String,
    /// Pods the target selects (for the MESHED column).
    selected: Vec<Pod>,
    /// Pods whose proxies are read.
    read: Vec<String>,
    view: View,
}

/// The whole report of one window, as `--output json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Seconds between the two scrapes.
    pub window_seconds: f64,
    /// The rows.
    pub rows: Vec<Row>,
}

/// Runs the command.
pub async fn run(args: StatArgs) -> anyhow::Result<()> {
    let config = kube::Config::infer()
        .await
        .context("build a Kubernetes client (KUBECONFIG)")?;
    let client = Client::try_from(config.clone()).context("build a Kubernetes client")?;
    // Scrapes through the API server's pod proxy: no retries, each bounded.
    let scraper = admin::pod_proxy_client(config)?;
    let target: Target = args.target.parse()?;
    let from = args.from.as_deref().map(str::parse::<Target>).transpose()?;
    let to = args.to.as_deref().map(str::parse::<Target>).transpose()?;
    let urls = AdminUrls::parse(&args.admin_urls)?;
    let window = args.window.as_std();
    if window < Duration::from_millis(100) {
        bail!("--window must be at least 100ms");
    }
    let rounds = if args.watch { args.count } else { Some(1) };
    let mut previous: Option<(Instant, Scrapes)> = None;
    let mut done = 0u32;
    while rounds.is_none_or(|n| done < n) {
        let plans = plan(
            &client,
            &args.namespace,
            &target,
            from.as_ref(),
            to.as_ref(),
        )
        .await?;
        let pods: BTreeSet<String> = plans.iter().flat_map(|p| p.read.clone()).collect();
        let (t0, before) = match previous.take() {
            Some(p) => p,
            None => {
                let t0 = Instant::now();
                let before = scrape_all(&scraper, &urls, args.admin_port, &pods).await;
                let ok = before.values().filter(|r| r.is_ok()).count();
                eprintln!(
                    "scraped {ok} of {} proxies; measuring for {}",
                    pods.len(),
                    args.window
                );
                (t0, before)
            }
        };
        tokio::time::sleep_until((t0 + window).into()).await;
        let t1 = Instant::now();
        let after = scrape_all(&scraper, &urls, args.admin_port, &pods).await;
        let elapsed = t1 - t0;
        let report = Report {
            window_seconds: elapsed.as_secs_f64(),
            rows: plans
                .iter()
                .map(|p| row(p, &before, &after, elapsed))
                .collect(),
        };
        let mut out = match args.output {
            Output::Json => serde_json::to_string_pretty(&report)? + "\n",
            Output::Table => render(&report),
        };
        if args.watch && args.output == Output::Table {
            out.push('\n');
        }
        std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes())?;
        previous = Some((t1, after));
        done += 1;
    }
    Ok(())
}

fn row(p: &Plan, before: &Scrapes, after: &Scrapes, window: Duration) -> Row {
    let mut unreachable = BTreeMap::new();
    let mut scrapes = Vec::new();
    for pod in &p.read {
        match (before.get(pod), after.get(pod)) {
            (Some(Ok(b)), Some(Ok(a))) => scrapes.push(PodScrapes {
                before: b.clone(),
                after: a.clone(),
            }),
            // A pod that appeared during the window: everything it counted is new.
            (None, Some(Ok(a))) => scrapes.push(PodScrapes {
                before: Vec::new(),
                after: a.clone(),
            }),
            (_, Some(Err(e))) | (Some(Err(e)), _) => {
                unreachable.insert(pod.clone(), format!("{e:#}"));
            }
            (_, None) => {
                unreachable.insert(pod.clone(), "not scraped".to_owned());
            }
        }
    }
    let refs: Vec<&PodScrapes> = scrapes.iter().collect();
    let meshed = p.selected.iter().filter(|pod| is_meshed(pod)).count();
    Row {
        kind: p.kind,
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        direction: p.view.direction,
        pods: p.read.clone(),
        meshed,
        selected: p.selected.len(),
        stats: (!refs.is_empty() || p.read.is_empty()).then(|| compute(&refs, &p.view, window)),
        unreachable,
    }
}

pub(crate) fn is_meshed(pod: &Pod) -> bool {
    pod.labels().contains_key(MESHED_LABEL)
}

fn key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

async fn scrape_all(
    client: &Client,
    urls: &AdminUrls,
    port: u16,
    pods: &BTreeSet<String>,
) -> Scrapes {
    let mut out = BTreeMap::new();
    // One at a time: a handful of pods is the common case, and it keeps the load on the
    // API server's proxy bounded.
    for pod in pods {
        let (ns, name) = pod.split_once('/').unwrap_or(("", pod));
        let r = admin::get(client, urls, ns, name, port, "/metrics")
            .await
            .and_then(|text| prom::parse(&text).map_err(anyhow::Error::from));
        out.insert(pod.clone(), r);
    }
    out
}

/// The label-selector string of a selector, as `kubectl -l` takes it.
fn selector_string(sel: &LabelSelector) -> anyhow::Result<String> {
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => bail!("selector operator {other} is not supported"),
        });
    }
    if parts.is_empty() {
        bail!("an empty selector selects every pod: refusing to guess");
    }
    Ok(parts.join(","))
}

async fn pods_matching(client: &Client, ns: &str, selector: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .with_context(|| format!("list pods {selector} in {ns}"))?
        .items)
}

/// The `(name, pods)` of each resource a deploy or pod target names (`stat`, `tap`).
pub(crate) async fn workloads(
    client: &Client,
    ns: &str,
    t: &Target,
) -> anyhow::Result<Vec<(String, Vec<Pod>)>> {
    match t.kind {
        Kind::Pod => {
            let api = Api::<Pod>::namespaced(client.clone(), ns);
            Ok(match &t.name {
                Some(n) => vec![(
                    n.clone(),
                    vec![api.get(n).await.with_context(|| format!("pod {ns}/{n}"))?],
                )],
                None => api
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .map(|p| (p.name_any(), vec![p]))
                    .collect(),
            })
        }
        Kind::Deployment => {
            let api = Api::<Deployment>::namespaced(client.clone(), ns);
            let deploys = match &t.name {
                Some(n) => vec![
                    api.get(n)
                        .await
                        .with_context(|| format!("deployment {ns}/{n}"))?,
                ],
                None => api.list(&ListParams::default()).await?.items,
            };
            let mut out = Vec::new();
            for d in deploys {
                let sel = d
                    .spec
                    .as_ref()
                    .map(|s| selector_string(&s.selector))
                    .ok_or_else(|| anyhow!("deployment {} has no spec", d.name_any()))??;
                out.push((d.name_any(), pods_matching(client, ns, &sel).await?));
            }
            Ok(out)
        }
        Kind::Service | Kind::Route => bail!("expected deploy/NAME or pod/NAME"),
    }
}

/// The Services (`name`) of `ns` whose selector selects one of `pods`.
async fn services_selecting(
    client: &Client,
    ns: &str,
    pods: &[Pod],
) -> anyhow::Result<Vec<String>> {
    let svcs = Api::<Service>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    Ok(svcs
        .items
        .into_iter()
        .filter(|s| {
            let sel = s
                .spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .unwrap_or_default();
            !sel.is_empty()
                && pods
                    .iter()
                    .any(|p| sel.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
        })
        .map(|s| s.name_any())
        .collect())
}

/// The proxies that send a Service's requests: `--from`'s pods, or every meshed pod of
/// the namespace.
async fn clients(client: &Client, ns: &str, from: Option<&Target>) -> anyhow::Result<Vec<String>> {
    let pods: Vec<Pod> = match from {
        Some(f) => workloads(client, ns, f)
            .await?
            .into_iter()
            .flat_map(|(_, p)| p)
            .collect(),
        None => pods_matching(client, ns, MESHED_LABEL).await?,
    };
    Ok(pods.iter().filter(|p| is_meshed(p)).map(key).collect())
}

async fn plan(
    client: &Client,
    ns: &str,
    target: &Target,
    from: Option<&Target>,
    to: Option<&Target>,
) -> anyhow::Result<Vec<Plan>> {
    if let Some(t) = to
        && (t.kind != Kind::Service || t.name.is_none())
    {
        bail!("--to takes svc/NAME: the proxies count outbound requests by Service");
    }
    if let Some(f) = from
        && !matches!(f.kind, Kind::Deployment | Kind::Pod)
    {
        bail!("--from takes deploy/NAME or pod/NAME: the pods whose proxies sent the requests");
    }
    let mut plans = Vec::new();
    match target.kind {
        Kind::Deployment | Kind::Pod => {
            for (name, selected) in workloads(client, ns, target).await? {
                let meshed: Vec<String> =
                    selected.iter().filter(|p| is_meshed(p)).map(key).collect();
                let (read, view) = match (from, to) {
                    (None, None) => (
                        meshed,
                        View {
                            direction: "inbound",
                            services: None,
                            route: None,
                            rules: Vec::new(),
                        },
                    ),
                    (None, Some(to)) => {
                        let svc = to.name.clone().unwrap_or_default();
                        (
                            meshed,
                            View {
                                direction: "outbound",
                                services: Some(vec![service_prefix(ns, &svc)]),
                                route: None,
                                rules: Vec::new(),
                            },
                        )
                    }
                    (Some(f), _) => {
                        let svcs = services_selecting(client, ns, &selected).await?;
                        let prefixes = svcs.iter().map(|s| service_prefix(ns, s)).collect();
                        (
                            clients(client, ns, Some(f)).await?,
                            View {
                                direction: "outbound",
                                services: Some(prefixes),
                                route: None,
                                rules: Vec::new(),
                            },
                        )
                    }
                };
                plans.push(Plan {
                    kind: target.kind,
                    namespace: ns.to_owned(),
                    name,
                    selected,
                    read,
                    view,
                });
            }
        }
        Kind::Service | Kind::Route => {
            if to.is_some() {
                bail!("--to applies to deploy and pod targets; for a Service, use --from");
            }
            let read = clients(client, ns, from).await?;
            // (row name, Service, Route `ns/name` and its rules' labels)
            type Named = (String, String, Option<(String, Vec<String>)>);
            let named: Vec<Named> = match target.kind {
                Kind::Service => {
                    let api = Api::<Service>::namespaced(client.clone(), ns);
                    match &target.name {
                        Some(n) => {
                            api.get(n)
                                .await
                                .with_context(|| format!("service {ns}/{n}"))?;
                            vec![(n.clone(), n.clone(), None)]
                        }
                        None => api
                            .list(&ListParams::default())
                            .await?
                            .items
                            .iter()
                            .map(|s| (s.name_any(), s.name_any(), None))
                            .collect(),
                    }
                }
                _ => {
                    let api = Api::<weft_crds::Route>::namespaced(client.clone(), ns);
                    let routes = match &target.name {
                        Some(n) => vec![
                            api.get(n)
                                .await
                                .with_context(|| format!("route {ns}/{n}"))?,
                        ],
                        None => api.list(&ListParams::default()).await?.items,
                    };
                    routes
                        .iter()
                        .map(|r| {
                            (
                                r.name_any(),
                                r.spec.service.name.clone(),
                                Some((format!("{ns}/{}", r.name_any()), rule_labels(r))),
                            )
                        })
                        .collect()
                }
            };
            for (name, svc, route) in named {
                let (route, rules) = route.map_or((None, Vec::new()), |(r, l)| (Some(r), l));
                plans.push(Plan {
                    kind: target.kind,
                    namespace: ns.to_owned(),
                    name,
                    selected: Vec::new(),
                    read: read.clone(),
                    view: View {
                        direction: "outbound",
                        services: Some(vec![service_prefix(ns, &svc)]),
                        route,
                        rules,
                    },
                });
            }
        }
    }
    Ok(plans)
}

/// The `rule` label the proxies give each of `route`'s rules: its name, else its index.
pub fn rule_labels(route: &weft_crds::Route) -> Vec<String> {
    route
        .spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| r.name.clone().unwrap_or_else(|| i.to_string()))
        .collect()
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{:.2}%", v * 100.0))
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| {
        let ms = v * 1000.0;
        if ms < 10.0 {
            format!("{ms:.2}ms")
        } else {
            format!("{ms:.0}ms")
        }
    })
}

/// The cells of one line's numbers.
fn number_cells(s: &Signals) -> [String; 6] {
    [
        pct(s.success_rate),
        format!("{:.1}", s.rps),
        s.requests.to_string(),
        ms(s.p50_seconds),
        ms(s.p95_seconds),
        ms(s.p99_seconds),
    ]
}

/// The table: one line per row and, under a Route's, one per rule (`  rule/NAME`); then
/// notes: proxies not read, and what each rule's events were.
pub fn render(report: &Report) -> String {
    let mut lines = vec![
        [
            "NAMESPACE",
            "NAME",
            "DIRECTION",
            "MESHED",
            "SUCCESS",
            "RPS",
            "REQUESTS",
            "P50",
            "P95",
            "P99",
        ]
        .map(str::to_owned),
    ];
    let mut notes = String::new();
    for r in &report.rows {
        let name = match r.kind {
            Kind::Deployment => format!("deploy/{}", r.name),
            Kind::Pod => format!("pod/{}", r.name),
            Kind::Service => format!("svc/{}", r.name),
            Kind::Route => format!("route/{}", r.name),
        };
        let meshed = match r.kind {
            Kind::Deployment | Kind::Pod => format!("{}/{}", r.meshed, r.selected),
            Kind::Service | Kind::Route => "-".to_owned(),
        };
        let line = |name: String, meshed: String, numbers: Option<&Signals>| {
            let [a, b, c, d, e, f] =
                numbers.map_or_else(|| ["-"; 6].map(str::to_owned), number_cells);
            [
                r.namespace.clone(),
                name,
                r.direction.to_owned(),
                meshed,
                a,
                b,
                c,
                d,
                e,
                f,
            ]
        };
        lines.push(line(
            name.clone(),
            meshed,
            r.stats.as_ref().map(|s| &s.signals),
        ));
        for rule in r.stats.iter().flat_map(|s| &s.rules) {
            lines.push(line(
                format!("  rule/{}", rule.rule),
                "-".to_owned(),
                Some(&rule.signals),
            ));
        }
        for (pod, why) in &r.unreachable {
            let _ = writeln!(notes, "{name}: proxy of {pod} not read: {why}");
        }
        for rule in r.stats.iter().flat_map(|s| &s.rules) {
            if rule.events.is_empty() {
                continue;
            }
            let events: Vec<String> = rule
                .events
                .iter()
                .map(|(e, n)| format!("{e}={n}"))
                .collect();
            let _ = writeln!(notes, "{name} rule {}: {}", rule.rule, events.join(" "));
        }
    }
    let mut out = crate::table::render(&lines);
    out.push_str(&notes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(text: &str) -> Vec<Sample> {
        prom::parse(text).unwrap()
    }

    #[test]
    fn targets_parse_like_kubectl_names() {
        let t: Target = "deploy/web".parse().unwrap();
        assert_eq!(
            t,
            Target {
                kind: Kind::Deployment,
                name: Some("web".into())
            }
        );
        let t: Target = "routes".parse().unwrap();
        assert_eq!(
            t,
            Target {
                kind: Kind::Route,
                name: None
            }
        );
        assert!("cm/x".parse::<Target>().is_err());
        assert!("svc/".parse::<Target>().is_err());
    }

    #[test]
    fn rows_count_what_happened_between_the_scrapes_in_their_view_only() {
        let before = scrape(
            r#"weft_requests_total{direction="outbound",service="web.shop.80"} 5
weft_responses_total{direction="outbound",service="web.shop.80",status_class="2xx"} 5
weft_requests_total{direction="outbound",service="web-b.shop.80"} 7
weft_request_duration_seconds_bucket{direction="outbound",service="web.shop.80",le="0.001"} 5
weft_request_duration_seconds_bucket{direction="outbound",service="web.shop.80",le="0.002"} 5
weft_request_duration_seconds_bucket{direction="outbound",service="web.shop.80",le="+Inf"} 5
weft_requests_total{direction="outbound",service="web.shop.80",route="shop/web",rule="1"} 5
weft_responses_total{direction="outbound",service="web.shop.80",route="shop/web",rule="1",status_class="2xx"} 5
weft_request_duration_seconds_bucket{le="0.001",direction="outbound",service="web.shop.80",route="shop/web",rule="1"} 5
weft_request_duration_seconds_bucket{le="0.002",direction="outbound",service="web.shop.80",route="shop/web",rule="1"} 5
weft_request_duration_seconds_bucket{le="+Inf",direction="outbound",service="web.shop.80",route="shop/web",rule="1"} 5
"#,
        );
        let after = scrape(
            r#"weft_requests_total{direction="outbound",service="web.shop.80"} 45
weft_responses_total{direction="outbound",service="web.shop.80",status_class="2xx"} 35
weft_responses_total{direction="outbound",service="web.shop.80",status_class="5xx"} 10
weft_requests_total{direction="outbound",service="web-b.shop.80"} 99
weft_requests_total{direction="inbound",service="local"} 99
weft_request_duration_seconds_bucket{direction="outbound",service="web.shop.80",le="0.001"} 25
weft_request_duration_seconds_bucket{direction="outbound",service="web.shop.80",le="0.002"} 45
weft_request_duration_seconds_bucket{direction="outbound",service="web.shop.80",le="+Inf"} 45
weft_route_events_total{service="web.shop.80",route="shop/web",rule="fail",event="fault_injected"} 10
weft_route_events_total{service="web.shop.80",route="shop/other",rule="x",event="retry"} 3
weft_requests_total{direction="outbound",service="web.shop.80",route="shop/web",rule="fail"} 10
weft_responses_total{direction="outbound",service="web.shop.80",route="shop/web",rule="fail",status_class="5xx"} 10
weft_request_duration_seconds_bucket{le="0.001",direction="outbound",service="web.shop.80",route="shop/web",rule="fail"} 10
weft_request_duration_seconds_bucket{le="0.002",direction="outbound",service="web.shop.80",route="shop/web",rule="fail"} 10
weft_request_duration_seconds_bucket{le="+Inf",direction="outbound",service="web.shop.80",route="shop/web",rule="fail"} 10
weft_requests_total{direction="outbound",service="web.shop.80",route="shop/web",rule="1"} 25
weft_responses_total{direction="outbound",service="web.shop.80",route="shop/web",rule="1",status_class="2xx"} 25
weft_request_duration_seconds_bucket{le="0.001",direction="outbound",service="web.shop.80",route="shop/web",rule="1"} 5
weft_request_duration_seconds_bucket{le="0.002",direction="outbound",service="web.shop.80",route="shop/web",rule="1"} 25
weft_request_duration_seconds_bucket{le="+Inf",direction="outbound",service="web.shop.80",route="shop/web",rule="1"} 25
"#,
        );
        let pod = PodScrapes { before, after };
        let view = View {
            direction: "outbound",
            services: Some(vec![service_prefix("shop", "web")]),
            route: Some("shop/web".into()),
            rules: vec!["fail".into(), "1".into(), "idle".into()],
        };
        let stats = compute(&[&pod, &pod], &view, Duration::from_secs(4));
        let s = &stats.signals;
        // Unlabelled: 40 per pod; rule fail: 10, rule 1: 20 (25 − 5).
        assert_eq!(
            s.requests, 140,
            "two pods, 70 each; web-b and inbound not counted"
        );
        assert_eq!(s.responses["2xx"], 100);
        assert_eq!(s.responses["5xx"], 40);
        assert_eq!(s.success_rate, Some(100.0 / 140.0));
        assert_eq!(s.rps, 35.0);
        assert!(
            s.p50_seconds.unwrap() > 0.001 && s.p95_seconds.unwrap() <= 0.002,
            "{s:?}"
        );
        // The rules in the Route's order, one without traffic included.
        let names: Vec<&str> = stats.rules.iter().map(|r| r.rule.as_str()).collect();
        assert_eq!(names, ["fail", "1", "idle"]);
        let fail = &stats.rules[0];
        assert_eq!(fail.events["fault_injected"], 20);
        assert_eq!(fail.signals.requests, 20);
        assert_eq!(fail.signals.responses, BTreeMap::from([("5xx".into(), 20)]));
        assert_eq!(fail.signals.success_rate, Some(0.0));
        assert_eq!(fail.signals.rps, 5.0);
        assert!((fail.signals.p99_seconds.unwrap() - 0.00099).abs() < 1e-12);
        let rest = &stats.rules[1];
        assert_eq!(rest.signals.requests, 40);
        assert_eq!(rest.signals.success_rate, Some(1.0));
        assert!(rest.events.is_empty());
        // 0 of 40 at or under 1ms (5 before, 5 after), all 40 under 2ms: p50 is 1.5ms.
        assert!((rest.signals.p50_seconds.unwrap() - 0.0015).abs() < 1e-12);
        let idle = &stats.rules[2];
        assert_eq!(idle.signals.requests, 0);
        assert_eq!(idle.signals.success_rate, None);
        assert_eq!(idle.signals.p50_seconds, None);

        let report = Report {
            window_seconds: 4.0,
            rows: vec![Row {
                kind: Kind::Route,
                namespace: "shop".into(),
                name: "web".into(),
                direction: "outbound",
                pods: vec![],
                meshed: 0,
                selected: 0,
                unreachable: BTreeMap::new(),
                stats: Some(stats.clone()),
            }],
        };
        let table = render(&report);
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines.len(), 6, "{table}");
        assert_eq!(
            lines[1][1..7],
            ["route/web", "outbound", "-", "71.43%", "35.0", "140"],
            "{table}"
        );
        assert_eq!(
            lines[2][1..7],
            ["rule/fail", "outbound", "-", "0.00%", "5.0", "20"],
            "{table}"
        );
        assert_eq!(
            lines[3][1..7],
            ["rule/1", "outbound", "-", "100.00%", "10.0", "40"],
            "{table}"
        );
        assert_eq!(
            lines[4][1..],
            ["rule/idle", "outbound", "-", "-", "0.0", "0", "-", "-", "-"],
            "{table}"
        );
        assert_eq!(
            lines[5].join(" "),
            "route/web rule fail: fault_injected=20",
            "{table}"
        );
        let json = serde_json::to_value(&report).unwrap();
        let fail = &json["rows"][0]["stats"]["rules"][0];
        assert_eq!(fail["rule"], "fail", "{json:#}");
        assert_eq!(fail["requests"], 20, "{json:#}");
        assert_eq!(fail["success_rate"], 0.0, "{json:#}");
        assert_eq!(fail["events"]["fault_injected"], 20, "{json:#}");
        assert_eq!(json["rows"][0]["stats"]["requests"], 140, "{json:#}");
    }

    #[test]
    fn inbound_series_of_each_client_identity_add_up() {
        let after = scrape(
            r#"weft_requests_total{direction="inbound",service="local"} 4
weft_responses_total{direction="inbound",service="local",status_class="2xx"} 4
weft_requests_total{direction="inbound",service="local",client_id="spiffe://cluster.local/ns/shop/sa/web"} 10
weft_responses_total{direction="inbound",service="local",client_id="spiffe://cluster.local/ns/shop/sa/web",status_class="2xx"} 9
weft_responses_total{direction="inbound",service="local",client_id="spiffe://cluster.local/ns/shop/sa/web",status_class="5xx"} 1
weft_requests_total{direction="inbound",service="local",client_id="spiffe://cluster.local/ns/ops/sa/probe"} 6
weft_responses_total{direction="inbound",service="local",client_id="spiffe://cluster.local/ns/ops/sa/probe",status_class="2xx"} 6
"#,
        );
        let pod = PodScrapes {
            before: Vec::new(),
            after,
        };
        let view = View {
            direction: "inbound",
            services: None,
            route: None,
            rules: Vec::new(),
        };
        let s = compute(&[&pod], &view, Duration::from_secs(2)).signals;
        assert_eq!(s.requests, 20, "plain text and both identities");
        assert_eq!(s.responses["2xx"], 19);
        assert_eq!(s.success_rate, Some(19.0 / 20.0));
    }

    #[test]
    fn no_requests_means_no_rates_to_claim() {
        let pod = PodScrapes::default();
        let view = View {
            direction: "inbound",
            services: None,
            route: None,
            rules: Vec::new(),
        };
        let s = compute(&[&pod], &view, Duration::from_secs(1));
        assert_eq!(s.signals.requests, 0);
        assert_eq!(s.signals.success_rate, None);
        assert_eq!(s.signals.p99_seconds, None);
        assert!(s.rules.is_empty());
        let report = Report {
            window_seconds: 1.0,
            rows: vec![Row {
                kind: Kind::Deployment,
                namespace: "shop".into(),
                name: "web".into(),
                direction: "inbound",
                pods: vec![],
                meshed: 0,
                selected: 2,
                unreachable: BTreeMap::from([("shop/web-1".into(), "refused".into())]),
                stats: Some(s),
            }],
        };
        let out = render(&report);
        assert!(out.contains("deploy/web") && out.contains("0/2"), "{out}");
        assert!(
            out.contains("proxy of shop/web-1 not read: refused"),
            "{out}"
        );
    }
}
