//! The routing stages of a request, as pure code: no I/O, no clock, randomness passed in.
//! Each stage validates its wire type once, at config load, into a type that cannot hold
//! an invalid state, and then runs per request without allocating in the common case.
//!
//! ```text
//! path ──normalize──▶ matching::first_match(rules) ──▶ rule
//!   rule ──fault::decide──▶ delay / abort
//!   rule ──split::pick──▶ backend
//!   rule ──rewrite::apply──▶ new path      (query kept by the caller)
//!   rule ──headers::apply──▶ edited request / response headers
//! ```
//!
//! Validation problems are strings that start with the field path they are about (such as
//! `route.rules[2].matches[0].path.regex: ...`), as in [`crate::config`].

pub mod fault;
pub mod headers;
pub mod matching;
pub mod normalize;
pub mod rewrite;
pub mod split;
