//! Token buckets by key, bounded in the keys they remember: the push port limits
//! TokenReviews per source address with them, the identity endpoint limits issuances per
//! identity. And slots by key ([`KeyedSlots`]): the identity endpoint bounds the requests
//! one source address has in flight with them.

use std::{
    collections::HashMap,
    hash::Hash,
    num::NonZeroUsize,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

/// One key's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per key: `burst` at once, refilled at `rate` per second.
#[derive(Debug)]
pub struct KeyedBuckets<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq> KeyedBuckets<K> {
    /// Buckets of `burst` tokens refilled at `rate` per second, for at most `max_keys` keys
    /// (idle keys are forgotten first when there are more).
    pub fn new(rate: f64, burst: u32, max_keys: usize) -> Self {
        KeyedBuckets {
            rate: if rate.is_finite() { rate.max(0.0) } else { 0.0 },
            burst: f64::from(burst.max(1)),
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Bucket>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one token from `key`'s bucket; false when it is empty.
    pub fn take(&self, key: K) -> bool {
        let now = Instant::now();
        let (rate, burst) = (self.rate, self.burst);
        let refill =
            |b: &Bucket| (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        let mut buckets = self.lock();
        if buckets.len() >= self.max_keys && !buckets.contains_key(&key) {
            // Full buckets are keys that have been quiet: forgetting them loses nothing.
            buckets.retain(|_, b| refill(b) < burst);
            if buckets.len() >= self.max_keys {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens = refill(bucket);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// At most `max` holders at once per key, each holding a [`KeyedSlot`] until it drops it.
///
/// Only keys with a holder are remembered (a key is forgotten when its last slot is
/// dropped), so the table is never larger than the number of slots held, which the
/// caller's own bound on concurrent work limits.
#[derive(Debug)]
pub struct KeyedSlots<K> {
    max: NonZeroUsize,
    held: Mutex<HashMap<K, usize>>,
}

/// One held slot of a [`KeyedSlots`]; dropping it frees the slot.
#[derive(Debug)]
pub struct KeyedSlot<'a, K: Hash + Eq> {
    slots: &'a KeyedSlots<K>,
    key: Option<K>,
}

impl<K: Hash + Eq> KeyedSlots<K> {
    /// At most `max` slots held at once per key.
    pub fn new(max: NonZeroUsize) -> Self {
        KeyedSlots {
            max,
            held: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, usize>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for `key`, or `None` (at once, without waiting) when `key` holds `max`.
    pub fn try_hold(&self, key: K) -> Option<KeyedSlot<'_, K>>
    where
        K: Clone,
    {
        let mut held = self.lock();
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= self.max.get() {
            return None;
        }
        *n += 1;
        Some(KeyedSlot {
            slots: self,
            key: Some(key),
        })
    }

    /// [`KeyedSlots::try_hold`] for a holder that cannot borrow the slots (a spawned
    /// connection task): the slot keeps them alive.
    pub fn try_hold_owned(self: &Arc<Self>, key: K) -> Option<OwnedKeyedSlot<K>>
    where
        K: Clone,
    {
        let slot = self.try_hold(key)?;
        Some(OwnedKeyedSlot {
            key: slot.forget(),
            slots: self.clone(),
        })
    }

    /// Gives back one slot of `key`, forgetting the key once it holds none.
    fn release(&self, key: &K) {
        let mut held = self.lock();
        if let Some(n) = held.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(key);
            }
        }
    }

    /// The most slots one key may hold.
    pub fn max(&self) -> usize {
        self.max.get()
    }

    /// How many slots `key` holds.
    pub fn held(&self, key: &K) -> usize {
        self.lock().get(key).copied().unwrap_or(0)
    }

    /// How many keys hold a slot.
    pub fn keys(&self) -> usize {
        self.lock().len()
    }
}

impl<K: Hash + Eq> KeyedSlot<'_, K> {
    /// The key, the slot staying held: its new owner releases it.
    fn forget(mut self) -> Option<K> {
        self.key.take()
    }
}

impl<K: Hash + Eq> Drop for KeyedSlot<'_, K> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.slots.release(&key);
        }
    }
}

/// One held slot of a shared [`KeyedSlots`] ([`KeyedSlots::try_hold_owned`]); dropping
/// it frees the slot.
#[derive(Debug)]
pub struct OwnedKeyedSlot<K: Hash + Eq> {
    slots: Arc<KeyedSlots<K>>,
    key: Option<K>,
}

impl<K: Hash + Eq> Drop for OwnedKeyedSlot<K> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.slots.release(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_max_slots_and_is_forgotten_when_it_holds_none() {
        let slots = KeyedSlots::new(NonZeroUsize::new(2).unwrap());
        let a1 = slots.try_hold("a").unwrap();
        let a2 = slots.try_hold("a").unwrap();
        assert!(slots.try_hold("a").is_none(), "a holds its 2");
        let b = slots.try_hold("b").expect("b is not limited by a");
        assert_eq!((slots.held(&"a"), slots.held(&"b")), (2, 1));
        drop(a1);
        let a3 = slots.try_hold("a").expect("a freed one");
        drop((a2, a3, b));
        assert_eq!(slots.keys(), 0, "no key is remembered without a slot");
    }

    #[test]
    fn an_owned_slot_counts_and_frees_as_a_borrowed_one() {
        let slots = Arc::new(KeyedSlots::new(NonZeroUsize::new(1).unwrap()));
        let a = slots.try_hold_owned("a").unwrap();
        assert!(slots.try_hold("a").is_none(), "a holds its one");
        assert!(slots.try_hold_owned("a").is_none(), "a holds its one");
        drop(a);
        assert_eq!(slots.keys(), 0, "no key is remembered without a slot");
        assert!(slots.try_hold_owned("a").is_some(), "a freed its one");
    }

    #[test]
    fn a_full_table_forgets_quiet_keys_before_busy_ones() {
        let b = KeyedBuckets::new(0.0, 2, 2);
        assert!(b.take(1));
        assert!(b.take(1));
        assert!(!b.take(1), "key 1 spent its burst");
        assert!(b.take(2));
        // The table is full and both keys are below their burst (neither is quiet): it is
        // cleared, and key 1 starts afresh.
        assert!(b.take(3));
        assert!(b.take(1), "cleared: key 1 has its burst again");
    }
}
