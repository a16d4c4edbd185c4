//! The mixture-of-experts MLP (Mixtral, Qwen3-MoE, OLMoE): a router scores every expert per
//! token, the token's `top_k` experts (gated MLPs) run on it, and their outputs are summed
//! with the router's softmax weights.
//!
//! Batch invariance: each expert runs once per step over the rows that chose it, through the
//! same row-independent kernels as every linear layer, and each row's outputs are summed in
//! the order of its own ranking. So a token's numbers depend on its row alone, not on which
//! other tokens picked the same experts.

use crate::config::{Activation, MoeConfig};
use crate::error::Result;
use crate::forward::ForwardCtx;
use crate::layers::activate;
use crate::weights::{to_vec, Linear, Vb};
use candle_core::{Device, Tensor};
use glassbox_protocol::{HookName, Site};

pub struct Moe {
    router: Linear,
    experts: Vec<Expert>,
    cfg: MoeConfig,
    act: Activation,
}

struct Expert {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Moe {
    /// `vb` is the layer's `mlp`: the router is `mlp.gate`, the experts `mlp.experts.{e}`.
    pub fn load(vb: &Vb, d: usize, cfg: MoeConfig, act: Activation) -> Result<Self> {
        let (n, m) = (cfg.num_experts, cfg.expert_size);
        let router = vb.linear("gate", d, n, false)?;
        let ex = vb.pp("experts");
        let (gates, ups, downs) = (ex.experts("gate_proj", n, d, m)?, ex.experts("up_proj", n, d, m)?, ex.experts("down_proj", n, m, d)?);
        let experts = gates.into_iter().zip(ups).zip(downs).map(|((gate, up), down)| Expert { gate, up, down }).collect();
        Ok(Moe { router, experts, cfg, act })
    }

    pub fn forward(&self, x: &Tensor, layer: usize, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let name = |site| HookName::block(layer, site);
        let l = Some(layer);
        let (n, d) = x.dims2()?;
        let k = self.cfg.top_k;
        let logits = ctx.timed(l, "router", || self.router.forward(x))?;
        let logits = ctx.hook(name(Site::RouterLogits), logits)?;
        let (ids, weights) = route(&to_vec(&logits)?, self.cfg);
        // The chosen experts are observed (steering them is refused at admission); the
        // weights may be replaced by a steering handler and are read back.
        let id_values = ids.iter().map(|&e| e as f32).collect();
        ctx.hook(name(Site::ExpertIds), Tensor::from_vec(id_values, (n, k), &Device::Cpu)?)?;
        let weights = ctx.hook(name(Site::ExpertWeights), Tensor::from_vec(weights, (n, k), &Device::Cpu)?)?;
        let weights = to_vec(&weights)?;
        let t = ctx.start();
        let xs = to_vec(x)?;
        // outputs[(row * k + rank) * d..]: expert `ids[row * k + rank]` applied to `row`.
        let mut outputs = vec![0f32; n * k * d];
        // Each expert's slots (row * k + rank), in row order, in one pass over the choices.
        let mut slots_of = vec![vec![]; self.experts.len()];
        for (s, &e) in ids.iter().enumerate() {
            slots_of[e].push(s);
        }
        for (expert, slots) in self.experts.iter().zip(&slots_of) {
            if slots.is_empty() {
                continue;
            }
            let rows: Vec<f32> = slots.iter().flat_map(|&s| xs[(s / k) * d..(s / k + 1) * d].iter().copied()).collect();
            let y = expert.forward(&Tensor::from_vec(rows, (slots.len(), d), &Device::Cpu)?, self.act)?;
            for (&s, row) in slots.iter().zip(to_vec(&y)?.chunks_exact(d)) {
                outputs[s * d..(s + 1) * d].copy_from_slice(row);
            }
        }
        let mut out = vec![0f32; n * d];
        for (r, row) in out.chunks_exact_mut(d).enumerate() {
            for j in 0..k {
                let w = weights[r * k + j];
                let y = &outputs[(r * k + j) * d..(r * k + j + 1) * d];
                for (o, v) in row.iter_mut().zip(y) {
                    *o += w * v;
                }
            }
        }
        ctx.done(t, l, "experts");
        Ok(Tensor::from_vec(out, (n, d), &Device::Cpu)?)
    }
}

impl Expert {
    fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let h = (activate(act, &self.gate.forward(x)?)? * self.up.forward(x)?)?;
        self.down.forward(&h)
    }
}

/// Per row of router logits `[n, E]`: the `top_k` experts by softmax probability (best first,
/// ties to the lower id) and their weights, renormalized to sum to 1 when the family does.
pub fn route(logits: &[f32], cfg: MoeConfig) -> (Vec<usize>, Vec<f32>) {
    let (e, k) = (cfg.num_experts, cfg.top_k);
    let mut ids = Vec::with_capacity(logits.len() / e * k);
    let mut weights = Vec::with_capacity(ids.capacity());
    for row in logits.chunks_exact(e) {
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let exp: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
        let top = &order[..k];
        let probs: Vec<f32> = top.iter().map(|&i| exp[i] / sum).collect();
        let norm = if cfg.norm_top_k { probs.iter().sum::<f32>() } else { 1.0 };
        ids.extend_from_slice(top);
        weights.extend(probs.iter().map(|p| p / norm));
    }
    (ids, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(logits: &[f32], norm: bool, expect_ids: &[usize], expect_weights: &[f32]) {
        let cfg = MoeConfig { num_experts: 4, top_k: 2, expert_size: 1, norm_top_k: norm };
        let (ids, w) = route(logits, cfg);
        assert_eq!(ids, expect_ids);
        for (a, b) in w.iter().zip(expect_weights) {
            assert!((a - b).abs() < 1e-6, "{w:?} vs {expect_weights:?}");
        }
    }

    #[test]
    fn routing() {
        // softmax([0, ln 2, ln 3, ln 4]) = [0.1, 0.2, 0.3, 0.4].
        let l = [0.0, 2f32.ln(), 3f32.ln(), 4f32.ln()];
        check(&l, false, &[3, 2], &[0.4, 0.3]);
        check(&l, true, &[3, 2], &[4.0 / 7.0, 3.0 / 7.0]);
        // Ties go to the lower id; rows are independent.
        check(&[1.0, 1.0, 1.0, 0.0, 5.0, 0.0, 0.0, 6.0], true, &[0, 1, 3, 0], &[0.5, 0.5, 1.0 / (1.0 + (-1f32).exp()), 1.0 - 1.0 / (1.0 + (-1f32).exp())]);
    }
}
