//! Sampling: plain functions over logits, testable without a model.
//!
//! Order as in llama.cpp's default chain: repetition penalty, top-k, top-p, min-p, temperature,
//! then a draw from a seeded ChaCha8 stream (reproducible across platforms and versions).

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use super::EngineError;

/// What a request may set about sampling. Temperature 0 means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy; otherwise logits are divided by it. Range [0, 5].
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = off). Range (0, 1].
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the best one (0 = off). Range [0, 1].
    pub min_p: f32,
    /// Penalty on tokens seen in the last `repeat_last_n` tokens (1 = off). Range (0, 10].
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random stream; the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

fn check(name: &str, v: f32, ok: bool, range: &str) -> Result<(), EngineError> {
    if !v.is_finite() {
        return Err(EngineError::InvalidParam(format!(
            "{name} must be a finite number, got {v}"
        )));
    }
    if !ok {
        return Err(EngineError::InvalidParam(format!(
            "{name} must be in {range}, got {v}"
        )));
    }
    Ok(())
}

impl SamplingParams {
    /// Rejects NaN, infinities and out-of-range values, naming the parameter.
    pub fn validate(&self) -> Result<(), EngineError> {
        check(
            "temperature",
            self.temperature,
            (0.0..=5.0).contains(&self.temperature),
            "[0, 5]",
        )?;
        check(
            "top_p",
            self.top_p,
            self.top_p > 0.0 && self.top_p <= 1.0,
            "(0, 1]",
        )?;
        check(
            "min_p",
            self.min_p,
            (0.0..=1.0).contains(&self.min_p),
            "[0, 1]",
        )?;
        check(
            "repeat_penalty",
            self.repeat_penalty,
            self.repeat_penalty > 0.0 && self.repeat_penalty <= 10.0,
            "(0, 10]",
        )?;
        Ok(())
    }
}

/// A sampler for one answer: parameters plus its random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    candidates: Vec<(u32, f32)>,
}

/// Index of the largest value (the first one on ties); NaN never wins; 0 when nothing is
/// above `-inf`.
///
/// Two passes the compiler makes vector instructions of: the maximum in 16 running lanes (a
/// NaN is never greater, so never kept), then the first value equal to it. One pass keeping
/// the index was one dependent compare a value, ~25 µs over SmolLM2's 49,152 logits: each
/// answer's thread spends it between two decode steps, while the others wait for its token.
pub fn argmax(values: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    // ±0 compare equal, and the first of either is what one pass would keep
    values.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// Applies llama.cpp's repetition penalty in place.
pub fn apply_repeat_penalty(logits: &mut [f32], penalty: f32, recent: &[u32]) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::with_capacity(recent.len());
    for &t in recent {
        if seen.insert(t)
            && let Some(l) = logits.get_mut(t as usize)
        {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// log(sum(exp(logits))), computed stably (the normalizer of every log-probability).
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    logits
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max
}

/// The top `k` (id, log-probability) pairs of the distribution `softmax(logits)`, most likely first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let log_sum = log_sum_exp(logits);
    let mut idx: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    idx.truncate(k);
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    idx.into_iter().map(|(i, l)| (i, l - log_sum)).collect()
}

/// Log-probability of one token under `softmax(logits)`.
pub fn logprob_of(logits: &[f32], id: u32) -> f32 {
    let log_sum = log_sum_exp(logits);
    logits
        .get(id as usize)
        .map(|&l| l - log_sum)
        .unwrap_or(f32::NEG_INFINITY)
}

impl Sampler {
    /// A sampler for validated parameters.
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `logits` may be modified (penalty); `history` is every token so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let start = history.len().saturating_sub(p.repeat_last_n);
        apply_repeat_penalty(logits, p.repeat_penalty, &history[start..]);
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (i as u32, l)),
        );
        if c.is_empty() {
            return 0;
        }
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // probabilities at temperature 1 decide the top-p / min-p sets, as in llama.cpp
        let max = c[0].1;
        let mut probs: Vec<f64> = c.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            c.truncate(keep);
        }
        let t = p.temperature as f64;
        let weights: Vec<f64> = c
            .iter()
            .map(|&(_, l)| (((l - max) as f64) / t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        // 53 random bits -> uniform in [0, 1)
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        let mut acc = 0.0;
        for (i, w) in weights.iter().enumerate() {
            acc += w;
            if u < acc {
                return c[i].0;
            }
        }
        c[c.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::rand_core::RngCore;

    /// One pass keeping the index: what [`argmax`] must agree with.
    fn argmax_one_pass(values: &[f32]) -> u32 {
        let (mut best, mut best_v) = (0, f32::NEG_INFINITY);
        for (i, &v) in values.iter().enumerate() {
            if v > best_v {
                (best, best_v) = (i, v);
            }
        }
        best as u32
    }

    /// Ties, NaN, infinities, signed zeros and every tail length, against the one-pass form.
    #[test]
    fn argmax_agrees_with_one_pass_on_every_kind_of_value() {
        let specials = [
            f32::NAN,
            f32::NEG_INFINITY,
            f32::INFINITY,
            0.0,
            -0.0,
            1.5,
            -1.5,
            f32::MAX,
            f32::MIN,
            1e-45,
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for len in 0..80 {
            for _ in 0..200 {
                let v: Vec<f32> = (0..len)
                    .map(|_| specials[rng.next_u32() as usize % specials.len()])
                    .collect();
                assert_eq!(argmax(&v), argmax_one_pass(&v), "{v:?}");
            }
        }
        let big: Vec<f32> = (0..49_152).map(|_| rng.next_u32() as f32).collect();
        assert_eq!(argmax(&big), argmax_one_pass(&big));
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
        assert_eq!(argmax(&[-0.0, 0.0, -0.0]), 0);
    }

    fn params(t: f32, k: usize, p: f32, m: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p: m,
            seed,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut s = Sampler::new(params(0.0, 0, 1.0, 0.0, 7));
        let mut l = vec![0.1, 3.0, -1.0, 2.9];
        for _ in 0..10 {
            assert_eq!(s.sample(&mut l.clone(), &[]), 1);
        }
        assert_eq!(s.sample(&mut l, &[]), argmax(&[0.1, 3.0, -1.0, 2.9]));
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, seed));
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn validation_names_the_parameter() {
        let e = params(f32::NAN, 0, 1.0, 0.0, 0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("temperature") && e.contains("finite"), "{e}");
        assert!(
            params(-0.5, 0, 1.0, 0.0, 0)
                .validate()
                .unwrap_err()
                .to_string()
                .contains("temperature")
        );
        assert!(
            params(1.0, 0, 0.0, 0.0, 0)
                .validate()
                .unwrap_err()
                .to_string()
                .contains("top_p")
        );
        assert!(
            params(1.0, 0, 1.0, 1.5, 0)
                .validate()
                .unwrap_err()
                .to_string()
                .contains("min_p")
        );
        assert!(params(1.0, 0, f32::INFINITY, 0.0, 0).validate().is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }

    #[test]
    fn repeat_penalty_lowers_seen_tokens() {
        let mut l = vec![2.0, -2.0, 2.0];
        apply_repeat_penalty(&mut l, 2.0, &[0, 1, 1]);
        assert_eq!(l, vec![1.0, -4.0, 2.0]);
    }

    #[test]
    fn top_logprobs_are_sorted_log_probabilities() {
        let l = vec![0.0f32, 1.0, 2.0, 3.0];
        let top = top_logprobs(&l, 2);
        assert_eq!(top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
        let total: f32 = l.iter().map(|&x| (x - 3.0).exp()).sum();
        assert!((top[0].1 - (1.0 / total).ln()).abs() < 1e-5);
        assert!((logprob_of(&l, 3) - top[0].1).abs() < 1e-6);
    }

    proptest! {
        #[test]
        fn never_picks_outside_top_k(logits in prop::collection::vec(-10.0f32..10.0, 2..64), k in 1usize..8, seed: u64) {
            let mut s = Sampler::new(params(1.5, k, 1.0, 0.0, seed));
            let mut sorted = logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[(k - 1).min(sorted.len() - 1)];
            let id = s.sample(&mut logits.clone(), &[]) as usize;
            prop_assert!(logits[id] >= kth);
        }

        #[test]
        fn never_picks_outside_top_p(logits in prop::collection::vec(-5.0f32..5.0, 2..64), p in 0.05f32..1.0, seed: u64) {
            let mut s = Sampler::new(params(1.0, 0, p, 0.0, seed));
            let id = s.sample(&mut logits.clone(), &[]) as usize;
            // the nucleus: tokens whose higher-ranked mass (excluding themselves) is below p
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let total: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
            let above: f64 = logits.iter().enumerate()
                .filter(|&(j, &l)| l > logits[id] || (l == logits[id] && j < id))
                .map(|(_, &l)| ((l - max) as f64).exp() / total).sum();
            prop_assert!(above < p as f64 + 1e-9);
        }

        #[test]
        fn never_picks_below_min_p(logits in prop::collection::vec(-5.0f32..5.0, 2..64), m in 0.0f32..1.0, seed: u64) {
            let mut s = Sampler::new(params(2.0, 0, 1.0, m, seed));
            let id = s.sample(&mut logits.clone(), &[]) as usize;
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let ratio = ((logits[id] - max) as f64).exp();
            prop_assert!(ratio >= m as f64 - 1e-9);
        }
    }
}
