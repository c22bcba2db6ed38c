//! Shared vocabulary between `weft-operator` and `weft-proxy`.
//!
//! Nothing here knows about Kubernetes or sockets: the operator converts cluster objects
//! into these types, the proxy converts them into its runtime state.

pub mod duration;
pub mod identity;
pub mod log_filter;
pub mod proxy_config;
pub mod proxy_status;
pub mod push;
pub mod traffic;

pub use duration::{Duration, DurationError};
pub use log_filter::{LogFilter, LogFilterError};
