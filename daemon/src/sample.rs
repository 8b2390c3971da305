//! Token sampling, shared by every front end (CLI, socket API, MQTT).
//!
//! Order of operations, as in Hugging Face and vLLM:
//! 1. penalties on the raw logits: repetition (CTRL-style, over prompt and
//!    generated tokens), presence and frequency (OpenAI-style, generated tokens only);
//! 2. logprobs, when asked, are the log-softmax of those penalised logits;
//! 3. temperature 0 is greedy (argmax, lowest id on ties); otherwise the logits
//!    are divided by the temperature, cut by top-k, min-p and top-p, and one
//!    token is drawn from what is left.
//!
//! The sampler allocates once per request (its candidate buffer and the token
//! counts); [`Sampler::sample`] itself never allocates. Top-k selection and the
//! top-n logprobs use `ember_kernels::topk` (a fixed-capacity `heapless` heap).

use ember_kernels::topk::{top_k, Cand};
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Largest `top_k` served by the fixed-capacity heap; larger values fall back
/// to a full sort of the (preallocated) candidate buffer.
pub const TOP_K_HEAP: usize = 256;
/// Most alternatives a request may ask for with `logprobs` (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

/// Sampling settings of one request. The defaults sample from the model's
/// distribution unchanged (temperature 1, no cut, no penalty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// 0 means no min-p cut.
    pub min_p: f32,
    /// 1 means none; > 1 discourages any token already in prompt or output.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Same seed, same model, same prompt: same text.
    pub seed: Option<u64>,
    /// Return this many most likely alternatives with each token (0..=20).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

/// A sampling value out of its range; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid sampling parameter `{field}`: {reason}")]
pub struct ParamError {
    /// The offending field, as spelled in the APIs.
    pub field: &'static str,
    /// Why it was refused.
    pub reason: String,
}

impl SamplingParams {
    /// Greedy decoding (temperature 0).
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Refuse values that would make sampling meaningless or undefined.
    pub fn validate(&self) -> Result<(), ParamError> {
        let err = |field, reason: &str| {
            Err(ParamError {
                field,
                reason: reason.into(),
            })
        };
        let finite = |v: f32| v.is_finite();
        if !finite(self.temperature) || self.temperature < 0.0 || self.temperature > 100.0 {
            return err("temperature", "must be between 0 and 100");
        }
        if !finite(self.top_p) || self.top_p <= 0.0 || self.top_p > 1.0 {
            return err("top_p", "must be in (0, 1]");
        }
        if !finite(self.min_p) || !(0.0..=1.0).contains(&self.min_p) {
            return err("min_p", "must be in [0, 1]");
        }
        if !finite(self.repetition_penalty) || self.repetition_penalty <= 0.0 {
            return err("repetition_penalty", "must be > 0 (1 disables it)");
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !finite(v) || !(-2.0..=2.0).contains(&v) {
                return err(field, "must be between -2 and 2");
            }
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return err("logprobs", "at most 20 alternatives");
            }
        }
        Ok(())
    }
}

/// The top-n alternatives of one step, best first: (token id, logprob).
pub type TopLogprobs = heapless::Vec<(u32, f32), MAX_LOGPROBS>;

/// What [`Sampler::sample`] picked.
#[derive(Debug, Clone)]
pub struct Sampled {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability under the penalised model distribution, when the
    /// request asked for logprobs (NaN otherwise).
    pub logprob: f32,
    /// The most likely alternatives, when the request asked for logprobs.
    pub top: TopLogprobs,
}

/// Per-request sampling state: RNG, token counts, scratch buffer.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Times each token was generated (presence/frequency penalties).
    generated: Vec<u32>,
    /// Token seen in prompt or output (repetition penalty).
    seen: Vec<bool>,
    cands: Vec<Cand>,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab` tokens, with the prompt's tokens
    /// counted for the repetition penalty.
    pub fn new(params: SamplingParams, vocab: usize, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(random_seed);
        let mut seen = vec![false; vocab];
        for &t in prompt {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            generated: vec![0; vocab],
            seen,
            cands: Vec::with_capacity(vocab),
        }
    }

    /// The request's parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from `logits` (modified in place by the penalties)
    /// and count it as generated.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        self.apply_penalties(logits);
        // The normaliser costs an exp per vocabulary entry (as much as a small
        // model's whole step): only computed when logprobs were asked for.
        let log_z = match self.params.logprobs {
            Some(_) => log_sum_exp(logits).1,
            None => f32::NAN,
        };
        let token = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        let mut top = TopLogprobs::new();
        if let Some(n) = self.params.logprobs.filter(|&n| n > 0) {
            for c in top_k::<MAX_LOGPROBS>(logits, n) {
                let _ = top.push((c.id, c.score - log_z));
            }
        }
        let t = token as usize;
        if t < self.generated.len() {
            self.generated[t] += 1;
            self.seen[t] = true;
        }
        Sampled {
            token,
            logprob: logits[t] - log_z,
            top,
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for (l, _) in logits.iter_mut().zip(&self.seen).filter(|(_, &s)| s) {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (l, &n) in logits
                .iter_mut()
                .zip(&self.generated)
                .filter(|(_, &n)| n > 0)
            {
                *l -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
    }

    /// Temperature, top-k, min-p, top-p, then one draw.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = self.params.clone();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.cands.clear();
        if p.top_k > 0 && p.top_k <= TOP_K_HEAP {
            self.cands.extend(top_k::<TOP_K_HEAP>(logits, p.top_k));
        } else {
            self.cands
                .extend(logits.iter().enumerate().map(|(id, &l)| Cand {
                    score: l,
                    id: id as u32,
                }));
        }
        // Best first, for the cuts (`top_k` already returns them so; the full row
        // needs the sort).
        if p.top_k > 0 || p.top_p < 1.0 {
            self.cands.sort_unstable_by(|a, b| b.cmp(a));
        }
        if p.top_k > TOP_K_HEAP {
            self.cands.truncate(p.top_k);
        }
        // Probabilities (unnormalised) at this temperature; the best token has weight 1.
        let inv_t = 1.0 / p.temperature;
        let mut total = 0.0f64;
        for c in self.cands.iter_mut() {
            c.score = ((c.score - max) * inv_t).exp();
            total += c.score as f64;
        }
        if p.min_p > 0.0 {
            let best = self.cands.iter().map(|c| c.score).fold(0.0f32, f32::max);
            let floor = p.min_p * best;
            self.cands.retain(|c| c.score >= floor);
            total = self.cands.iter().map(|c| c.score as f64).sum();
        }
        if p.top_p < 1.0 {
            let target = p.top_p as f64 * total;
            let mut acc = 0.0f64;
            let mut keep = self.cands.len();
            for (i, c) in self.cands.iter().enumerate() {
                acc += c.score as f64;
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.cands.truncate(keep.max(1));
            total = self.cands.iter().map(|c| c.score as f64).sum();
        }
        let r = uniform(&mut self.rng) * total;
        let mut acc = 0.0f64;
        for c in &self.cands {
            acc += c.score as f64;
            if r < acc {
                return c.id;
            }
        }
        self.cands.last().map_or(0, |c| c.id)
    }
}

/// Index of the largest logit, lowest index on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    ember_kernels::argmax(logits) as u32
}

pub use ember_kernels::log_sum_exp;

fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        f(&mut p);
        p
    }

    /// Distinct logits (ties would make "the top k" ambiguous).
    fn distinct_logits() -> impl Strategy<Value = Vec<f32>> {
        (2usize..300, any::<u64>()).prop_map(|(n, seed)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            for i in (1..n).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
            v.iter().map(|x| x * 10.0 - 5.0).collect()
        })
    }

    fn rank_of(logits: &[f32], id: u32) -> usize {
        logits.iter().filter(|&&l| l > logits[id as usize]).count()
    }

    proptest! {
        #[test]
        fn top_k_stays_in_the_top_k(logits in distinct_logits(), k in 1usize..40, seed in any::<u64>(), t in 0.1f32..3.0) {
            let mut s = Sampler::new(params(|p| { p.top_k = k; p.seed = Some(seed); p.temperature = t; }), logits.len(), &[]);
            for _ in 0..8 {
                let tok = s.sample(&mut logits.clone()).token;
                prop_assert!(rank_of(&logits, tok) < k);
            }
        }

        #[test]
        fn large_top_k_takes_the_sort_path(logits in distinct_logits(), seed in any::<u64>()) {
            let k = TOP_K_HEAP + 1;
            let mut s = Sampler::new(params(|p| { p.top_k = k; p.seed = Some(seed); }), logits.len(), &[]);
            let tok = s.sample(&mut logits.clone()).token;
            prop_assert!(rank_of(&logits, tok) < k);
        }

        #[test]
        fn top_p_stays_in_the_nucleus(logits in distinct_logits(), top_p in 0.05f32..1.0, seed in any::<u64>()) {
            let mut s = Sampler::new(params(|p| { p.top_p = top_p; p.seed = Some(seed); }), logits.len(), &[]);
            let tok = s.sample(&mut logits.clone()).token;
            // The nucleus: the smallest set of best tokens whose mass reaches top_p.
            let (_, lz) = log_sum_exp(&logits);
            let mut probs: Vec<f64> = logits.iter().map(|&l| ((l - lz) as f64).exp()).collect();
            probs.sort_by(|a, b| b.total_cmp(a));
            let mut acc = 0.0;
            let mut size = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= top_p as f64 - 1e-6 { size = i + 1; break; }
            }
            prop_assert!(rank_of(&logits, tok) < size + 1, "rank {} nucleus {}", rank_of(&logits, tok), size);
        }

        #[test]
        fn min_p_never_picks_below_the_floor(logits in distinct_logits(), min_p in 0.01f32..1.0, seed in any::<u64>()) {
            let mut s = Sampler::new(params(|p| { p.min_p = min_p; p.seed = Some(seed); }), logits.len(), &[]);
            let tok = s.sample(&mut logits.clone()).token;
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            let rel = (logits[tok as usize] - max).exp();
            prop_assert!(rel >= min_p * 0.9999, "picked p/pmax {rel} < {min_p}");
        }

        #[test]
        fn greedy_is_argmax(logits in distinct_logits()) {
            let mut s = Sampler::new(SamplingParams::greedy(), logits.len(), &[]);
            prop_assert_eq!(rank_of(&logits, s.sample(&mut logits.clone()).token), 0);
        }
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..500).map(|i| ((i * 37) % 101) as f32 * 0.05).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed)), logits.len(), &[]);
            (0..64)
                .map(|_| s.sample(&mut logits.clone()).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let base = vec![2.0f32, 1.9, -1.0, -1.05];
        // Repetition penalty covers the prompt: token 0 (seen) drops below token 1.
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 1.5;
            }),
            4,
            &[0, 2],
        );
        let mut l = base.clone();
        assert_eq!(s.sample(&mut l).token, 1);
        assert_eq!(l, vec![2.0 / 1.5, 1.9, -1.5, -1.05]);
        // Presence/frequency only count generated tokens, not the prompt.
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.presence_penalty = 0.05;
                p.frequency_penalty = 0.1;
            }),
            4,
            &[1],
        );
        assert_eq!(s.sample(&mut base.clone()).token, 0); // no penalty yet
        let mut l = base.clone();
        assert_eq!(s.sample(&mut l).token, 1); // 0 was generated once: 2.0 - 0.15 < 1.9
        assert!((l[0] - 1.85).abs() < 1e-6 && l[1] == 1.9);
        let mut l = base.clone();
        s.sample(&mut l);
        assert!((l[0] - 1.85).abs() < 1e-6 && (l[1] - 1.75).abs() < 1e-6);
    }

    #[test]
    fn temperature_zero_ties_pick_lowest_id() {
        let mut s = Sampler::new(SamplingParams::greedy(), 4, &[]);
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 0.0]).token, 1);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.logprobs = Some(3);
            }),
            5,
            &[],
        );
        let out = s.sample(&mut [0.0, 2.0, 1.0, 3.0, -1.0]);
        let ids: Vec<u32> = out.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![3, 1, 2]);
        let z: f32 = [0.0f32, 2.0, 1.0, 3.0, -1.0].iter().map(|x| x.exp()).sum();
        assert!((out.logprob - (3.0 - z.ln())).abs() < 1e-5);
        assert!((out.top[0].1 - out.logprob).abs() < 1e-6);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = [
            params(|p| p.temperature = -1.0),
            params(|p| p.top_p = 0.0),
            params(|p| p.min_p = 1.5),
            params(|p| p.repetition_penalty = 0.0),
            params(|p| p.presence_penalty = 3.0),
            params(|p| p.logprobs = Some(21)),
            params(|p| p.temperature = f32::NAN),
        ];
        let fields: Vec<_> = bad
            .iter()
            .map(|p| p.validate().unwrap_err().field)
            .collect();
        assert_eq!(
            fields,
            [
                "temperature",
                "top_p",
                "min_p",
                "repetition_penalty",
                "presence_penalty",
                "logprobs",
                "temperature"
            ]
        );
        assert!(SamplingParams::default().validate().is_ok());
    }
}
