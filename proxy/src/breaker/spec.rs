//! A service's Breaker, validated once from the wire ([`BreakerSpec::from_wire`]) into
//! values the runtime can use without checking again.

use std::{num::NonZeroU32, time::Duration};

use weft_api::traffic as wire;

/// The largest consecutive-failure count accepted (as the CRD's schema).
pub const MAX_CONSECUTIVE: u32 = 1000;
/// The largest connection-pool limit accepted (as the CRD's schema).
pub const MAX_POOL_LIMIT: u32 = 1_000_000;

/// A service's circuit breaking: outlier ejection, pool limits, or both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerSpec {
    /// The Breaker this was compiled from, as `namespace/name`, for logs.
    pub name: String,
    /// Outlier ejection, when set.
    pub outlier: Option<OutlierSpec>,
    /// Connection-pool limits, when set.
    pub pool: Option<PoolSpec>,
    /// Record decisions without acting on them.
    pub dry_run: bool,
}

/// Outlier ejection: when an endpoint is ejected and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierSpec {
    /// 5xx responses in a row that eject an endpoint (1 to 1000).
    pub consecutive_5xx: u32,
    /// Failed connects in a row that eject an endpoint (1 to 1000).
    pub consecutive_connect_failures: u32,
    /// How long an endpoint must stay uneventful for its ejection multiplier to drop by one.
    pub interval: Duration,
    /// The first ejection's length; the n-th ejection lasts n times this.
    pub base_ejection_time: Duration,
    /// The longest ejection.
    pub max_ejection_time: Duration,
    /// At most this percentage (0 to 100) of the service's endpoints is ejected at once.
    pub max_ejected_percent: u8,
}

/// Limits on this proxy's connections and requests to one service. `None`: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PoolSpec {
    /// Open connections to all of the service's endpoints.
    pub max_connections: Option<NonZeroU32>,
    /// Requests waiting for a connection while `max_connections` are open.
    pub max_pending_requests: Option<u32>,
    /// Requests in flight to the service.
    pub max_requests: Option<NonZeroU32>,
    /// Requests one connection carries before it is retired.
    pub max_requests_per_connection: Option<NonZeroU32>,
}

impl PoolSpec {
    /// Whether a limit applies to the service's connections (rather than to admission
    /// alone), so that the service needs connection pools of its own.
    pub fn limits_connections(&self) -> bool {
        self.max_connections.is_some()
            || self.max_pending_requests.is_some()
            || self.max_requests_per_connection.is_some()
    }
}

impl BreakerSpec {
    /// Validates a wire Breaker; each problem starts with `field` and the path below it,
    /// such as `services[0] ("db").breaker.outlierDetection.baseEjectionTime: ...`.
    pub fn from_wire(w: &wire::BreakerConfig, field: &str) -> Result<BreakerSpec, Vec<String>> {
        let mut problems = Vec::new();
        let outlier = w
            .outlier_detection
            .as_ref()
            .map(|o| outlier(o, &format!("{field}.outlierDetection"), &mut problems));
        let pool = w
            .connection_pool
            .as_ref()
            .map(|p| pool(p, &format!("{field}.connectionPool"), &mut problems));
        if w.outlier_detection.is_none() && w.connection_pool.is_none() {
            problems.push(format!(
                "{field}: needs outlierDetection, connectionPool, or both"
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(BreakerSpec {
            name: w.name.clone(),
            outlier,
            pool,
            dry_run: w.dry_run,
        })
    }
}

fn outlier(o: &wire::OutlierDetectionConfig, at: &str, problems: &mut Vec<String>) -> OutlierSpec {
    let mut count = |name: &str, v: u32| {
        if !(1..=MAX_CONSECUTIVE).contains(&v) {
            problems.push(format!(
                "{at}.{name}: {v} is not within 1..={MAX_CONSECUTIVE}"
            ));
        }
        v.clamp(1, MAX_CONSECUTIVE)
    };
    let consecutive_5xx = count("consecutive5xx", o.consecutive5xx);
    let consecutive_connect_failures =
        count("consecutiveConnectFailures", o.consecutive_connect_failures);
    let mut positive = |name: &str, d: &weft_api::Duration| {
        if d.as_std().is_zero() {
            problems.push(format!("{at}.{name}: must be greater than zero"));
        }
        d.as_std()
    };
    let interval = positive("interval", &o.interval);
    let base_ejection_time = positive("baseEjectionTime", &o.base_ejection_time);
    let max_ejection_time = positive("maxEjectionTime", &o.max_ejection_time);
    if base_ejection_time > max_ejection_time {
        problems.push(format!(
            "{at}.baseEjectionTime: {} exceeds maxEjectionTime {}",
            o.base_ejection_time.as_str(),
            o.max_ejection_time.as_str()
        ));
    }
    let max_ejected_percent = match u8::try_from(o.max_ejected_percent) {
        Ok(p) if p <= 100 => p,
        _ => {
            problems.push(format!(
                "{at}.maxEjectedPercent: {} is not within 0..=100",
                o.max_ejected_percent
            ));
            100
        }
    };
    OutlierSpec {
        consecutive_5xx,
        consecutive_connect_failures,
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejected_percent,
    }
}

fn pool(p: &wire::ConnectionPoolConfig, at: &str, problems: &mut Vec<String>) -> PoolSpec {
    let mut at_least_one = |name: &str, v: Option<u32>| {
        let v = v?;
        match NonZeroU32::new(v) {
            Some(n) if v <= MAX_POOL_LIMIT => Some(n),
            _ => {
                problems.push(format!(
                    "{at}.{name}: {v} is not within 1..={MAX_POOL_LIMIT}"
                ));
                None
            }
        }
    };
    let max_connections = at_least_one("maxConnections", p.max_connections);
    let max_requests = at_least_one("maxRequests", p.max_requests);
    let max_requests_per_connection =
        at_least_one("maxRequestsPerConnection", p.max_requests_per_connection);
    let max_pending_requests = p.max_pending_requests.filter(|v| {
        let ok = *v <= MAX_POOL_LIMIT;
        if !ok {
            problems.push(format!(
                "{at}.maxPendingRequests: {v} is not within 0..={MAX_POOL_LIMIT}"
            ));
        }
        ok
    });
    if p == &wire::ConnectionPoolConfig::default() {
        problems.push(format!("{at}: needs at least one limit"));
    }
    PoolSpec {
        max_connections,
        max_pending_requests,
        max_requests,
        max_requests_per_connection,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(v: serde_json::Value) -> wire::BreakerConfig {
        serde_json::from_value(v).unwrap()
    }

    const AT: &str = "services[0] (\"db\").breaker";

    #[test]
    fn breaker_spec_accepts_a_full_breaker() {
        let spec = BreakerSpec::from_wire(
            &wire(serde_json::json!({
                "name": "shop/db",
                "outlierDetection": {"consecutive5xx": 5, "consecutiveConnectFailures": 3,
                    "interval": "10s", "baseEjectionTime": "30s", "maxEjectionTime": "5m",
                    "maxEjectedPercent": 50},
                "connectionPool": {"maxConnections": 10, "maxPendingRequests": 0},
                "dryRun": true
            })),
            AT,
        )
        .unwrap();
        let o = spec.outlier.unwrap();
        assert_eq!(o.consecutive_connect_failures, 3);
        assert_eq!(o.max_ejection_time, Duration::from_secs(300));
        let p = spec.pool.unwrap();
        assert_eq!(p.max_pending_requests, Some(0));
        assert_eq!(p.max_requests, None);
        assert!(p.limits_connections());
        assert!(spec.dry_run);
    }

    #[test]
    fn breaker_spec_names_every_bad_field_by_its_path() {
        let problems = BreakerSpec::from_wire(
            &wire(serde_json::json!({
                "name": "shop/db",
                "outlierDetection": {"consecutive5xx": 0, "consecutiveConnectFailures": 1001,
                    "interval": "0s", "baseEjectionTime": "10m", "maxEjectionTime": "5m",
                    "maxEjectedPercent": 101},
                "connectionPool": {"maxConnections": 0, "maxRequests": 2000000}
            })),
            AT,
        )
        .unwrap_err();
        let text = problems.join("\n");
        for needle in [
            ".breaker.outlierDetection.consecutive5xx: 0 is not within",
            ".breaker.outlierDetection.consecutiveConnectFailures: 1001",
            ".breaker.outlierDetection.interval: must be greater than zero",
            ".breaker.outlierDetection.baseEjectionTime: 10m exceeds maxEjectionTime 5m",
            ".breaker.outlierDetection.maxEjectedPercent: 101",
            ".breaker.connectionPool.maxConnections: 0",
            ".breaker.connectionPool.maxRequests: 2000000",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
        assert!(problems.iter().all(|p| p.starts_with(AT)), "{text}");
        let empty = BreakerSpec::from_wire(
            &wire(serde_json::json!({"name": "x", "connectionPool": {}})),
            AT,
        )
        .unwrap_err();
        assert!(empty[0].contains("connectionPool: needs at least one limit"));
    }
}
