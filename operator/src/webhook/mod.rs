//! The mutating admission webhook (in progress).
