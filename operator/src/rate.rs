//! Token buckets by key, bounded in the keys they remember: the push port limits
//! TokenReviews per source address with them, the identity endpoint limits issuances per
//! identity.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Mutex, MutexGuard},
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

#[cfg(test)]
mod tests {
    use super::*;

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
