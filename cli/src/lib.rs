//! `kubectl-weft`: the kubectl plugin's library, so its behaviour is testable without
//! spawning it.

pub mod admin;
pub mod check;
pub mod explain;
pub mod log_level;
pub mod manifest;
pub mod prom;
pub mod proxy_status;
pub mod settings;
pub mod stat;
pub mod table;
pub mod tap;
pub mod top;
