//! Retries: which failed attempts are retried ([`RetryPolicy`]), how long to wait before
//! each ([`Backoff`]), and how many retries a service can afford ([`RetryBudget`]). Plain
//! synchronous code: the request path asks, these answer.
//!
//! ```text
//! original ──budget.deposit──▶ attempt ──fails──▶ policy.retry_on_{failure,response}?
//!                                 ▲                    │ yes, and retry < attempts
//!                                 │                    ▼
//!                                 └── wait backoff.delay(retry) ◀── budget.withdraw: Allowed
//! ```
//!
//! Each type is validated once, at config load, from its wire type
//! (`from_wire(.., field)`, every problem prefixed with the field's path).

mod backoff;
mod budget;
mod policy;

pub use backoff::{Backoff, DEFAULT_BASE, DEFAULT_MAX};
pub use budget::{
    BudgetSpec, DEFAULT_MIN_RETRIES_PER_SECOND, DEFAULT_PERCENT, DEFAULT_TTL,
    MAX_MIN_RETRIES_PER_SECOND, MAX_TTL, MIN_TTL, RetryBudget, Withdrawal,
};
pub use policy::{Failure, MAX_ATTEMPTS, RetryPolicy};
