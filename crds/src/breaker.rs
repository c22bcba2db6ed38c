//! `Breaker`: circuit breaking for one Service, by outlier ejection of failing endpoints
//! and by limits on the connection pool to it.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use weft_api::Duration;

use crate::{common::ServiceRef, status::Status};

/// Circuit breaking for one Service: ejects endpoints that keep failing, and caps the
/// connections and requests that clients may send it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "Breaker",
    namespaced,
    doc = "Breaker sets circuit breaking for one Service: outlier ejection of endpoints that keep failing, and limits on the connections and requests each client proxy may send it.",
    status = "Status",
    shortname = "wbreaker",
    category = "weft",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service.name"}"#,
    printcolumn = r#"{"name":"5xx","type":"integer","jsonPath":".spec.outlierDetection.consecutive5xx"}"#,
    printcolumn = r#"{"name":"MaxConns","type":"integer","jsonPath":".spec.connectionPool.maxConnections"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = kube::core::Rule::new("has(self.outlierDetection) || has(self.connectionPool)")
    .message("a Breaker needs outlierDetection, connectionPool, or both"))]
#[serde(rename_all = "camelCase")]
pub struct BreakerSpec {
    /// The Service this Breaker protects (its clients' proxies enforce it).
    pub service: ServiceRef,
    /// Ejects endpoints that fail repeatedly from load balancing for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Caps connections and requests to the Service from each client proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Dry run: eject nothing and refuse nothing, but record (a counter and a rate-limited
    /// log line) each ejection and refusal the Breaker would have made.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// Outlier ejection. An endpoint is ejected after `consecutive5xx` 5xx responses or
/// `consecutiveConnectFailures` failed connects in a row, for `baseEjectionTime` times the
/// number of times it has been ejected, at most `maxEjectionTime`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("duration(self.baseEjectionTime) <= duration(self.maxEjectionTime)")
    .message("baseEjectionTime must not exceed maxEjectionTime").field_path(".baseEjectionTime"))]
pub struct OutlierDetection {
    /// Consecutive 5xx responses that eject an endpoint (default 5).
    #[serde(default = "default_consecutive")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive5xx: u32,
    /// Consecutive failed connection attempts that eject an endpoint (default 5).
    #[serde(default = "default_consecutive")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_connect_failures: u32,
    /// Each interval an endpoint spends back in rotation lowers its ejection count, and
    /// so its next ejection time, by one (default 10s).
    #[serde(default = "default_interval")]
    pub interval: Duration,
    /// Ejection time of the first ejection; the n-th ejection lasts n times this, up to
    /// `maxEjectionTime` (default 30s).
    #[serde(default = "default_base_ejection")]
    pub base_ejection_time: Duration,
    /// The longest ejection (default 5m).
    #[serde(default = "default_max_ejection")]
    pub max_ejection_time: Duration,
    /// At most this percentage of endpoints is ejected at once (default 50), so a
    /// Service-wide failure never ejects everything.
    #[serde(default = "default_max_ejected")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejected_percent: u32,
}

fn default_consecutive() -> u32 {
    5
}

fn default_interval() -> Duration {
    std::time::Duration::from_secs(10).into()
}

fn default_base_ejection() -> Duration {
    std::time::Duration::from_secs(30).into()
}

fn default_max_ejection() -> Duration {
    std::time::Duration::from_secs(300).into()
}

fn default_max_ejected() -> u32 {
    50
}

/// Limits on the connection pool each client proxy keeps to the Service. Requests over a
/// limit fail fast with 503 and the `weft-error` header naming this Breaker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.maxConnections) || has(self.maxPendingRequests) || has(self.maxRequests) || has(self.maxRequestsPerConnection)"
).message("connectionPool needs at least one limit"))]
pub struct ConnectionPool {
    /// Open connections to all endpoints of the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_requests: Option<u32>,
    /// Requests sent on one connection before it is closed and replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_requests_per_connection: Option<u32>,
}
