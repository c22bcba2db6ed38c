//! The config push protocol between `weft-operator` and `weft-proxy` (`weft.push.v1`).
//!
//! One HTTP/2 request per subscription, full duplex:
//!
//! ```text
//! proxy                                             operator
//!   POST /weft.push.v1/subscribe  ─────────────────▶  (TokenReview of the bearer token,
//!     authorization: Bearer <SA token>                  pod identity from the headers)
//!     weft-pod: <namespace>/<name>
//!   ◀───────────── 200, body: Update (full) , Update (delta), Update (delta) ...
//!   body: Ack / Nack, Ack ... ─────────────────────▶
//! ```
//!
//! Both bodies are sequences of frames: a 4-byte big-endian length, then that many bytes of
//! one JSON message ([`ServerMessage`] from the operator, [`ClientMessage`] from the proxy).
//! `docs/protocol.md` states the compatibility rules: within `v1`, fields are only added,
//! never renamed or re-typed, and unknown fields of the push messages are ignored by
//! readers — except inside a [`ServiceConfig`], where the proxy rejects them (NACK), since
//! a setting it does not know is one it cannot enforce; anything else is a new path
//! (`weft.push.v2`).

use serde::{Deserialize, Serialize};

use crate::proxy_config::{EndpointConfig, InboundConfig, ServiceConfig};

/// The request path of a subscription.
pub const SUBSCRIBE_PATH: &str = "/weft.push.v1/subscribe";

/// The request header naming the subscribing pod as `namespace/name`.
pub const POD_HEADER: &str = "weft-pod";

/// The request header listing the optional protocol features the proxy understands,
/// comma-separated. The operator uses a feature only with proxies that list it, so an
/// older proxy never receives a field it would ignore.
pub const FEATURES_HEADER: &str = "weft-push-features";

/// Feature: the proxy applies [`Update::endpoints`] (per-endpoint deltas).
pub const FEATURE_ENDPOINT_DELTAS: &str = "endpoint-deltas";

/// Feature: the proxy enforces traffic policy: a [`ServiceConfig`]'s `route`,
/// `retryBudget` and `breaker`, and [`Update::inbound`]. The operator sends them only to
/// proxies that list it.
pub const FEATURE_TRAFFIC_POLICY: &str = "traffic-policy";

/// The largest frame either side accepts (16 MiB): a full snapshot of a large mesh fits,
/// a corrupt length prefix does not make a reader allocate gigabytes.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A message from the operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage {
    /// A new config version for this proxy.
    Update(Update),
}

/// One config version, as a full snapshot or as a delta to the previous update on the same
/// stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Update {
    /// The version this update brings the proxy to. Increases on a stream; the proxy echoes
    /// it in its [`Ack`] or [`Nack`].
    pub version: u64,
    /// `true`: the proxy's services are exactly `services` (the first update on every
    /// stream is full). `false`: `services` are upserted and `removed` deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
    /// Services added or changed (all of them when `full`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceConfig>,
    /// Names of services removed since the previous update (empty when `full`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// The Weft resources (and their generations) this version implements, when they
    /// changed since the previous update on the stream; `None` means unchanged. Used by
    /// the operator for `Programmed`, and shown by the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<ResourceRef>>,
    /// Services (already on the stream) whose endpoints alone changed, as per-endpoint
    /// changes; sent only to proxies that announced [`FEATURE_ENDPOINT_DELTAS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointDelta>,
    /// The proxy's inbound settings (its workload's rate limit), sent only to proxies that
    /// announced [`FEATURE_TRAFFIC_POLICY`]. In a full update, absent means none; in a
    /// delta, absent means unchanged (an empty object clears them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundConfig>,
}

/// The endpoint changes of one service, which otherwise stays as it was on the stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointDelta {
    /// The service's name.
    pub service: String,
    /// Endpoints added or changed, matched by address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upserted: Vec<EndpointConfig>,
    /// Addresses of endpoints removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

impl EndpointDelta {
    /// The delta that turns `old` into `new`, when they differ in endpoints alone, `new`'s
    /// endpoints are in address order (the order [`EndpointDelta::apply`] leaves), and the
    /// delta is smaller than resending the service; `None` otherwise.
    pub fn between(old: &ServiceConfig, new: &ServiceConfig) -> Option<EndpointDelta> {
        // Destructured so that a field added to ServiceConfig must be considered here.
        let ServiceConfig {
            name,
            addresses,
            protocol,
            balancer,
            timeout,
            connect_timeout,
            endpoints,
            route,
            retry_budget,
            breaker,
            unknown,
        } = new;
        if *name != old.name
            || *addresses != old.addresses
            || *protocol != old.protocol
            || *balancer != old.balancer
            || *timeout != old.timeout
            || *connect_timeout != old.connect_timeout
            || *route != old.route
            || *retry_budget != old.retry_budget
            || *breaker != old.breaker
            || *unknown != old.unknown
            || !endpoints.is_sorted_by(|a, b| a.address < b.address)
        {
            return None;
        }
        let before: std::collections::BTreeMap<&str, &EndpointConfig> = old
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e))
            .collect();
        let upserted: Vec<EndpointConfig> = endpoints
            .iter()
            .filter(|e| before.get(e.address.as_str()) != Some(e))
            .cloned()
            .collect();
        let after: std::collections::BTreeSet<&str> =
            endpoints.iter().map(|e| e.address.as_str()).collect();
        let removed: Vec<String> = old
            .endpoints
            .iter()
            .filter(|e| !after.contains(e.address.as_str()))
            .map(|e| e.address.clone())
            .collect();
        let changes = upserted.len() + removed.len();
        (changes > 0 && changes < endpoints.len().max(old.endpoints.len())).then(|| EndpointDelta {
            service: name.clone(),
            upserted,
            removed,
        })
    }

    /// Applies the delta to `svc`, whose endpoints end in address order.
    pub fn apply(&self, svc: &mut ServiceConfig) {
        let gone: std::collections::BTreeSet<&str> = self
            .removed
            .iter()
            .map(String::as_str)
            .chain(self.upserted.iter().map(|u| u.address.as_str()))
            .collect();
        svc.endpoints.retain(|e| !gone.contains(e.address.as_str()));
        svc.endpoints.extend(self.upserted.iter().cloned());
        svc.endpoints.sort_by(|a, b| a.address.cmp(&b.address));
    }
}

/// A Weft resource at one generation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRef {
    /// `Route`, `Policy` or `Breaker`.
    pub kind: String,
    /// The resource's namespace.
    pub namespace: String,
    /// The resource's name.
    pub name: String,
    /// The resource's `metadata.generation`.
    pub generation: i64,
    /// What enforcing this generation takes, one entry per part of the spec that needs a
    /// proxy feature: the proxy enforces the resource only if it has every one of them
    /// (see [`Enforcement`]). Empty: nothing (the resource changes no proxy behaviour).
    /// Absent in [`Enforcement`]'s lists, where the reference alone names the resource.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<Requirement>,
}

impl ResourceRef {
    /// Whether `other` names the same resource at the same generation (requirements aside).
    pub fn same(&self, other: &ResourceRef) -> bool {
        self.generation == other.generation
            && self.name == other.name
            && self.namespace == other.namespace
            && self.kind == other.kind
    }

    /// The reference without its requirements, as a proxy reports it.
    pub fn bare(&self) -> ResourceRef {
        ResourceRef {
            requires: Vec::new(),
            ..self.clone()
        }
    }
}

/// One part of a resource's spec and the proxy feature enforcing it takes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Requirement {
    /// The feature, one of the names in [`feature`]; a name this proxy does not know is
    /// a feature it does not have.
    pub feature: String,
    /// Where the resource uses it, as a field path users know from `kubectl explain`
    /// and API-server messages, such as `spec.rules[0].retries`.
    pub field: String,
}

/// The enforcement features a resource may require ([`Requirement::feature`]). A proxy
/// enforces a resource only when it has the feature of every requirement, and says so in
/// its [`Enforcement`] report.
pub mod feature {
    /// A Route rule's weighted split across backend Services.
    pub const ROUTE_BACKENDS: &str = "route.backends";
    /// A Route rule's request timeout.
    pub const ROUTE_TIMEOUT: &str = "route.timeout";
    /// A Route rule's request matches (path, method, headers, query parameters).
    pub const ROUTE_MATCHES: &str = "route.matches";
    /// A Route rule's per-attempt timeout.
    pub const ROUTE_PER_TRY_TIMEOUT: &str = "route.perTryTimeout";
    /// A Route rule's retries.
    pub const ROUTE_RETRIES: &str = "route.retries";
    /// A Route rule's fault injection.
    pub const ROUTE_FAULT: &str = "route.fault";
    /// A Route rule's traffic mirror.
    pub const ROUTE_MIRROR: &str = "route.mirror";
    /// A Route rule's request header edits.
    pub const ROUTE_REQUEST_HEADERS: &str = "route.requestHeaders";
    /// A Route rule's response header edits.
    pub const ROUTE_RESPONSE_HEADERS: &str = "route.responseHeaders";
    /// A Route rule's path rewrite.
    pub const ROUTE_REWRITE: &str = "route.rewrite";
    /// A Policy's mutual-TLS mode (`Strict` or `Permissive`: the proxy must speak mTLS).
    pub const POLICY_MTLS: &str = "policy.mtls";
    /// A Policy's allow and deny rules and its `Deny` default.
    pub const POLICY_AUTHORIZATION: &str = "policy.authorization";
    /// A Policy's rate limit.
    pub const POLICY_RATE_LIMIT: &str = "policy.rateLimit";
    /// A Breaker's outlier ejection.
    pub const BREAKER_OUTLIER_DETECTION: &str = "breaker.outlierDetection";
    /// A Breaker's connection-pool limits.
    pub const BREAKER_CONNECTION_POOL: &str = "breaker.connectionPool";

    /// The features whose settings travel in the fields [`super::FEATURE_TRAFFIC_POLICY`]
    /// guards (a service's `route` and `breaker`, and `inbound`): only a proxy that lists
    /// that protocol feature can have them. [`POLICY_MTLS`] and [`POLICY_AUTHORIZATION`]
    /// travel in `inbound` too but are not listed: a proxy enforces the first only with
    /// a mesh certificate, and the operator treats both as needing the feature.
    pub const TRAFFIC_POLICY: [&str; 13] = [
        ROUTE_BACKENDS,
        ROUTE_TIMEOUT,
        ROUTE_MATCHES,
        ROUTE_PER_TRY_TIMEOUT,
        ROUTE_RETRIES,
        ROUTE_FAULT,
        ROUTE_MIRROR,
        ROUTE_REQUEST_HEADERS,
        ROUTE_RESPONSE_HEADERS,
        ROUTE_REWRITE,
        POLICY_RATE_LIMIT,
        BREAKER_OUTLIER_DETECTION,
        BREAKER_CONNECTION_POOL,
    ];
}

/// What a proxy enforces of the resources of the version it acknowledges: the proxy
/// decides, since only it knows its features.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Enforcement {
    /// The proxy's name and version (`weft-proxy 0.1.0`), for status messages.
    pub proxy: String,
    /// The resources (without requirements) it enforces fully.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enforced: Vec<ResourceRef>,
    /// The resources it carries but does not enforce fully, with the parts it does not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_enforced: Vec<NotEnforced>,
}

/// A resource a proxy does not enforce fully.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotEnforced {
    /// The resource (without requirements).
    pub resource: ResourceRef,
    /// The requirements the proxy does not meet, as their [`Requirement::field`]s.
    pub fields: Vec<String>,
}

/// A message from the proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ClientMessage {
    /// The version was validated and is active.
    Ack(Ack),
    /// The version was rejected; the proxy keeps its last good config.
    Nack(Nack),
}

/// Acknowledges a version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// The version now active.
    pub version: u64,
    /// What the proxy enforces of the version's resources. `None` from proxies that
    /// predate this report: the operator then counts none of their resources as enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
}

/// Rejects a version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Nack {
    /// The version rejected.
    pub version: u64,
    /// Why, for people: every validation problem, joined.
    pub reason: String,
    /// The version still active, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_version: Option<u64>,
}

/// Why bytes could not be read as a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The frame is not a message this side understands.
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes a message as one frame (length prefix and JSON).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(message)?;
    let len = u32::try_from(json.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Accumulates bytes and yields whole frames, however the transport split them.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one is buffered.
    // Not `Iterator::next`: it is generic over the message type and fallible.
    #[allow(clippy::should_implement_trait)]
    pub fn next<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_frame(|frame| serde_json::from_slice::<T>(frame))? {
            None => Ok(None),
            Some(message) => Ok(Some(message?)),
        }
    }

    /// Hands the next complete frame's JSON to `read`, if one is buffered: for a reader
    /// that answers a message it cannot decode rather than only dropping it.
    pub fn next_frame<R>(
        &mut self,
        read: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, FrameError> {
        let Some(prefix) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let out = read(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(endpoints: &[(&str, Option<u32>)]) -> ServiceConfig {
        serde_json::from_value(serde_json::json!({
            "name": "web.shop.80",
            "endpoints": endpoints.iter().map(|(a, w)| serde_json::json!({"address": a, "weight": w})).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    #[test]
    fn an_endpoint_delta_carries_only_what_changed_and_applies_back_exactly() {
        let old = svc(&[
            ("198.18.100.1:80", None),
            ("198.18.100.2:80", None),
            ("198.18.100.3:80", None),
            ("198.18.100.4:80", None),
        ]);
        let new = svc(&[
            ("198.18.100.1:80", None),
            ("198.18.100.2:80", Some(5)),
            ("198.18.100.4:80", None),
            ("198.18.100.5:80", None),
        ]);
        let d = EndpointDelta::between(&old, &new).unwrap();
        let upserted: Vec<&str> = d.upserted.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(upserted, ["198.18.100.2:80", "198.18.100.5:80"]);
        assert_eq!(d.removed, ["198.18.100.3:80"]);
        let mut applied = old.clone();
        d.apply(&mut applied);
        assert_eq!(applied, new);
        // Unchanged: no delta.
        assert_eq!(EndpointDelta::between(&new, &new), None);
    }

    #[test]
    fn no_endpoint_delta_when_more_than_endpoints_changed_or_it_is_not_smaller() {
        let old = svc(&[("198.18.100.1:80", None), ("198.18.100.2:80", None)]);
        let mut timed = old.clone();
        timed.timeout = Some("5s".parse().unwrap());
        timed.endpoints.pop();
        assert_eq!(EndpointDelta::between(&old, &timed), None);
        let replaced = svc(&[("198.18.100.8:80", None), ("198.18.100.9:80", None)]);
        assert_eq!(EndpointDelta::between(&old, &replaced), None);
        let unsorted = svc(&[("198.18.100.2:80", None), ("198.18.100.1:80", Some(3))]);
        assert_eq!(EndpointDelta::between(&old, &unsorted), None);
    }

    #[test]
    fn frames_survive_arbitrary_splits() {
        let a = encode(&ClientMessage::Ack(Ack {
            version: 7,
            enforcement: None,
        }))
        .unwrap();
        let b = encode(&ClientMessage::Nack(Nack {
            version: 8,
            reason: "bad".into(),
            active_version: Some(7),
        }))
        .unwrap();
        let all: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        for split in 0..all.len() {
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            for chunk in [&all[..split], &all[split..]] {
                d.extend(chunk);
                while let Some(m) = d.next::<ClientMessage>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got.len(), 2, "split at {split}");
        }
    }

    #[test]
    fn readers_ignore_fields_added_later() {
        let m: ServerMessage = serde_json::from_str(
            r#"{"type":"update","version":3,"full":true,"someFutureField":1}"#,
        )
        .unwrap();
        let ServerMessage::Update(u) = m;
        assert_eq!(u.version, 3);
    }

    #[test]
    fn an_oversized_length_is_refused_before_allocating() {
        let mut d = FrameDecoder::default();
        d.extend(&u32::MAX.to_be_bytes());
        assert!(matches!(
            d.next::<ClientMessage>(),
            Err(FrameError::TooLarge(_))
        ));
    }
}
