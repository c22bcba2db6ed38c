//! What the operator's `/readyz` waits for besides the index: parts that start on their
//! own and can fail to (the injection webhook). Each holds a [`Gate`], pending from the
//! moment it is taken until the part opens it, and pending again when the part stops.
//!
//! ```text
//!  main: gate = readiness.gate("webhook") ─▶ webhook task ─ serving ─▶ gate.open()
//!  admin /readyz: index synced && readiness.waiting_for() is empty
//! ```

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError},
};

/// The parts the operator is waiting for. Read by `/readyz` only, never on a hot path.
#[derive(Debug, Default)]
pub struct Readiness {
    pending: Mutex<BTreeSet<&'static str>>,
}

impl Readiness {
    /// A gate for `part`, pending until [`Gate::open`].
    pub fn gate(self: &Arc<Self>, part: &'static str) -> Gate {
        self.set(part, true);
        Gate {
            readiness: self.clone(),
            part,
        }
    }

    /// The parts not serving yet (or any more), sorted; empty when all are.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }

    fn set(&self, part: &'static str, pending: bool) {
        let mut set = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending {
            set.insert(part);
        } else {
            set.remove(part);
        }
    }
}

/// One part's say in readiness. Dropping it (the part's task ended) makes the part
/// pending again: a webhook that stopped serving is not ready.
#[derive(Debug)]
pub struct Gate {
    readiness: Arc<Readiness>,
    part: &'static str,
}

impl Gate {
    /// The part is serving.
    pub fn open(&self) {
        self.readiness.set(self.part, false);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.readiness.set(self.part, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_is_pending_until_opened_and_again_once_dropped() {
        let readiness = Arc::new(Readiness::default());
        assert!(readiness.waiting_for().is_empty());
        let gate = readiness.gate("webhook");
        assert_eq!(readiness.waiting_for(), ["webhook"]);
        gate.open();
        assert!(readiness.waiting_for().is_empty());
        drop(gate);
        assert_eq!(readiness.waiting_for(), ["webhook"]);
    }
}
