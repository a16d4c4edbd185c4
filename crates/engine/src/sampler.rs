//! Per-request sampling. Each sequence owns its random generator, so a seeded request draws
//! the same tokens alone or in any batch.

use glassbox_protocol::{SamplingParams, TokenLogprob};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Output token counts, for presence and frequency penalties.
    counts: HashMap<u32, u32>,
}

pub struct Sampled {
    pub token: u32,
    pub logprob: Option<TokenLogprob>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Sampler { params, rng: ChaCha8Rng::seed_from_u64(seed), counts: HashMap::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from raw logits. `context` is prompt + output (repetition penalty);
    /// `banned` are tokens not allowed yet (EOS before `min_tokens`).
    pub fn sample(&mut self, logits: &[f32], context: &[u32], banned: &[u32]) -> Sampled {
        let p = &self.params;
        let mut l = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut seen: Vec<u32> = context.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 { *x / p.repetition_penalty } else { *x * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        for &t in banned {
            if let Some(x) = l.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        let (greedy, top) = (p.temperature <= 0.0, p.logprobs);
        let token = if greedy { argmax(&l) } else { self.draw(&mut l) };
        *self.counts.entry(token).or_default() += 1;
        let logprob = top.map(|top| logprob_of(logits, token, top));
        Sampled { token, logprob }
    }

    fn draw(&mut self, l: &mut [f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let mut cand: Vec<(u32, f32)> = l.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (i as u32, v * inv_t)).collect();
        if cand.is_empty() {
            return argmax(l);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|&(_, v)| (v - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.min_p > 0.0 {
            let cut = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&x| x >= cut).count().max(1);
            cand.truncate(keep);
            probs.truncate(keep);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            cand.truncate(keep);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &x) in probs.iter().enumerate() {
            if r < x {
                return cand[i].0;
            }
            r -= x;
        }
        cand[cand.len() - 1].0
    }
}

/// Lowest index among the maxima.
pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

/// The chosen token's log-probability under the model's distribution, with the top `top`.
fn logprob_of(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let lse = max + logits.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &v) in logits.iter().enumerate() {
            if best.len() < top || v > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, b)| b >= v);
                best.insert(at, (i as u32, v));
                best.truncate(top);
            }
        }
    }
    TokenLogprob {
        token,
        logprob: logits[token as usize] - lse,
        top: best.into_iter().map(|(i, v)| (i, v - lse)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_penalties_and_bans() {
        let logits = [1.0, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(params(|_| {}), 0);
        assert_eq!(s.sample(&logits, &[], &[]).token, 1);
        // Repetition penalty on token 1 (3.0 / 1.2 = 2.5 < 2.9).
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 1.2), 0);
        assert_eq!(s.sample(&logits, &[1], &[]).token, 2);
        // Frequency penalty grows with each use.
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 0.2), 0);
        assert_eq!(s.sample(&logits, &[], &[]).token, 1);
        assert_eq!(s.sample(&logits, &[], &[]).token, 2);
        // Presence penalty: once is enough.
        let mut s = Sampler::new(params(|p| p.presence_penalty = 0.5), 0);
        assert_eq!(s.sample(&logits, &[], &[]).token, 1);
        assert_eq!(s.sample(&logits, &[], &[]).token, 2);
        let mut s = Sampler::new(params(|_| {}), 0);
        assert_eq!(s.sample(&logits, &[], &[1]).token, 2);
    }

    #[test]
    fn seeded_sampling_repeats_and_filters_apply() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| p.temperature = 1.0), seed);
            (0..20).map(|_| s.sample(&logits, &[], &[]).token).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // top_k = 1 is greedy whatever the temperature.
        let mut s = Sampler::new(params(|p| {
            p.temperature = 5.0;
            p.top_k = 1
        }), 3);
        assert!((0..20).all(|_| s.sample(&logits, &[], &[]).token == argmax(&logits)));
        // A tiny top_p keeps only the best token; a high min_p too.
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.top_p = 0.01
        }), 3);
        assert!((0..20).all(|_| s.sample(&logits, &[], &[]).token == argmax(&logits)));
        // The runner-up is exp(-0.1) = 0.905 as likely as the best: below a min_p of 0.99.
        let sharp: Vec<f32> = (0..50).map(|i| i as f32 * 0.1).collect();
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.min_p = 0.99
        }), 3);
        assert!((0..20).all(|_| s.sample(&sharp, &[], &[]).token == 49));
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.min_p = 0.5
        }), 3);
        let drawn: std::collections::HashSet<u32> = (0..200).map(|_| s.sample(&sharp, &[], &[]).token).collect();
        assert!(drawn.len() > 1 && drawn.iter().all(|&t| t >= 43), "{drawn:?}");
    }

    #[test]
    fn logprobs_are_normalized_with_sorted_alternatives() {
        let logits = [0.0f32, 1.0, 2.0];
        let mut s = Sampler::new(params(|p| p.logprobs = Some(2)), 0);
        let lp = s.sample(&logits, &[], &[]).logprob.unwrap();
        let total: f32 = logits.iter().map(|&l| (l - 2.0f32).exp()).sum();
        assert!((lp.logprob - (-(total.ln()))).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }
}
