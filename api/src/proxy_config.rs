//! The proxy's configuration as it travels: from a file in standalone mode today, from the
//! operator's push stream later.
//!
//! These are plain serde types, versioned by [`PROXY_CONFIG_API_VERSION`]. Within a version
//! fields are only ever added. A [`ServiceConfig`] or [`EndpointConfig`] field the reader
//! does not know is kept in its `unknown` map and `weft-proxy`'s validation rejects it,
//! naming it: a setting the proxy does not know is one it cannot enforce, so the operator
//! sends a new field only to proxies that announced they understand it (`docs/protocol.md`).
//! Unknown top-level fields are ignored; a file loader warns about them, since in a
//! hand-written file they are usually typos. The types may hold anything a file can say;
//! `weft-proxy` validates a whole [`ProxyConfig`] once, into its own types that cannot
//! represent an invalid state, before swapping it in.
//!
//! ```text
//! file / operator ──serde──▶ ProxyConfig ──validate (weft-proxy)──▶ runtime snapshot
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Duration;
pub use crate::traffic::*;

/// The `apiVersion` this crate reads and writes. A config with another value is rejected,
/// so that a proxy never half-understands a newer format.
pub const PROXY_CONFIG_API_VERSION: &str = "weft.dev/proxy/v1alpha1";

/// The `kind` of a proxy configuration document.
pub const PROXY_CONFIG_KIND: &str = "ProxyConfig";

/// Ports whose protocols have the server speak first (SMTP 25 and 587, MySQL 3306,
/// Galera 4444, PostgreSQL 5432, Redis 6379, Elasticsearch transport 9300, memcached 11211):
/// the proxy never waits for a client's first bytes on them.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// The prefix of a namespace's configs of meshed pods that no Service lists
/// (`pods.<namespace>`, and `pods.<namespace>.opaque` for their opaque ports):
/// address-less, found by their endpoints' addresses. Every Service's config is named
/// `<service>.<namespace>.<port>`, ending in a number, so none can equal them.
pub const PODS_CONFIG_PREFIX: &str = "pods.";

/// One complete configuration of one proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// Must equal [`PROXY_CONFIG_API_VERSION`].
    pub api_version: String,
    /// Must equal [`PROXY_CONFIG_KIND`].
    pub kind: String,
    /// A label for this snapshot (the operator's version, or anything a file author picks).
    /// Shown by `/config` and in metrics; the proxy numbers accepted configs itself as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// How long to wait for a client's first bytes before treating a connection as opaque
    /// TCP. Defaults to `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_timeout: Option<Duration>,
    /// How long to wait for an upstream TCP connection, unless a service says otherwise.
    /// Defaults to `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// Destination ports proxied as opaque TCP without protocol detection. When absent,
    /// [`DEFAULT_OPAQUE_PORTS`]; when present, replaces that list (write `[]` for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opaque_ports: Option<Vec<u16>>,
    /// The services this proxy can send traffic to.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// Settings of the inbound side: what protects this proxy's own workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundConfig>,
}

/// A destination the proxy balances over: a name, the addresses that select it, and its
/// endpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceConfig {
    /// Unique name, such as `web.shop` (letters, digits, `-`, `.`, `_`; at most 253 bytes).
    /// Used as the `service` metric label.
    pub name: String,
    /// Cluster addresses (`ip:port`) whose connections the outbound listener sends to this
    /// service. Each address may belong to one service only.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// How connections to this service are handled. Defaults to `detect`.
    #[serde(default)]
    pub protocol: Protocol,
    /// How a request picks an endpoint. Defaults to `peakEwma`.
    #[serde(default)]
    pub balancer: Balancer,
    /// The longest an HTTP request may wait for its response headers before the proxy
    /// answers 504. No limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Overrides the config-wide connect timeout for this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// The endpoints that serve this service. May be empty: requests then get 503.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// How HTTP requests to this service are routed (a compiled `Route`). Absent: every
    /// request goes to `endpoints`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteConfig>,
    /// The retry budget of requests to this service (rules without a budget of their own
    /// share it). Absent: 20 % of the last 10 s of requests plus 10 per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetConfig>,
    /// Circuit breaking for this service (a compiled `Breaker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerConfig>,
    /// Fields this reader does not know, by name: kept (not dropped) so that validation
    /// rejects them. Empty from every writer that knows the reader.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// How connections to a service are handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Protocol {
    /// Peek at the first bytes: HTTP/1.1 and HTTP/2 are proxied per request, anything else
    /// as opaque TCP.
    #[default]
    Detect,
    /// Opaque TCP, without detection (for server-speaks-first protocols).
    Opaque,
}

/// The per-request endpoint choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Balancer {
    /// Power of two choices over a peak-EWMA latency estimate, weighted.
    #[default]
    PeakEwma,
    /// Weighted round robin.
    RoundRobin,
}

/// The largest endpoint weight a proxy accepts. A million, rather than a round ten
/// thousand, because operators before `traffic-policy` flattened a Route's split into
/// endpoint weights (a backend with 1 % of the traffic over 1,000 endpoints beside one with
/// 99 % on a single endpoint needs a ratio of 99,000); a split is now a Route's backend
/// stage, and weights are left to endpoints' own.
pub const MAX_ENDPOINT_WEIGHT: u32 = 1_000_000;

/// One backend instance of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointConfig {
    /// Where to connect, as `ip:port`.
    pub address: String,
    /// Relative share of traffic, 1 to [`MAX_ENDPOINT_WEIGHT`]. Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Free-form labels such as `zone`; carried for locality-aware features.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The identity (SPIFFE ID) this endpoint's proxy must present: set when the endpoint
    /// is meshed, and then the outbound proxy speaks mutual TLS to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Fields this reader does not know, by name, kept so that validation rejects them.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_defaults_for_a_minimal_document() {
        let c: ProxyConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.dev/proxy/v1alpha1",
            "kind": "ProxyConfig",
            "services": [{"name": "web", "endpoints": [{"address": "127.0.0.2:8080"}]}]
        }))
        .unwrap();
        assert_eq!(c.services[0].balancer, Balancer::PeakEwma);
        assert_eq!(c.services[0].protocol, Protocol::Detect);
        assert_eq!(c.services[0].endpoints[0].weight, None);
        assert_eq!(c.opaque_ports, None);
    }

    #[test]
    fn ignores_unknown_top_level_fields_and_keeps_unknown_service_fields_for_rejection() {
        let c: ProxyConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.dev/proxy/v1alpha1",
            "kind": "ProxyConfig",
            "someFutureField": {"x": 1},
            "services": [{"name": "web", "futureKnob": true,
                          "endpoints": [{"address": "127.0.0.2:80", "zoneHint": "a"}]}]
        }))
        .unwrap();
        assert_eq!(c.services[0].name, "web");
        let knobs: Vec<&str> = c.services[0].unknown.keys().map(String::as_str).collect();
        assert_eq!(knobs, ["futureKnob"]);
        let hints: Vec<&str> = c.services[0].endpoints[0]
            .unknown
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(hints, ["zoneHint"]);
        // A known field is never mistaken for an unknown one, and they round-trip.
        assert!(!c.services[0].unknown.contains_key("name"));
        let again: ServiceConfig =
            serde_json::from_value(serde_json::to_value(&c.services[0]).unwrap()).unwrap();
        assert_eq!(again, c.services[0]);
    }
}
