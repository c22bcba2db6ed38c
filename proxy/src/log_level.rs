//! The proxy's log filter, changeable while it runs: the admin port's `/log-level` shows
//! it (`GET`) and replaces it (`PUT`, loopback only), so that a proxy can be made verbose
//! for a while without restarting its pod (which would lose what is being looked at).
//! A change made `for` a while (`PUT /log-level?for=10m`) goes back by itself to the last
//! lasting filter, so a verbose proxy is not forgotten.
//!
//! ```text
//! PUT /log-level "warn,weft_proxy=debug" ─▶ LogFilter::parse ─▶ reload handle ─▶ EnvFilter
//!     ?for=10m ─▶ after 10m, unless changed again: back to the lasting filter
//! ```
//!
//! The filter sits behind `tracing_subscriber`'s reload layer. An event whose callsite
//! the filter enables or disables for good is decided once per callsite and cached, as
//! without the layer; a reload recomputes those decisions, so the request path pays
//! nothing for the filter being changeable.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing_subscriber::EnvFilter;
use weft_api::{LogFilter, LogFilterError};

/// Replaces the filter the subscriber applies.
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The longest a temporary change may last.
pub const MAX_TEMPORARY: Duration = Duration::from_secs(24 * 3600);

/// The running process's log filter and the means to replace it.
pub struct LogControl {
    state: Arc<Mutex<State>>,
    reload: Arc<Reload>,
}

struct State {
    /// In force now.
    current: LogFilter,
    /// What a temporary change goes back to: the filter the process started with, or the
    /// last one set without a time limit.
    lasting: LogFilter,
    /// When the temporary change in force ends, and the task that ends it.
    temporary: Option<(tokio::time::Instant, tokio::task::AbortHandle)>,
    /// Counts changes: a task ending a temporary change that another change followed
    /// (one it raced with, on another worker, past its abort) leaves it alone.
    changes: u64,
}

/// Why the log filter was not replaced.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// The new filter did not parse; the old one stays.
    #[error("invalid log filter: {0}")]
    Invalid(#[from] LogFilterError),
    /// A temporary change of zero, or longer than [`MAX_TEMPORARY`].
    #[error("a temporary log filter lasts more than zero and at most 24h")]
    BadDuration,
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
            state: Arc::new(Mutex::new(State {
                current: initial.clone(),
                lasting: initial,
                temporary: None,
                changes: 0,
            })),
            reload: Arc::new(Box::new(move |filter| {
                handle.reload(filter).map_err(|e| e.to_string())
            })),
        }
    }

    /// The filter in force.
    pub fn current(&self) -> LogFilter {
        lock(&self.state).current.clone()
    }

    /// The filter in force, and when it is temporary, for how long more and what comes
    /// after it: `debug (for 9m58s more, then info)`.
    pub fn describe(&self) -> String {
        let state = lock(&self.state);
        match &state.temporary {
            None => state.current.to_string(),
            Some((until, _)) => {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                format!(
                    "{} (for {} more, then {})",
                    state.current,
                    weft_api::Duration::from(Duration::from_secs(left.as_secs())).as_str(),
                    state.lasting
                )
            }
        }
    }

    /// Parses `filter` and puts it in force for good (until the next change or a
    /// restart), ending any temporary change: the filter before it, or why nothing
    /// changed.
    pub fn set(&self, filter: &str) -> Result<LogFilter, LogLevelError> {
        let (mut state, new) = self.apply(filter)?;
        state.lasting = new.clone();
        Ok(std::mem::replace(&mut state.current, new))
    }

    /// Parses `filter` and hands it to the subscriber, ending any temporary change: the
    /// state, still locked, for the caller to record it in.
    fn apply(
        &self,
        filter: &str,
    ) -> Result<(std::sync::MutexGuard<'_, State>, LogFilter), LogLevelError> {
        let new = LogFilter::parse(filter)?;
        let mut state = lock(&self.state);
        (self.reload)(new.env_filter()).map_err(LogLevelError::Reload)?;
        if let Some((_, task)) = state.temporary.take() {
            task.abort();
        }
        state.changes += 1;
        Ok((state, new))
    }

    /// Parses `filter` and puts it in force for `duration`, after which the lasting filter
    /// comes back by itself (unless another change came first): the filter before it, or
    /// why nothing changed. Needs a tokio runtime.
    pub fn set_for(&self, filter: &str, duration: Duration) -> Result<LogFilter, LogLevelError> {
        if duration.is_zero() || duration > MAX_TEMPORARY {
            return Err(LogLevelError::BadDuration);
        }
        let (mut state, new) = self.apply(filter)?;
        let change = state.changes;
        let until = tokio::time::Instant::now() + duration;
        let (shared, reload) = (self.state.clone(), self.reload.clone());
        let task = tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            let mut state = lock(&shared);
            if state.changes != change {
                return;
            }
            if let Err(error) = reload(state.lasting.env_filter()) {
                tracing::warn!(%error, "the temporary log filter could not be reverted");
                return;
            }
            let back = state.lasting.clone();
            let was = std::mem::replace(&mut state.current, back);
            state.temporary = None;
            tracing::warn!(from = %was, to = %state.current, "temporary log filter ended");
        });
        state.temporary = Some((until, task.abort_handle()));
        Ok(std::mem::replace(&mut state.current, new))
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &lock(&self.state).current)
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

    /// A change made for a while goes back to the lasting filter by itself; a lasting
    /// change, or another temporary one, ends it first.
    #[tokio::test(start_paused = true)]
    async fn a_temporary_filter_goes_back_to_the_lasting_one() {
        let initial = LogFilter::parse("info").unwrap();
        let (layer, handle) = reload::Layer::new(initial.env_filter());
        let control = LogControl::new(initial, handle);
        let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));

        assert!(matches!(
            control.set_for("debug", Duration::ZERO),
            Err(LogLevelError::BadDuration)
        ));
        assert!(matches!(
            control.set_for("debug", MAX_TEMPORARY + Duration::from_secs(1)),
            Err(LogLevelError::BadDuration)
        ));
        assert_eq!(control.current().as_str(), "info");

        control.set_for("debug", Duration::from_secs(600)).unwrap();
        assert!(tracing::enabled!(tracing::Level::DEBUG));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(control.describe(), "debug (for 9m58s more, then info)");
        tokio::time::sleep(Duration::from_secs(599)).await;
        assert_eq!(control.describe(), "info");
        assert!(!tracing::enabled!(tracing::Level::DEBUG));

        // Another temporary change replaces the first, and its end is its own.
        control.set_for("debug", Duration::from_secs(60)).unwrap();
        control.set_for("trace", Duration::from_secs(120)).unwrap();
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert_eq!(control.current().as_str(), "trace");
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(control.current().as_str(), "info");

        // A lasting change ends a temporary one, and is what later ones go back to.
        control.set_for("debug", Duration::from_secs(60)).unwrap();
        control.set("warn").unwrap();
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(control.describe(), "warn");
        control.set_for("debug", Duration::from_secs(60)).unwrap();
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(control.describe(), "warn");
    }
}
