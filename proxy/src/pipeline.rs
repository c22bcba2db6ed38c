//! The request path after the checks every request gets ([`HttpConn::handle`]), as a list
//! of stages. Each stage is its own module with its own tests; this file only composes
//! them, in this order:
//!
//! ```text
//! inbound:  mTLS mode ─▶ authorize (normalize path) ─▶ rate limit ─────────────────────────────────────────▶ send (one attempt)
//! outbound: normalize path ─▶ match rule ─▶ fault ─▶ edit request ─▶ mirror
//!             ─▶ pick backend (weight) ─▶ send: attempts under timeout, per-try timeout,
//!                retry policy and budget, each to an endpoint the balancer picks
//!             ─▶ edit response
//! ```
//!
//! A service without a Route skips the stages before `send`, whose only retries are then
//! the ones that are always safe: a request that could not be connected, or whose HTTP/2
//! stream the upstream did not process (refused, or left out as it went away), goes to
//! another endpoint, at most twice (under the service's retry budget). A stream left
//! unprocessed goes once more where no other endpoint may take it (one endpoint, or a
//! fixed one), once that endpoint has left one unprocessed before (only then is the
//! request copied for it).
//!
//! A request a meshed endpoint's proxy could not hand to its application (its answer
//! carries [`UNSENT_HEADER`], trusted over mutual TLS only) was never sent either, and
//! goes to another endpoint under the same rules. After that answer or a refused stream,
//! the proxy must still have the request: a bodiless one (its head is copied before
//! sending to a meshed endpoint or over HTTP/2), one whose body a retry policy copied,
//! or a gRPC one whose body ended, within [`REPLAY_LIMIT`], before the answer (its body
//! is teed as it streams, since gRPC sends no length).
//! Inbound, the proxy marks its own such answers to a peer proxy, and removes the header
//! from every response of the application.

use std::{
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, uri::PathAndQuery,
};
use http_body::Body as _;
use http_body_util::{BodyExt as _, Either, Full};
use hyper::body::Incoming;

use crate::{
    breaker::Outcome,
    errors::{ErrorCode, UNSENT_HEADER},
    http::{
        BodyCopy, BodyWatch, Codings, HttpConn, ProxyBody, RequestBody, RequestHead, TrackedBody,
        Tunnel, error_response, grpc_error_response, keep_alive_timeout, single_content_length,
        strip_hop_by_hop,
    },
    limits::Limit,
    metrics::RequestMetrics,
    ratelimit::RateDecision,
    retry::{Failure, RetryBudget, RetryPolicy, Withdrawal},
    route::{headers::HeaderEdits, matching::MatchInput, normalize::normalize_path},
    rules::{Rule, Target},
    store::{EndpointState, ServiceState, Snapshot},
    traffic_metrics::{DryRun, RouteEvent},
    upstream::{Lease, SendError},
};

/// The largest request body the proxy keeps a copy of, to send it again (a retry) or twice
/// (a mirror). Bodies without a `content-length`, or above this, stream and are never
/// retried or mirrored.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

/// The backend of a rule whose backends all have weight 0.
static DRAINED: Target = Target::Drained;

/// How long a mirrored request may take before the proxy gives up on it.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// What one request carries through the stages.
pub(crate) struct Exchange<'a> {
    pub start: Instant,
    /// Whether the request is `HEAD`: its answer has no content, whatever the upstream
    /// sends.
    pub head: bool,
    pub grpc: bool,
    pub labels: &'a RequestMetrics,
    pub upgrade: bool,
    pub connect: bool,
    pub on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// What the access log needs to know of the attempts, when there is one.
    pub trail: Option<&'a mut crate::access_log::Trail>,
    /// How the client's request body fares (whether it failed, whether the proxy waits on
    /// the client for more of it); `None` for a request without one.
    pub body_watch: Option<BodyWatch>,
}

/// Where attempts go and under which rules.
pub(crate) struct Attempts<'a> {
    target: Pick<'a>,
    retry: Option<&'a RetryPolicy>,
    budget: Option<&'a RetryBudget>,
    deadline: Option<tokio::time::Instant>,
    per_try: Option<Duration>,
    rule: Option<RuleLabels<'a>>,
    response_headers: Option<&'a HeaderEdits>,
}

enum Pick<'a> {
    Fixed(&'a Arc<EndpointState>),
    Service(&'a ServiceState),
}

/// The metric labels of the rule a request matched.
#[derive(Clone, Copy)]
struct RuleLabels<'a> {
    service: &'a ServiceState,
    route: &'a Arc<str>,
    rule: &'a Arc<str>,
}

impl<'a> Attempts<'a> {
    /// The attempts of a request no Route rule takes: to the service's own endpoints,
    /// under its timeout, with only the always-safe retry of a failed connect.
    fn plain(service: &'a ServiceState, start: Instant) -> Self {
        Attempts {
            target: Pick::Service(service),
            retry: None,
            budget: Some(&service.budget),
            deadline: deadline(start, service.spec.response_timeout),
            per_try: None,
            rule: None,
            response_headers: None,
        }
    }

    /// One attempt to a fixed endpoint (the local application), with a deadline.
    pub(crate) fn single(
        endpoint: &'a Arc<EndpointState>,
        deadline: Option<tokio::time::Instant>,
    ) -> Self {
        Attempts {
            target: Pick::Fixed(endpoint),
            retry: None,
            budget: None,
            deadline,
            per_try: None,
            rule: None,
            response_headers: None,
        }
    }
}

/// The request body, as retries and mirrors may use it.
enum Replay {
    /// Streamed: sent once (or again only if it was never sent, after a failed connect).
    Stream,
    /// Read whole: sent as often as needed.
    Copy(Bytes),
}

impl RuleLabels<'_> {
    fn count(&self, metrics: &crate::metrics::Metrics, event: RouteEvent) {
        metrics
            .traffic
            .route_event(&self.service.label, self.route, self.rule, event);
    }
}

impl HttpConn {
    /// The inbound mTLS mode and authorization: `Some` refusal when the workload's mode is
    /// `strict` and the client has no mesh identity (403 `mtls_required`, or
    /// `client_certificate_required` over TLS without a certificate), or when a
    /// Policy denies the request (403 `forbidden`, naming it in `weft-policy`). With
    /// authorization, the request's path is normalized first, and the application gets
    /// the path that was judged.
    pub(crate) fn authorize<B>(
        &self,
        req: &mut Request<B>,
        labels: &RequestMetrics,
        grpc: bool,
        start: Instant,
    ) -> Option<Response<ProxyBody>> {
        if self.direction != crate::metrics::Direction::Inbound {
            return None;
        }
        let snapshot = self.store.load()?;
        let identity = self.client_identity.as_deref();
        if let Some(code) =
            crate::authz::mtls_refusal(snapshot.config.inbound_mtls, self.client_tls, identity)
        {
            tracing::debug!(
                path = req.uri().path(),
                reason = code.as_str(),
                "client without a mesh identity refused: mTLS is strict"
            );
            return Some(self.fail(labels, code, grpc, start));
        }
        let authz = snapshot.config.authorization.as_ref()?;
        normalize(req);
        let port = match &self.target {
            crate::http::HttpTarget::Fixed(e) => e.addr.port(),
            // Inbound connections always go to the local application.
            _ => 0,
        };
        let verdict = authz.decide(&crate::authz::Subject {
            identity,
            port,
            http: Some((req.uri().path(), req.method())),
        });
        match verdict {
            crate::authz::Verdict::Allow => None,
            crate::authz::Verdict::DryRunDeny { policy } => {
                self.metrics.traffic.authz_dry_run(
                    &self.fixed_label,
                    &policy,
                    identity,
                    Some(req.uri().path()),
                    Some(req.method().as_str()),
                );
                None
            }
            crate::authz::Verdict::Deny { policy } => {
                self.metrics.traffic.authz_denied(
                    &policy,
                    identity,
                    Some(req.uri().path()),
                    Some(req.method().as_str()),
                );
                let mut resp = self.fail(labels, ErrorCode::Forbidden, grpc, start);
                let named = HeaderValue::from_str(&policy).ok();
                if let Some(v) = &named {
                    resp.headers_mut()
                        .insert(crate::errors::POLICY_HEADER, v.clone());
                }
                let why = format!("denied by Policy {policy}");
                if grpc {
                    if let Ok(v) = HeaderValue::from_str(&why) {
                        resp.headers_mut().insert("grpc-message", v);
                    }
                } else {
                    *resp.body_mut() = Either::Right(Full::new(Bytes::from(format!(
                        "weft-proxy: {}: {why}\n",
                        ErrorCode::Forbidden
                    ))));
                }
                Some(resp)
            }
        }
    }

    /// The inbound rate limit: `Some` refusal when the workload's limit has no token for
    /// this request.
    pub(crate) fn rate_limit(
        &self,
        labels: &RequestMetrics,
        grpc: bool,
        start: Instant,
    ) -> Option<Response<ProxyBody>> {
        if self.direction != crate::metrics::Direction::Inbound {
            return None;
        }
        let snapshot = self.store.load()?;
        let limiter = snapshot.inbound_limit.as_ref()?;
        // A per-client limit counts an identified client by identity, whatever address
        // it comes from; a plain-text one by address.
        let client = match (&self.client_identity, self.client) {
            (Some(id), _) => crate::ratelimit::ClientKey::Identity(id.clone()),
            (None, ip) => crate::ratelimit::ClientKey::Addr(
                ip.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            ),
        };
        match limiter.check(client, Instant::now()) {
            RateDecision::Allow => None,
            RateDecision::DryRunLimited => {
                self.metrics
                    .traffic
                    .dry_run(&self.fixed_label, DryRun::RateLimit);
                None
            }
            RateDecision::Limited { retry_after } => {
                self.metrics.traffic.rate_limited(limiter.name());
                let mut resp = self.fail(labels, ErrorCode::RateLimited, grpc, start);
                resp.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    crate::ratelimit::retry_after_header(retry_after),
                );
                Some(resp)
            }
        }
    }

    /// The outbound stages for a request to `service`. A service with a Route has its
    /// requests counted here (not on receipt): under the rule that takes one, or under
    /// the service alone when none does.
    pub(crate) async fn outbound<'a>(
        &self,
        snapshot: &Snapshot,
        service: &'a ServiceState,
        mut req: Request<RequestBody>,
        x: &mut Exchange<'a>,
    ) -> Response<ProxyBody> {
        let Some(route) = &service.route else {
            return self.send(Attempts::plain(service, x.start), req, x).await;
        };
        normalize(&mut req);
        let found = {
            let uri = req.uri();
            let input = MatchInput {
                path: uri.path(),
                query: uri.query(),
                method: req.method(),
                headers: req.headers(),
            };
            route.spec.find(&input)
        };
        let Some((index, rule, matched)) = found else {
            x.labels.request();
            return self.send(Attempts::plain(service, x.start), req, x).await;
        };
        if let Some(series) =
            route.rule_metrics(index, &self.metrics, self.direction, &service.label)
        {
            x.labels = series;
        }
        x.labels.request();
        let labels = RuleLabels {
            service,
            route: &route.spec.name,
            rule: &rule.label,
        };
        if let Some(trail) = x.trail.as_deref_mut() {
            trail.route = Some((route.spec.name.clone(), rule.label.clone()));
        }
        let deadline = deadline(x.start, rule.timeout.or(service.spec.response_timeout));

        if let Some(fault) = &rule.fault {
            let decision = fault.decide(&mut rand::rng());
            if let Some(delay) = decision.delay {
                labels.count(&self.metrics, RouteEvent::FaultDelayed);
                let until = tokio::time::Instant::now() + delay;
                match deadline {
                    Some(d) if d < until => {
                        tokio::time::sleep_until(d).await;
                        labels.count(&self.metrics, RouteEvent::ResponseTimeout);
                        return self.fail(x.labels, ErrorCode::ResponseTimeout, x.grpc, x.start);
                    }
                    _ => tokio::time::sleep_until(until).await,
                }
            }
            if let Some(abort) = decision.abort {
                labels.count(&self.metrics, RouteEvent::FaultInjected);
                return self.fault_abort(x, abort.status, abort.grpc_status);
            }
        }

        // The next proxy checks what it receives: a request this rule's edits take over a
        // limit is refused here, where the Route that did it is known, never there.
        if edit_request(&mut req, rule, matched)
            && let Err(refusal) = crate::http::check_request(&req, &self.limits)
        {
            tracing::debug!(
                reason = refusal.code.as_str(),
                route = %route.spec.name,
                rule = %rule.label,
                "request over a limit after the rule's edits"
            );
            if let Some(limit) = refusal.limit {
                self.metrics.limit_refused(limit);
            }
            return self.fail(x.labels, refusal.code, x.grpc, x.start);
        }

        let replay_wanted = rule.retry.as_ref().is_some_and(|r| r.attempts() > 0)
            || rule.mirror.is_some_and(|m| m.percentage > 0);
        let (req, replay) = match self
            .replayable(req, replay_wanted && x.on_upgrade.is_none())
            .await
        {
            Ok(r) => r,
            Err(code) => return self.fail(x.labels, code, x.grpc, x.start),
        };
        if let Some(mirror) = rule.mirror {
            self.mirror(snapshot, &req, &replay, mirror, labels);
        }

        let backend = match (&rule.split, rule.backends.as_slice()) {
            (Some(split), backends) => backends.get(split.pick(&mut rand::rng())),
            (None, []) => None,
            (None, _) => Some(&DRAINED),
        };
        let target = match backend {
            None => service,
            Some(Target::Service(i)) => match snapshot.services.get(*i) {
                Some(s) => s.as_ref(),
                None => service,
            },
            Some(Target::Drained) => {
                return self.backend_not_found(x, labels, "every backend of the rule has weight 0");
            }
            Some(Target::Missing(what)) => {
                tracing::debug!(backend = %what, route = %route.spec.name, "backend does not resolve");
                return self.backend_not_found(x, labels, &format!("{what} does not exist"));
            }
        };
        let budget = route
            .budgets
            .get(index)
            .and_then(Option::as_ref)
            .unwrap_or(&service.budget);
        let plan = Attempts {
            target: Pick::Service(target),
            retry: rule.retry.as_ref(),
            budget: Some(budget),
            deadline,
            per_try: rule.per_try_timeout,
            rule: Some(labels),
            response_headers: rule.response_headers.as_ref(),
        };
        self.send_replay(plan, req, replay, x).await
    }

    /// Reads a small body whole when retries or a mirror may need it again.
    async fn replayable(
        &self,
        req: Request<RequestBody>,
        wanted: bool,
    ) -> Result<(Request<RequestBody>, Replay), ErrorCode> {
        if !wanted {
            return Ok((req, Replay::Stream));
        }
        if req.body().is_end_stream() {
            return Ok((req, Replay::Copy(Bytes::new())));
        }
        let small = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= REPLAY_LIMIT);
        if !small {
            return Ok((req, Replay::Stream));
        }
        let (parts, body) = req.into_parts();
        let bytes = match body.collect().await {
            Ok(c) => c.to_bytes(),
            Err(error) => {
                tracing::debug!(%error, "reading the request body to keep a copy");
                return Err(error.code());
            }
        };
        Ok((
            Request::from_parts(parts, RequestBody::buffered(bytes.clone())),
            Replay::Copy(bytes),
        ))
    }

    /// Sends a copy of the request to the mirror's service, fire and forget: its response
    /// is dropped, its failures are logged at debug level, and at most
    /// [`crate::store::MIRROR_SLOTS`] copies are in flight per proxy.
    fn mirror(
        &self,
        snapshot: &Snapshot,
        req: &Request<RequestBody>,
        replay: &Replay,
        mirror: crate::rules::Mirror,
        labels: RuleLabels<'_>,
    ) {
        if mirror.percentage == 0 || rand::random_range(0..100u32) >= mirror.percentage {
            return;
        }
        let Replay::Copy(body) = replay else {
            labels.count(&self.metrics, RouteEvent::MirrorSkipped);
            return;
        };
        let Some(service) = snapshot.services.get(mirror.service).cloned() else {
            return;
        };
        let Ok(slot) = self.store.mirror_slots().clone().try_acquire_owned() else {
            labels.count(&self.metrics, RouteEvent::MirrorOverflow);
            return;
        };
        labels.count(&self.metrics, RouteEvent::Mirrored);
        let copy = RequestHead::of(req).request(body.clone());
        let resends = self.metrics.resends(self.direction).clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Some((_, endpoint)) = service.pick(None) else {
                return;
            };
            let endpoint = endpoint.clone();
            let _in_flight = endpoint.start();
            let sent = tokio::time::timeout(MIRROR_TIMEOUT, async {
                let (resp, lease) = endpoint.upstream.send(copy, &resends).await?;
                // Read to the end so that an HTTP/1 connection can be reused.
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        return Ok(());
                    }
                }
                if let Some(lease) = lease {
                    lease.release();
                }
                Ok::<_, SendError>(())
            })
            .await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%error, "mirrored request failed"),
                Err(_) => tracing::debug!("mirrored request timed out"),
            }
        });
    }

    /// The 500 of a request whose rule picked no backend, saying why in the body.
    fn backend_not_found(
        &self,
        x: &Exchange<'_>,
        labels: RuleLabels<'_>,
        why: &str,
    ) -> Response<ProxyBody> {
        labels.count(&self.metrics, RouteEvent::BackendNotFound);
        let code = ErrorCode::BackendNotFound;
        let mut resp = self.fail(x.labels, code, x.grpc, x.start);
        if !x.grpc {
            *resp.body_mut() = Either::Right(Full::new(Bytes::from(format!(
                "weft-proxy: {code}: {why}\n"
            ))));
        }
        resp
    }

    fn fault_abort(
        &self,
        x: &Exchange<'_>,
        status: StatusCode,
        grpc_status: u8,
    ) -> Response<ProxyBody> {
        self.metrics.error(self.direction, ErrorCode::FaultInjected);
        x.labels.response(status, x.start.elapsed().as_secs_f64());
        if x.grpc {
            let mut resp = grpc_error_response(ErrorCode::FaultInjected);
            resp.headers_mut()
                .insert("grpc-status", HeaderValue::from(u16::from(grpc_status)));
            resp
        } else {
            let mut resp = error_response(ErrorCode::FaultInjected);
            *resp.status_mut() = status;
            resp
        }
    }

    /// Sends a request whose body streams (no copy).
    pub(crate) async fn send(
        &self,
        plan: Attempts<'_>,
        req: Request<RequestBody>,
        x: &mut Exchange<'_>,
    ) -> Response<ProxyBody> {
        self.send_replay(plan, req, Replay::Stream, x).await
    }

    /// The attempts of one request: each to an endpoint the balancer picks (another one for
    /// each retry, when there is one), under the deadline and the per-try timeout, retried
    /// as the policy allows while the budget lasts.
    async fn send_replay(
        &self,
        plan: Attempts<'_>,
        req: Request<RequestBody>,
        replay: Replay,
        x: &mut Exchange<'_>,
    ) -> Response<ProxyBody> {
        let head = matches!(replay, Replay::Copy(_)).then(|| RequestHead::of(&req));
        // Without a policy, the retries that are always safe: a request that was never
        // sent, because no connection could be made, goes to another endpoint, at most
        // twice (Istio's default attempts). During a rolling update several endpoints can
        // be gone before the proxy hears of it.
        let max_retries = match (&plan.target, plan.retry) {
            (_, Some(policy)) => policy.attempts(),
            (Pick::Service(s), None) => {
                u32::try_from(s.endpoints.len().saturating_sub(1)).map_or(0, |n| n.min(2))
            }
            _ => 0,
        };
        if max_retries > 0
            && let Some(budget) = plan.budget
        {
            budget.deposit(Instant::now());
        }
        // Admission under the target service's Breaker (maxRequests): the permit is held
        // until the response body ends, riding in the endpoint's in-flight guard.
        let mut permit = match plan.target {
            Pick::Service(s) => match s.admit() {
                Ok(p) => Some(p),
                Err(_) => return self.fail(x.labels, ErrorCode::Overloaded, x.grpc, x.start),
            },
            Pick::Fixed(_) => None,
        };
        let record = |index: usize, outcome: Outcome| {
            if let Pick::Service(s) = plan.target {
                s.record(index, outcome);
            }
        };
        // Whether a peer proxy's "never sent" answer may be retried: as a failed connect.
        let unsent_retries = max_retries > 0
            && plan
                .retry
                .is_none_or(|p| p.retry_on_failure(Failure::ConnectFailed));
        // Whether a stream an HTTP/2 upstream refused, or left unprocessed as it went
        // away, may be retried: like a failed connect, it never reached the application.
        // Without a policy, once even where no other endpoint may take it: the endpoint is
        // not at fault, and a new connection to it takes the request.
        let max_refused_retries = match plan.retry {
            Some(_) => max_retries,
            None => max_retries.max(1),
        };
        let refused_retries = max_refused_retries > 0
            && plan
                .retry
                .is_none_or(|p| p.retry_on_failure(Failure::RefusedStream));
        // What is kept, beyond `head`, to send the request again if a meshed endpoint
        // answers that it never sent it, or an HTTP/2 upstream refuses its stream: the
        // head of a bodiless request, or the head of a gRPC request with the copy of its
        // body kept as it streams (gRPC clients send no `content-length`, so no retry
        // policy copies their bodies, yet a unary call's message has usually been read
        // whole by the time the peer answers).
        let mut unsent_copy: Option<(RequestHead, Option<Arc<BodyCopy>>)> = None;
        let mut next = Some(req);
        let mut exclude = None;
        let mut retries = 0u32;
        loop {
            let Some(mut req) = next.take() else {
                return self.fail(x.labels, ErrorCode::UpstreamFailed, x.grpc, x.start);
            };
            let (index, endpoint) = match plan.target {
                Pick::Fixed(e) => (0, e.clone()),
                Pick::Service(s) => match s.pick(exclude) {
                    Some((i, e)) => (i, e.clone()),
                    None => return self.fail(x.labels, ErrorCode::NoEndpoints, x.grpc, x.start),
                },
            };
            if let Some(trail) = x.trail.as_deref_mut() {
                trail.attempts += 1;
                trail.upstream = Some(endpoint.addr);
                trail.destination_identity = match plan.target {
                    Pick::Service(s) => {
                        s.spec.endpoints.get(index).and_then(|e| e.identity.clone())
                    }
                    Pick::Fixed(_) => None,
                };
            }
            // Only a meshed endpoint's proxy is trusted to say it never sent the request.
            let meshed = endpoint.upstream.tls().is_some();
            // A request that only the same endpoint may take again is copied only once the
            // endpoint has left a stream unprocessed: an endpoint that never does so costs
            // no copy.
            let keep = (meshed && unsent_retries)
                || (refused_retries
                    && (req.version() == Version::HTTP_2 || meshed)
                    && (max_retries > 0 || endpoint.upstream.refuses_streams()));
            if keep && head.is_none() && unsent_copy.is_none() {
                if req.body().is_end_stream() {
                    unsent_copy = Some((RequestHead::of(&req), None));
                } else if x.grpc && !longer_than(&req, REPLAY_LIMIT) {
                    let (parts, body) = req.into_parts();
                    let (body, copy) = body.tee(REPLAY_LIMIT);
                    req = Request::from_parts(parts, body);
                    unsent_copy = Some((RequestHead::of(&req), Some(copy)));
                }
            }
            let in_flight = endpoint.start();
            let sent = Instant::now();
            let try_deadline = match (plan.deadline, plan.per_try) {
                (d, None) => d,
                (None, Some(p)) => Some(tokio::time::Instant::from_std(sent) + p),
                (Some(d), Some(p)) => Some(d.min(tokio::time::Instant::from_std(sent) + p)),
            };
            let at = x
                .trail
                .as_ref()
                .is_some_and(|t| t.events.is_some())
                .then(std::time::SystemTime::now);
            let resends = self.metrics.resends(self.direction);
            let result = match try_deadline {
                Some(d) => tokio::time::timeout_at(d, endpoint.upstream.send(req, resends)).await,
                None => Ok(endpoint.upstream.send(req, resends).await),
            };
            if let Some(at) = at
                && let Some(events) = x.trail.as_deref_mut().and_then(|t| t.events.as_mut())
            {
                events.push(crate::trace::AttemptEvent {
                    at,
                    took: sent.elapsed(),
                    endpoint: endpoint.addr,
                    outcome: attempt_outcome(&result, x.body_watch.as_ref()),
                });
            }
            // What ended the attempt, when it was not a response to hand on.
            let (failure, code) = match result {
                Err(_) => {
                    // Dropping the attempt's future cancelled it upstream (stream reset or
                    // connection closed). When the attempt was waiting on the client to
                    // send more of its body, the endpoint had nothing to answer yet: the
                    // timeout is no sign of its health, for the balancer or the Breaker.
                    let client_stalled = x
                        .body_watch
                        .as_ref()
                        .is_some_and(BodyWatch::awaiting_client);
                    if client_stalled {
                        tracing::debug!(endpoint = %endpoint.addr, "timed out waiting for the client's request body");
                    } else {
                        endpoint.observe_failure_at(sent.elapsed(), Instant::now());
                        record(index, Outcome::ServerError);
                    }
                    let overall = plan
                        .deadline
                        .is_some_and(|d| tokio::time::Instant::now() >= d);
                    if overall {
                        tracing::debug!(endpoint = %endpoint.addr, "response timeout");
                        if let Some(r) = plan.rule {
                            r.count(&self.metrics, RouteEvent::ResponseTimeout);
                        }
                        return self.fail(x.labels, ErrorCode::ResponseTimeout, x.grpc, x.start);
                    }
                    tracing::debug!(endpoint = %endpoint.addr, "per-try timeout");
                    if let Some(r) = plan.rule {
                        r.count(&self.metrics, RouteEvent::PerTryTimeout);
                    }
                    (Failure::PerTryTimeout, ErrorCode::PerTryTimeout)
                }
                Ok(Ok((resp, _))) if unsolicited_switch(&resp, x.upgrade) => {
                    // hyper's HTTP/1 client takes any 101 as the end of HTTP on its
                    // connection; passed on, it would reach a client that asked for no new
                    // protocol (over HTTP/2, where 101 does not exist, a malformed stream).
                    // The application answered wrongly: a broken answer, like a reset.
                    tracing::debug!(endpoint = %endpoint.addr, "101 Switching Protocols to a request that asked for no upgrade");
                    record(index, Outcome::ServerError);
                    endpoint.observe_failure_at(sent.elapsed(), Instant::now());
                    (Failure::Reset, ErrorCode::UpstreamFailed)
                }
                Ok(Ok((resp, _))) if !Codings::of(resp.headers()).carried() => {
                    // `gzip, chunked` (or `chunked` twice, or a coding alone, read to the
                    // connection's close): hyper decoded the final `chunked` only, and the
                    // next hop frames the body anew with `Transfer-Encoding` gone, so the
                    // client would get a gzip body with nothing saying so. The request
                    // side refuses the same with 400; here the application answered
                    // wrongly, and the connection is not reused (the lease is dropped).
                    tracing::debug!(endpoint = %endpoint.addr, "response with a transfer coding the proxy cannot carry");
                    record(index, Outcome::ServerError);
                    endpoint.observe_failure_at(sent.elapsed(), Instant::now());
                    (Failure::Reset, ErrorCode::UpstreamFailed)
                }
                Ok(Ok((mut resp, lease))) => {
                    // Removed from every response: only an inbound proxy's own answers
                    // carry it (it removes the header from its application's), and no
                    // application is to see it.
                    let unsent = resp.headers_mut().remove(UNSENT_HEADER).is_some() && meshed;
                    let mut tried = false;
                    if unsent {
                        // The peer could not connect to its application: a failed connect,
                        // for the balancer and the Breaker as for retries.
                        tracing::debug!(endpoint = %endpoint.addr, "peer proxy never sent the request");
                        endpoint.penalize();
                        record(index, Outcome::ConnectFailure);
                        tried = unsent_retries;
                        let again = unsent_again(head.as_ref(), &replay, unsent_copy.as_ref());
                        if unsent_retries
                            && retries < max_retries
                            && again.is_some()
                            && self.may_retry(&plan)
                        {
                            self.metrics
                                .error(self.direction, peer_code(resp.headers()));
                            drop(resp);
                            drop(in_flight);
                            retries += 1;
                            exclude = Some(index);
                            next = again;
                            self.backoff(&plan, retries).await;
                            continue;
                        }
                    } else {
                        let done = Instant::now();
                        let took = done.saturating_duration_since(sent);
                        if crate::balance::is_failure(resp.status(), resp.headers()) {
                            endpoint.observe_failure_at(took, done);
                        } else {
                            endpoint.observe_at(took, done);
                        }
                        record(index, Outcome::of_status(resp.status()));
                    }
                    let retry = !tried
                        && retries < max_retries
                        && head.is_some()
                        && plan
                            .retry
                            .is_some_and(|p| p.retry_on_response(resp.status(), resp.headers()));
                    if retry && self.may_retry(&plan) {
                        drop(resp);
                        drop(in_flight);
                        retries += 1;
                        exclude = Some(index);
                        next = head.as_ref().zip(replay.copy()).map(|(h, b)| h.request(b));
                        self.backoff(&plan, retries).await;
                        continue;
                    }
                    let in_flight = match permit.take() {
                        Some(p) => in_flight.holding(p),
                        None => in_flight,
                    };
                    return self.respond(resp, lease, in_flight, &plan, x);
                }
                Ok(Err(SendError::Overloaded(_))) => {
                    // A pool limit refused it: no other endpoint of the service may take it.
                    return self.fail(x.labels, ErrorCode::Overloaded, x.grpc, x.start);
                }
                Ok(Err(mut error)) if error.is_connect() => {
                    drop(in_flight);
                    let code = if error.is_connection_limit() {
                        self.metrics.limit_refused(Limit::UpstreamHttp1Connections);
                        ErrorCode::UpstreamConnectionLimit
                    } else if error.is_connect_timeout() {
                        endpoint.penalize();
                        ErrorCode::ConnectTimeout
                    } else if let Some(failure) = error.tls_failure() {
                        endpoint.penalize();
                        self.metrics
                            .tls
                            .refused(crate::metrics::Direction::Outbound, failure);
                        failure.code()
                    } else {
                        endpoint.penalize();
                        ErrorCode::ConnectFailed
                    };
                    if !error.is_connection_limit() {
                        record(index, Outcome::ConnectFailure);
                    }
                    tracing::debug!(endpoint = %endpoint.addr, error = %error, "connect failed");
                    // The request was never sent: it can go elsewhere as it is.
                    next = error.take_unsent();
                    (Failure::ConnectFailed, code)
                }
                Ok(Err(error)) => {
                    tracing::debug!(endpoint = %endpoint.addr, error = %error, "upstream failed");
                    if let Some(code) = x.body_watch.as_ref().and_then(BodyWatch::code) {
                        // The client broke its body off: the upstream only saw it cut short.
                        return self.fail(x.labels, code, x.grpc, x.start);
                    }
                    record(index, Outcome::ServerError);
                    endpoint.observe_failure_at(sent.elapsed(), Instant::now());
                    if error.refused_stream() {
                        // Never processed (RFC 9113 §8.7): it may go elsewhere as it is.
                        next = unsent_again(head.as_ref(), &replay, unsent_copy.as_ref());
                        (Failure::RefusedStream, ErrorCode::UpstreamRefused)
                    } else {
                        (Failure::Reset, ErrorCode::UpstreamFailed)
                    }
                }
            };
            if next.is_none() {
                next = head.as_ref().zip(replay.copy()).map(|(h, b)| h.request(b));
            }
            let allowed = match plan.retry {
                Some(p) => p.retry_on_failure(failure),
                None => matches!(failure, Failure::ConnectFailed | Failure::RefusedStream),
            };
            let most = match failure {
                Failure::RefusedStream => max_refused_retries,
                _ => max_retries,
            };
            if retries < most && allowed && next.is_some() && self.may_retry(&plan) {
                self.metrics.error(self.direction, code);
                retries += 1;
                exclude = Some(index);
                self.backoff(&plan, retries).await;
                continue;
            }
            let mut resp = self.fail(x.labels, code, x.grpc, x.start);
            if self.direction == crate::metrics::Direction::Inbound
                && self.client_tls
                && code.never_sent()
            {
                // The peer proxy may send it elsewhere (see the module documentation).
                resp.headers_mut()
                    .insert(UNSENT_HEADER, HeaderValue::from_static("1"));
            }
            return resp;
        }
    }

    /// Whether the budget lets one more retry through (counting what it refuses, or
    /// would refuse in dry run).
    fn may_retry(&self, plan: &Attempts<'_>) -> bool {
        let Some(budget) = plan.budget else {
            return true;
        };
        match budget.withdraw(Instant::now()) {
            Withdrawal::Allowed => {}
            Withdrawal::Exhausted => {
                if let Some(r) = plan.rule {
                    r.count(&self.metrics, RouteEvent::RetryBudgetExhausted);
                }
                return false;
            }
            Withdrawal::DryRunExhausted => {
                let service = match (&plan.rule, &plan.target) {
                    (Some(r), _) => &r.service.label,
                    (None, Pick::Service(s)) => &s.label,
                    (None, Pick::Fixed(_)) => &self.fixed_label,
                };
                self.metrics.traffic.dry_run(service, DryRun::RetryBudget);
            }
        }
        if let Some(r) = plan.rule {
            r.count(&self.metrics, RouteEvent::Retry);
        }
        true
    }

    /// Waits before retry number `retry`, never past the deadline.
    async fn backoff(&self, plan: &Attempts<'_>, retry: u32) {
        let Some(policy) = plan.retry else {
            return;
        };
        let wait = policy.backoff().delay(retry, &mut rand::rng());
        let until = tokio::time::Instant::now() + wait;
        let until = plan.deadline.map_or(until, |d| d.min(until));
        tokio::time::sleep_until(until).await;
    }

    /// Hands an upstream response to the client: a tunnel for a switched protocol, or the
    /// body tracked until its end.
    fn respond(
        &self,
        mut resp: Response<Incoming>,
        lease: Option<Lease>,
        in_flight: crate::store::InFlight,
        plan: &Attempts<'_>,
        x: &mut Exchange<'_>,
    ) -> Response<ProxyBody> {
        let seconds = x.start.elapsed().as_secs_f64();
        let switched = (x.upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS)
            || (x.connect && resp.status().is_success());
        if switched && let Some(downstream) = x.on_upgrade.take() {
            let upstream = hyper::upgrade::on(&mut resp);
            *self.tunnel_slot() = Some(Tunnel {
                downstream,
                upstream,
                idle: self.limits.opaque_idle_timeout,
                metrics: self.metrics.clone(),
                _in_flight: in_flight,
            });
            strip_hop_by_hop(resp.headers_mut(), x.upgrade);
            x.labels.response(resp.status(), seconds);
            return resp.map(|_| Either::Right(Full::new(Bytes::new())));
        }
        let keep_alive = strip_hop_by_hop(resp.headers_mut(), false);
        if let (Some(lease), Some(timeout)) =
            (&lease, keep_alive.as_ref().and_then(keep_alive_timeout))
        {
            lease.server_idle_timeout(timeout);
        }
        single_content_length(resp.headers_mut());
        if let Some(edits) = plan.response_headers {
            edits.apply(resp.headers_mut());
        }
        x.labels.response(resp.status(), seconds);
        let deadline = plan.deadline;
        resp.map(|inner| {
            Either::Left(TrackedBody {
                inner,
                _in_flight: in_flight,
                lease,
                // An answer to HEAD has no content (RFC 9110 §9.3.2): an HTTP/1 upstream's
                // is empty already, while an HTTP/2 application that sends DATA breaks
                // the protocol, and its stream's error would reset the client's stream
                // after a whole head. Nothing of it is read: the head goes on as the end.
                ended: x.head,
                log: None,
                bytes: 0,
                failed: None,
                deadline: deadline.map(|d| {
                    (
                        Box::pin(tokio::time::sleep_until(d)),
                        self.metrics.clone(),
                        self.direction,
                    )
                }),
            })
        })
    }
}

impl Replay {
    fn copy(&self) -> Option<Bytes> {
        match self {
            Replay::Copy(b) => Some(b.clone()),
            Replay::Stream => None,
        }
    }
}

fn deadline(start: Instant, timeout: Option<Duration>) -> Option<tokio::time::Instant> {
    timeout.map(|t| tokio::time::Instant::from_std(start) + t)
}

/// Replaces the request's path with its normalized form, which both matching and the
/// upstream see.
fn normalize<B>(req: &mut Request<B>) {
    let uri = req.uri();
    let path = uri.path();
    let std::borrow::Cow::Owned(normal) = normalize_path(path) else {
        return;
    };
    set_path(req, &normal);
}

fn set_path<B>(req: &mut Request<B>, path: &str) {
    let uri = req.uri();
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let Ok(pq) = PathAndQuery::from_str(&target) else {
        return;
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq);
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// Applies the rule's request header edits and path rewrite; whether it has any.
fn edit_request(req: &mut Request<RequestBody>, rule: &Rule, matched: Option<usize>) -> bool {
    if let Some(edits) = &rule.request_headers {
        edits.apply(req.headers_mut());
    }
    if let Some(rewrite) = &rule.rewrite {
        let prefix = matched
            .and_then(|m| rule.matches.get(m))
            .and_then(|m| m.prefix());
        let path = rewrite.apply(req.uri().path(), prefix);
        set_path(req, &path);
    }
    rule.request_headers.is_some() || rule.rewrite.is_some()
}

/// How an attempt ended, for its span event.
fn attempt_outcome<T>(
    result: &Result<Result<(Response<Incoming>, T), SendError>, tokio::time::error::Elapsed>,
    body_watch: Option<&BodyWatch>,
) -> crate::trace::AttemptOutcome {
    use crate::trace::AttemptOutcome::{Failed, Status};
    match result {
        Ok(Ok((resp, _))) => Status(resp.status().as_u16()),
        Err(_) => Failed("timeout"),
        Ok(Err(SendError::Overloaded(_))) => Failed(ErrorCode::Overloaded.as_str()),
        Ok(Err(e)) if e.is_connect_timeout() => Failed(ErrorCode::ConnectTimeout.as_str()),
        Ok(Err(e)) if e.is_connect() => Failed(ErrorCode::ConnectFailed.as_str()),
        Ok(Err(e)) if e.refused_stream() => Failed(ErrorCode::UpstreamRefused.as_str()),
        Ok(Err(_)) => Failed(
            body_watch
                .and_then(BodyWatch::code)
                .unwrap_or(ErrorCode::UpstreamFailed)
                .as_str(),
        ),
    }
}

/// Whether `resp` switches protocols (`101`) although its request asked for no upgrade.
/// hyper's HTTP/1 client passes other `1xx` answers over (and HTTP/2's skips them all), so
/// a final response is never another `1xx`.
fn unsolicited_switch<B>(resp: &Response<B>, upgrade: bool) -> bool {
    resp.status() == StatusCode::SWITCHING_PROTOCOLS && !upgrade
}

/// The code a peer proxy gave (in `weft-error`) for a request it never sent, for this
/// proxy's count of the retry; `connect_failed` when it names no such code.
fn peer_code(headers: &HeaderMap) -> ErrorCode {
    headers
        .get(crate::errors::ERROR_HEADER)
        .and_then(|v| {
            ErrorCode::ALL
                .into_iter()
                .find(|c| c.never_sent() && c.as_str().as_bytes() == v.as_bytes())
        })
        .unwrap_or(ErrorCode::ConnectFailed)
}

/// Whether the request's `content-length` says its body is longer than `limit` bytes.
fn longer_than<B>(req: &Request<B>, limit: u64) -> bool {
    req.headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > limit)
}

/// The request again, to send it elsewhere after an answer that it was never sent or
/// processed: from the retry policy's copy, or from what was kept for this case (a
/// bodiless request's head; a gRPC body only if it had ended, within the limit, before
/// the answer came, since a part of it would not be the same request).
fn unsent_again(
    head: Option<&RequestHead>,
    replay: &Replay,
    kept: Option<&(RequestHead, Option<Arc<BodyCopy>>)>,
) -> Option<Request<RequestBody>> {
    match (head, kept) {
        (Some(h), _) => replay.copy().map(|b| h.request(b)),
        (None, Some((h, None))) => Some(h.request(Bytes::new())),
        (None, Some((h, Some(copy)))) => copy.whole().map(|b| h.request(b)),
        (None, None) => None,
    }
}
