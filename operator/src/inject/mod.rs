//! Sidecar injection (in progress).
