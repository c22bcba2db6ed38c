//! The identity endpoint: `POST /weft.identity.v1/certify` (see [`weft_api::identity`]).
//!
//! ```text
//!  request ─▶ source's place (≤ max_in_flight_per_source per address) ─full─▶ 429 at once
//!     └─▶ in-flight slot (≤ max_in_flight, wait ≤ in_flight_wait) ─full─▶ 429
//!     └─▶ body ≤ MAX_REQUEST_BYTES ─▶ CertifyRequest ─▶ CSR parses, self-signature ok
//!     └─▶ weft-pod header ─▶ TokenReview (push::auth: caches, per-source limit)
//!     └─▶ token's namespace = weft-pod's, token's pod = weft-pod's (if bound),
//!         identity asked (request, CSR URI SANs) = the token's SPIFFE ID
//!     └─▶ per-identity bucket (SPIFFE ID and pod) ─empty─▶ 429
//!     └─▶ IdentityCa::issue ─▶ 200 CertifyResponse
//! ```
//!
//! Cheap checks come before the TokenReview, so garbage costs the API server nothing.
//! Every answer is counted: issued, or refused by reason, and its latency; a request its
//! client gives up on before the answer is counted too, by the step it was at.
//!
//! Every wait is bounded so that a proxy, which gives up after its own 10 s
//! (`REQUEST_TIMEOUT` in `weft-proxy`'s identity client), gets the answer and its reason:
//! at most 2 s for a slot, 1 s for a TokenReview slot and 5 s for the TokenReview, 8 s in
//! all (plus the time the client itself takes to send its body).

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use weft_api::identity::{
    CERTIFY_PATH, CertifyRequest, CertifyResponse, IdentityError, MAX_REQUEST_BYTES, reason,
    spiffe_id,
};
use weft_api::push::POD_HEADER;

use super::ca::{Csr, CsrError, IdentityCa};
use crate::{
    index::ObjectKey,
    metrics::Metrics,
    push::auth::{AuthError, AuthLimits, TokenReviewer},
    rate::{KeyedBuckets, KeyedSlots},
};

/// Identities whose issuance rate is remembered at most (idle ones are forgotten first).
const IDENTITIES_MAX: usize = 100_000;
/// How long a client may take to send its request body once it holds an in-flight slot.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoint's bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct IdentityLimits {
    /// Requests being answered at once.
    pub max_in_flight: usize,
    /// Requests one source address may have in flight (waiting for a slot included);
    /// more are refused at once. `None`: no per-source bound.
    pub max_in_flight_per_source: Option<NonZeroUsize>,
    /// How long a request waits for a slot before it is refused (429).
    pub in_flight_wait: Duration,
    /// Certificates one identity (per pod, for pod-bound tokens) may get per second,
    /// sustained.
    pub per_identity_rate: f64,
    /// Certificates one identity may get in a burst.
    pub per_identity_burst: u32,
    /// The TokenReview caches and limits (per source address, in flight).
    pub auth: AuthLimits,
    /// Connections open at once; more are closed as soon as accepted (see
    /// [`crate::https`], which also closes connections idle for 10 s).
    pub max_connections: usize,
    /// Connections one address holds open at once; more from it are closed as soon as
    /// accepted. `None`: no bound per address.
    pub max_connections_per_address: Option<NonZeroUsize>,
}

impl Default for IdentityLimits {
    fn default() -> Self {
        IdentityLimits {
            max_in_flight: 256,
            // A proxy sends one request at a time (it retries only after an answer), so
            // one pod address has one in flight; 4 leaves room for a restarted container's
            // request racing its predecessor's, and keeps one client opening many slow
            // requests from holding more than 4 of the 256 slots.
            max_in_flight_per_source: NonZeroUsize::new(4),
            in_flight_wait: Duration::from_secs(2),
            // A proxy asks once at start and renews at 65–75 % of 24 h; a few retries on
            // start-up failures fit in the burst, a loop does not.
            per_identity_rate: 0.1,
            per_identity_burst: 10,
            auth: AuthLimits {
                // A node's pods restarting together (up to ~110) behind one address.
                source_rate: 20.0,
                source_burst: 200,
                max_in_flight: 32,
                // The slot wait (2 s), the review slot wait (1 s) and this make 8 s, under
                // the proxy's 10 s, so a slow API server is answered `unavailable` with
                // its reason rather than left to the proxy's timeout.
                review_timeout: Duration::from_secs(5),
                ..AuthLimits::default()
            },
            max_connections: crate::https::DEFAULT_MAX_CONNECTIONS,
            // A proxy holds one connection while it asks, so one pod address needs one.
            // Behind one NATed address a node's proxies are bounded first by the 4
            // requests in flight per source; this caps connections that sit open, so
            // that one client can no longer take all 1024.
            max_connections_per_address: NonZeroUsize::new(64),
        }
    }
}

/// Answers certificate requests.
pub struct IdentityServer {
    ca: Arc<IdentityCa>,
    reviewer: TokenReviewer,
    trust_domain: String,
    lifetime: Duration,
    in_flight: Semaphore,
    in_flight_wait: Duration,
    per_source: Option<KeyedSlots<IpAddr>>,
    per_identity: KeyedBuckets<String>,
    max_connections: usize,
    max_connections_per_address: Option<NonZeroUsize>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for IdentityServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityServer")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// The step a request is at, for a request abandoned there by its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Waiting for its source's place or an in-flight slot.
    Slot,
    /// Reading the body.
    Body,
    /// Waiting for the TokenReview (or another request's review of the same token).
    Review,
    /// Past the review: the identity checks and signing (no await: never abandoned).
    Issue,
}

impl Step {
    /// The label of `weft_operator_identity_abandoned_total{step}`.
    fn as_str(self) -> &'static str {
        match self {
            Step::Slot => "slot",
            Step::Body => "body",
            Step::Review => "token_review",
            Step::Issue => "issue",
        }
    }
}

/// A request being answered: if it is dropped before its answer (its client reset the
/// stream or closed the connection), the step it was at is counted and logged.
struct Pending<'a> {
    metrics: &'a Metrics,
    peer: SocketAddr,
    started: Instant,
    step: Step,
    answered: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let (peer, step, waited) = (self.peer, self.step.as_str(), self.started.elapsed());
        self.metrics.identity_abandoned(step);
        // A slow API server shows here; a client going away early is its own business.
        if self.step == Step::Review {
            tracing::warn!(%peer, step, ?waited, "certificate request abandoned by the client");
        } else {
            tracing::debug!(%peer, step, ?waited, "certificate request abandoned by the client");
        }
    }
}

/// A refusal: the status, the reason code and what happened.
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            message: message.into(),
        }
    }
}

fn from_auth(error: AuthError) -> Refusal {
    let (status, code) = match &error {
        AuthError::NoToken | AuthError::Rejected(_) | AuthError::CachedRejection(_) => {
            (StatusCode::UNAUTHORIZED, reason::TOKEN_INVALID)
        }
        AuthError::NotForUs(_) => (StatusCode::FORBIDDEN, reason::NOT_A_SERVICE_ACCOUNT),
        AuthError::RateLimited => (StatusCode::TOO_MANY_REQUESTS, reason::RATE_LIMITED),
        AuthError::Busy => (StatusCode::SERVICE_UNAVAILABLE, reason::REVIEWS_BUSY),
        AuthError::Review(_) | AuthError::ReviewTimeout => {
            (StatusCode::SERVICE_UNAVAILABLE, reason::UNAVAILABLE)
        }
    };
    Refusal::new(status, code, error.to_string())
}

fn from_csr(error: CsrError) -> Refusal {
    let code = match &error {
        CsrError::UnsupportedKey(_) => reason::UNSUPPORTED_KEY,
        CsrError::Invalid(_) | CsrError::OtherIdentity { .. } => reason::BAD_REQUEST,
    };
    Refusal::new(StatusCode::BAD_REQUEST, code, error.to_string())
}

impl IdentityServer {
    /// An endpoint issuing from `ca` for `trust_domain`, certificates valid `lifetime`,
    /// tokens reviewed with `client` for `audience`; counted in `metrics`.
    pub fn new(
        ca: Arc<IdentityCa>,
        client: kube::Client,
        audience: String,
        trust_domain: String,
        lifetime: Duration,
        limits: IdentityLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        IdentityServer {
            ca,
            reviewer: TokenReviewer::new(client, vec![audience], limits.auth),
            trust_domain,
            lifetime,
            in_flight: Semaphore::new(limits.max_in_flight.max(1)),
            in_flight_wait: limits.in_flight_wait,
            per_source: limits.max_in_flight_per_source.map(KeyedSlots::new),
            per_identity: KeyedBuckets::new(
                limits.per_identity_rate,
                limits.per_identity_burst,
                IDENTITIES_MAX,
            ),
            max_connections: limits.max_connections,
            max_connections_per_address: limits.max_connections_per_address,
            metrics,
        }
    }

    /// The CA this endpoint issues from.
    pub fn ca(&self) -> &Arc<IdentityCa> {
        &self.ca
    }

    /// How the endpoint's server bounds its connections.
    pub fn conn_limits(&self) -> crate::https::ConnLimits {
        crate::https::ConnLimits {
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
            ..crate::https::ConnLimits::default()
        }
    }

    /// The endpoint's connection counts.
    pub fn conn_metrics(&self) -> crate::https::ConnMetrics {
        self.metrics.identity_connections()
    }

    /// Answers one request from `peer`.
    pub async fn answer(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let mut pending = Pending {
            metrics: &self.metrics,
            peer,
            started,
            step: Step::Slot,
            answered: false,
        };
        let answer = self.certify(req, peer, &mut pending.step).await;
        pending.answered = true;
        self.metrics.identity_answered(started.elapsed());
        match answer {
            Ok(resp) => {
                self.metrics.identity_issued();
                json(StatusCode::OK, &resp)
            }
            Err(refusal) => {
                self.metrics.identity_refusal(refusal.reason);
                // A flood is counted by the metric, not logged line by line.
                if matches!(
                    refusal.reason,
                    reason::RATE_LIMITED
                        | reason::SOURCE_IN_FLIGHT
                        | reason::TOO_LARGE
                        | reason::REVIEWS_BUSY
                ) {
                    tracing::debug!(%peer, reason = refusal.reason, message = %refusal.message, "certificate refused");
                } else {
                    tracing::warn!(%peer, reason = refusal.reason, message = %refusal.message, "certificate refused");
                }
                let mut resp = json(
                    refusal.status,
                    &IdentityError {
                        reason: refusal.reason.to_owned(),
                        message: refusal.message,
                    },
                );
                if refusal.status == StatusCode::TOO_MANY_REQUESTS
                    || refusal.reason == reason::REVIEWS_BUSY
                {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                }
                resp
            }
        }
    }

    /// The answer to `req`; `step` follows its progress.
    async fn certify(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        step: &mut Step,
    ) -> Result<CertifyResponse, Refusal> {
        if req.method() != Method::POST || req.uri().path() != CERTIFY_PATH {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                reason::BAD_REQUEST,
                format!("only POST {CERTIFY_PATH} is served here"),
            ));
        }
        // Refused at once, not after the wait: a source over its share is the flood the
        // bound is for, and waiting would let it hold the queue.
        let source = peer.ip().to_canonical();
        let _source_slot = match &self.per_source {
            None => None,
            Some(slots) => Some(slots.try_hold(source).ok_or_else(|| {
                Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    reason::SOURCE_IN_FLIGHT,
                    format!(
                        "{} already has {} certificate requests in progress, as many as one \
                         source may; retry later",
                        source,
                        slots.max()
                    ),
                )
            })?),
        };
        let Ok(Ok(_slot)) =
            tokio::time::timeout(self.in_flight_wait, self.in_flight.acquire()).await
        else {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                reason::RATE_LIMITED,
                "too many certificate requests in progress; retry later",
            ));
        };
        let too_large = || {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                reason::TOO_LARGE,
                format!("the request body is larger than {MAX_REQUEST_BYTES} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_REQUEST_BYTES as u64) {
            return Err(too_large());
        }
        let pod = req
            .headers()
            .get(POD_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(ObjectKey::parse)
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    reason::BAD_REQUEST,
                    format!("the {POD_HEADER} header must name the pod as namespace/name"),
                )
            })?;
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        // The in-flight slot is held while the body arrives: a client trickling it gets
        // BODY_TIMEOUT, not the slot for as long as it likes.
        *step = Step::Body;
        let body = tokio::time::timeout(
            BODY_TIMEOUT,
            Limited::new(req.into_body(), MAX_REQUEST_BYTES).collect(),
        )
        .await
        .map_err(|_| {
            Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                reason::BAD_REQUEST,
                format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            )
        })?
        .map_err(|e| match e.downcast_ref::<LengthLimitError>() {
            Some(_) => too_large(),
            // A client that went away mid-body sent nothing too large.
            None => Refusal::new(
                StatusCode::BAD_REQUEST,
                reason::BAD_REQUEST,
                format!("reading the body: {e}"),
            ),
        })?
        .to_bytes();
        let request: CertifyRequest = serde_json::from_slice(&body).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                reason::BAD_REQUEST,
                format!("the body is not a CertifyRequest: {e}"),
            )
        })?;
        let csr = Csr::from_pem(&request.csr).map_err(from_csr)?;

        *step = Step::Review;
        let id = self
            .reviewer
            .authenticate(token.as_deref(), peer.ip(), &self.metrics)
            .await
            .map_err(from_auth)?;
        *step = Step::Issue;
        let mismatch =
            |m: String| Refusal::new(StatusCode::FORBIDDEN, reason::IDENTITY_MISMATCH, m);
        if id.namespace != pod.namespace {
            return Err(mismatch(format!(
                "the token is for namespace {}, {POD_HEADER} names {pod}",
                id.namespace
            )));
        }
        if let Some(bound) = &id.pod
            && *bound != pod.name
        {
            return Err(mismatch(format!(
                "the token is bound to pod {bound}, {POD_HEADER} names {pod}"
            )));
        }
        let identity = spiffe_id(&self.trust_domain, &id.namespace, &id.service_account);
        if let Some(asked) = &request.identity
            && *asked != identity
        {
            return Err(mismatch(format!(
                "the request asks for {asked}, the token proves {identity}"
            )));
        }
        csr.check_identity(&identity)
            .map_err(|e| mismatch(e.to_string()))?;
        let key = match &id.pod {
            Some(p) => format!("{identity}#{p}"),
            None => identity.clone(),
        };
        if !self.per_identity.take(key) {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                reason::RATE_LIMITED,
                format!("too many certificates for {identity} ({pod}); retry later"),
            ));
        }
        let issued = self.ca.issue(&csr, &identity, self.lifetime).map_err(|e| {
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                reason::UNAVAILABLE,
                format!("signing failed: {e}"),
            )
        })?;
        let not_after = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        tracing::info!(%identity, %pod, serial = %issued.serial, not_after, "issued a certificate");
        Ok(CertifyResponse {
            identity,
            certificate_chain: issued.chain_pem,
            trust_bundle: self.ca.trust_bundle().to_owned(),
            not_after,
        })
    }
}

impl crate::https::Handler for IdentityServer {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        self.answer(req, peer).await
    }
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    // These types always serialize; an empty body would still carry the status.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_reviewer_is_its_own_reason_not_unavailable() {
        let busy = from_auth(AuthError::Busy);
        assert_eq!(
            (busy.status, busy.reason),
            (StatusCode::SERVICE_UNAVAILABLE, reason::REVIEWS_BUSY)
        );
        assert_eq!(
            busy.reason,
            AuthError::Busy.reason(),
            "the push port's label for it"
        );
        let failed = from_auth(AuthError::ReviewTimeout);
        assert_eq!(
            (failed.status, failed.reason),
            (StatusCode::SERVICE_UNAVAILABLE, reason::UNAVAILABLE)
        );
    }

    #[test]
    fn a_key_peers_would_not_accept_is_its_own_reason() {
        let unsupported = from_csr(CsrError::UnsupportedKey("an RSA key of 1024 bits".into()));
        assert_eq!(
            (unsupported.status, unsupported.reason),
            (StatusCode::BAD_REQUEST, reason::UNSUPPORTED_KEY)
        );
        assert!(
            unsupported.message.contains("1024 bits"),
            "{}",
            unsupported.message
        );
        let garbage = from_csr(CsrError::Invalid(
            rcgen::Error::CouldNotParseCertificationRequest,
        ));
        assert_eq!(garbage.reason, reason::BAD_REQUEST);
    }
}
