//! The status every Weft resource reports: `observedGeneration` and Kubernetes-style
//! conditions. Condition types and reasons are constants here, in one place.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type: the resource is valid and Weft will act on it.
pub const ACCEPTED: &str = "Accepted";
/// Condition type: every Service the resource names exists.
pub const RESOLVED_REFS: &str = "ResolvedRefs";
/// Condition type: the proxies that need this generation have acknowledged it.
pub const PROGRAMMED: &str = "Programmed";

/// Conditions keyed by `type`, as Kubernetes API conventions require.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
pub struct Conditions(#[schemars(length(max = 8))] pub Vec<Condition>);

/// The observed state of a Policy or Breaker, written by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `ResolvedRefs` and `Programmed`, each with a reason and a message.
    #[serde(default)]
    pub conditions: Conditions,
}
