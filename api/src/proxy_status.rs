//! What the operator's admin endpoint `GET /proxies` answers, and `kubectl weft
//! proxy-status` reads: one row per proxy, as JSON (an array of [`ProxyRow`]).
//!
//! ```text
//! operator: registry + peers' ACK reports ─▶ Vec<ProxyRow> ─JSON─▶ /proxies ─▶ kubectl weft
//! ```

use serde::{Deserialize, Serialize};

/// One row of `/proxies` (and of `kubectl weft proxy-status`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyRow {
    /// `namespace/name`.
    pub pod: String,
    /// Whether a stream is open.
    pub connected: bool,
    /// The version the operator wants the proxy to run.
    pub desired_version: Option<u64>,
    /// The version the proxy acknowledged.
    pub acked_version: Option<u64>,
    /// Whether the proxy runs the desired version.
    pub in_sync: bool,
    /// The latest rejection's reason, if it is newer than the latest ACK.
    pub rejected: Option<String>,
    /// When the operator last heard from or wrote to the proxy (seconds since the epoch).
    pub last_seen: u64,
    /// How many Weft resources the acknowledged version carries.
    #[serde(default)]
    pub resources: usize,
    /// Those the proxy reported it does not enforce fully, as `Kind namespace/name`;
    /// `None` when it does not report what it enforces (then none counts as enforced).
    #[serde(default)]
    pub not_enforced: Option<Vec<String>>,
    /// The proxy's name and version as it reported them with its latest ACK
    /// (`weft-proxy 0.1.0`); `None` when it has not reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

/// What the operator's admin endpoint `GET /version` answers: the operator's own version,
/// which `kubectl weft check` compares with each proxy's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OperatorVersion {
    /// The operator's package version (`0.1.0`).
    pub version: String,
}
