//! `kubectl-weft`: the kubectl plugin's library, so its behaviour is testable without
//! spawning it.

pub mod check;
pub mod manifest;
pub mod proxy_status;
pub mod settings;
