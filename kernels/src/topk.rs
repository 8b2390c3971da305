//! Top-k selection over a logit row in a fixed-capacity heap (`heapless`): no
//! allocation per token, O(len · log k).

use std::cmp::Ordering;

use heapless::binary_heap::{BinaryHeap, Min};

/// One candidate: score (a logit, a probability) and its index.
#[derive(Debug, Clone, Copy)]
pub struct Cand {
    /// The value ranked.
    pub score: f32,
    /// Its index in the row (the token id).
    pub id: u32,
}

// Orders by score (total order: NaN above +inf, as `f32::total_cmp`), then
// prefers the lower id, so "greater" means "better".
impl Ord for Cand {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.id.cmp(&self.id))
    }
}
impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Cand {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Cand {}

/// The `k` best entries of `scores` (`k` is capped at `N`), best first; ties
/// go to the lower index.
pub fn top_k<const N: usize>(scores: &[f32], k: usize) -> heapless::Vec<Cand, N> {
    let k = k.min(N);
    // A min-heap of the k best seen so far: its top is the weakest, evicted first.
    let mut heap: BinaryHeap<Cand, Min, N> = BinaryHeap::new();
    for (id, &score) in scores.iter().enumerate() {
        let c = Cand {
            score,
            id: id as u32,
        };
        if heap.len() < k {
            let _ = heap.push(c);
        } else if heap.peek().is_some_and(|worst| c > *worst) {
            heap.pop();
            let _ = heap.push(c);
        }
    }
    let mut best = heap.into_vec();
    best.sort_unstable_by(|a, b| b.cmp(a));
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Equal to sorting the whole row and taking the head.
        #[test]
        fn equals_a_full_sort(scores in proptest::collection::vec(-5i8..5, 0..300), k in 0usize..40) {
            // Small integers, so many ties.
            let scores: Vec<f32> = scores.into_iter().map(f32::from).collect();
            let got = top_k::<32>(&scores, k);
            let mut all: Vec<Cand> = scores.iter().enumerate().map(|(i, &s)| Cand { score: s, id: i as u32 }).collect();
            all.sort_unstable_by(|a, b| b.cmp(a));
            all.truncate(k.min(32));
            let got: Vec<(u32, f32)> = got.iter().map(|c| (c.id, c.score)).collect();
            let want: Vec<(u32, f32)> = all.iter().map(|c| (c.id, c.score)).collect();
            prop_assert_eq!(got, want);
        }
    }
}
