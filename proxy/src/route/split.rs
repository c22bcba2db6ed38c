//! Traffic split: the weighted random choice of a rule's backend, one draw and a binary
//! search over cumulative weights per request.
//!
//! ```text
//! weights [90, 0, 10] ──Split::new──▶ cumulative [90, 90, 100]
//! draw x in 0..100 ──first cumulative > x──▶ index (0 for x < 90, 2 otherwise; never 1)
//! ```
//!
//! Weights split traffic between Services; the endpoints of one Service are weighted by
//! [`crate::balance`] instead.

use rand::Rng;
use weft_api::traffic as wire;

/// The largest backend weight accepted (the wire's documented range).
pub const MAX_WEIGHT: u32 = 1_000_000;

/// A weighted choice among backends; holds at least one non-zero weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// Running sums of the weights; the last one is the total, which is non-zero.
    cumulative: Box<[u64]>,
}

impl Split {
    /// A split over these weights, by index; `None` when no weight is above zero (the
    /// caller answers such requests itself).
    pub fn new(weights: &[u32]) -> Option<Split> {
        let mut total = 0u64;
        let cumulative: Box<[u64]> = weights
            .iter()
            .map(|w| {
                total += u64::from(*w);
                total
            })
            .collect();
        (total > 0).then_some(Split { cumulative })
    }

    /// Validates a rule's backends' weights; `field` is the list's path in the config,
    /// such as `route.rules[2].backends`. `Ok(None)` when every weight is 0.
    pub fn from_wire(
        backends: &[wire::BackendConfig],
        field: &str,
    ) -> Result<Option<Split>, Vec<String>> {
        let problems: Vec<String> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.weight > MAX_WEIGHT)
            .map(|(i, b)| format!("{field}[{i}].weight: {} is above {MAX_WEIGHT}", b.weight))
            .collect();
        if !problems.is_empty() {
            return Err(problems);
        }
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        Ok(Split::new(&weights))
    }

    /// The index of the chosen backend, with probability its weight over the total; a
    /// backend of weight 0 is never chosen.
    pub fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if self.cumulative.len() == 1 || total == 0 {
            return 0;
        }
        let x = rng.random_range(0..total);
        self.cumulative.partition_point(|c| *c <= x)
    }

    /// How many backends the split chooses among, zero weights included.
    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    /// Always `false`: a split has at least one backend.
    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn picks_follow_the_weights() {
        let mut rng = StdRng::seed_from_u64(7);
        for weights in [
            &[90, 10][..],
            &[1, 0, 1],
            &[1, 1, 1],
            &[1_000_000, 1],
            &[0, 5],
        ] {
            let split = Split::new(weights).unwrap();
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..10_000 {
                counts[split.pick(&mut rng)] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (i, w) in weights.iter().enumerate() {
                let want = f64::from(*w) * 100.0 / f64::from(total);
                let got = f64::from(counts[i]) / 100.0;
                assert!(
                    (got - want).abs() <= 2.0,
                    "{weights:?}: backend {i} got {got}%, want {want}%"
                );
                if *w == 0 {
                    assert_eq!(counts[i], 0, "{weights:?}: weight 0 was picked");
                }
            }
        }
    }

    #[test]
    fn all_zero_or_no_weights_make_no_split() {
        assert_eq!(Split::new(&[]), None);
        assert_eq!(Split::new(&[0, 0]), None);
        assert_eq!(Split::new(&[0, 3]).map(|s| s.len()), Some(2));
    }

    #[test]
    fn weights_above_the_limit_are_refused_naming_the_field() {
        let backend = |weight| wire::BackendConfig {
            service: None,
            display: None,
            weight,
        };
        let found = Split::from_wire(
            &[backend(1), backend(MAX_WEIGHT + 1)],
            "route.rules[0].backends",
        )
        .unwrap_err();
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with("route.rules[0].backends[1].weight: "),
            "{found:?}"
        );
        assert_eq!(Split::from_wire(&[backend(0)], "b"), Ok(None));
        assert!(
            Split::from_wire(&[backend(MAX_WEIGHT)], "b")
                .unwrap()
                .is_some()
        );
    }
}
