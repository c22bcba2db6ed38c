//! The proxy's log filter, changeable while it runs: the admin port's `/log-level` shows
//! it (`GET`) and replaces it (`PUT`, loopback only), so that a proxy can be made verbose
//! for a while without restarting its pod (which would lose what is being looked at).
//!
//! ```text
//! PUT /log-level "warn,weft_proxy=debug" ─▶ LogFilter::parse ─▶ reload handle ─▶ EnvFilter
//! ```
//!
//! The filter sits behind `tracing_subscriber`'s reload layer. An event whose callsite
//! the filter enables or disables for good is decided once per callsite and cached, as
//! without the layer; a reload recomputes those decisions, so the request path pays
//! nothing for the filter being changeable.

use std::sync::Mutex;

use tracing_subscriber::EnvFilter;
use weft_api::{LogFilter, LogFilterError};

/// Replaces the filter the subscriber applies.
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The running process's log filter and the means to replace it.
pub struct LogControl {
    current: Mutex<LogFilter>,
    reload: Reload,
}

/// Why the log filter was not replaced.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// The new filter did not parse; the old one stays.
    #[error("invalid log filter: {0}")]
    Invalid(#[from] LogFilterError),
    /// The subscriber is gone (the process is exiting).
    #[error("the log filter could not be replaced: {0}")]
    Reload(String),
}

impl LogControl {
    /// Control over a subscriber built with `with_filter_reloading`, whose filter is
    /// `initial`.
    pub fn new<S>(
        initial: LogFilter,
        handle: tracing_subscriber::reload::Handle<EnvFilter, S>,
    ) -> LogControl
    where
        S: Send + Sync + 'static,
    {
        LogControl {
            current: Mutex::new(initial),
            reload: Box::new(move |filter| handle.reload(filter).map_err(|e| e.to_string())),
        }
    }

    /// The filter in force.
    pub fn current(&self) -> LogFilter {
        self.lock().clone()
    }

    /// Parses `filter` and puts it in force: the filter before it, or why nothing
    /// changed.
    pub fn set(&self, filter: &str) -> Result<LogFilter, LogLevelError> {
        let new = LogFilter::parse(filter)?;
        let mut current = self.lock();
        (self.reload)(new.env_filter()).map_err(LogLevelError::Reload)?;
        Ok(std::mem::replace(&mut *current, new))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogFilter> {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &*self.lock())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::{layer::SubscriberExt as _, reload};

    #[test]
    fn a_new_filter_changes_what_is_logged_and_a_bad_one_changes_nothing() {
        let initial = LogFilter::parse("warn").unwrap();
        let (layer, handle) = reload::Layer::new(initial.env_filter());
        let control = LogControl::new(initial, handle);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(tracing::Level::DEBUG));
            let before = control.set("info, weft_proxy=debug").unwrap();
            assert_eq!(before.as_str(), "warn");
            assert_eq!(control.current().as_str(), "info,weft_proxy=debug");
            assert!(tracing::enabled!(target: "weft_proxy::http", tracing::Level::DEBUG));
            assert!(!tracing::enabled!(target: "hyper", tracing::Level::DEBUG));

            let err = control.set("degub").unwrap_err();
            assert!(
                err.to_string().contains("\"degub\" names no level"),
                "{err}"
            );
            assert_eq!(control.current().as_str(), "info,weft_proxy=debug");
            assert!(tracing::enabled!(target: "weft_proxy::http", tracing::Level::DEBUG));
        });
    }
}
