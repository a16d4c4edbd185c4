//! One generic decoder for every supported architecture; [`ModelConfig`] switches the parts.
//!
//! Architecture invariant: every activation named in HOOKS.md passes through exactly one
//! `ctx.hook(..)` call here, and a hook that nobody asked for returns its input untouched.

use crate::config::{Activation, Arch, ModelConfig};
use crate::error::{ModelError, Result};
use crate::forward::ForwardCtx;
use crate::kernels::{attention, AttnShape};
use crate::layers::{activate, RmsNorm, Rope};
use crate::weights::{to_vec, Linear, Vb};
use std::sync::Arc;
use candle_core::{Device, Tensor};
use glassbox_protocol::{HookName, Site};

pub struct DecoderModel {
    pub cfg: ModelConfig,
    /// `[vocab, d]`, already scaled where the architecture scales embeddings.
    embed: Arc<Vec<f32>>,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope_global: Rope,
    rope_local: Rope,
}

struct Block {
    ln1: RmsNorm,
    attn: Attention,
    ln1_post: Option<RmsNorm>,
    ln2: RmsNorm,
    mlp: Mlp,
    ln2_post: Option<RmsNorm>,
    sliding: bool,
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl DecoderModel {
    /// `vb` is the root of the weight names (`model.layers.0...`, `lm_head`).
    pub fn load(vb: &Vb, cfg: ModelConfig, is_gguf: bool) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        // Gemma stores norms as `w` for `(1 + w)`; llama.cpp's converter already added the 1.
        let norm_offset = if cfg.arch == Arch::Gemma3 && !is_gguf { 1.0 } else { 0.0 };
        let m = vb.pp("model");
        let embed = Arc::new(to_vec(&m.pp("embed_tokens").tensor("weight", &[cfg.vocab_size, d])?)?);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = m.pp("layers").pp(i);
            let a = l.pp("self_attn");
            let (h, kv, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
            let bias = cfg.qkv_bias();
            let attn = Attention {
                q: a.linear_rope("q_proj", d, h * dh, bias, h)?,
                k: a.linear_rope("k_proj", d, kv * dh, bias, kv)?,
                v: a.linear("v_proj", d, kv * dh, bias)?,
                o: a.linear("o_proj", h * dh, d, false)?,
                q_norm: cfg.qk_norm().then(|| RmsNorm::load(&a.pp("q_norm"), dh, eps, norm_offset)).transpose()?,
                k_norm: cfg.qk_norm().then(|| RmsNorm::load(&a.pp("k_norm"), dh, eps, norm_offset)).transpose()?,
            };
            let mp = l.pp("mlp");
            let mlp = Mlp {
                gate: mp.linear("gate_proj", d, cfg.intermediate_size, false)?,
                up: mp.linear("up_proj", d, cfg.intermediate_size, false)?,
                down: mp.linear("down_proj", cfg.intermediate_size, d, false)?,
                act: cfg.activation,
            };
            let sandwich = cfg.sandwich_norms();
            let norm = |name: &str| RmsNorm::load(&l.pp(name), d, eps, norm_offset);
            layers.push(Block {
                ln1: norm("input_layernorm")?,
                attn,
                ln1_post: sandwich.then(|| norm("post_attention_layernorm")).transpose()?,
                ln2: norm(if sandwich { "pre_feedforward_layernorm" } else { "post_attention_layernorm" })?,
                mlp,
                ln2_post: sandwich.then(|| norm("post_feedforward_layernorm")).transpose()?,
                sliding: cfg.sliding_layers[i],
            });
        }
        let norm = RmsNorm::load(&m.pp("norm"), d, eps, norm_offset)?;
        let has_head = vb.pp("lm_head").contains("weight");
        let lm_head = if has_head && !cfg.tie_word_embeddings {
            vb.linear("lm_head", d, cfg.vocab_size, false)?
        } else if is_gguf {
            // Tied: the quantized embedding table doubles as the output projection.
            m.linear("embed_tokens", d, cfg.vocab_size, false)?
        } else {
            Linear::dense(embed.clone())
        };
        let embed = match cfg.embed_scale() {
            Some(s) => Arc::new(embed.iter().map(|v| v * s).collect()),
            None => embed,
        };
        let rope_global = Rope::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling);
        let rope_local = match cfg.rope_local_theta {
            Some(theta) => Rope::new(cfg.head_dim, theta, &crate::config::RopeScaling::None),
            None => rope_global.clone(),
        };
        Ok(DecoderModel { cfg, embed, layers, norm, lm_head, rope_global, rope_local })
    }

    /// Every hook point this model has, in forward order.
    pub fn hook_names(&self) -> Vec<HookName> {
        let mut names = vec![HookName::global(Site::Embed)];
        for (i, b) in self.layers.iter().enumerate() {
            for site in Site::ALL.iter().copied().filter(|s| !s.is_global()) {
                let present = match site {
                    Site::QNormed | Site::KNormed => b.attn.q_norm.is_some(),
                    Site::Ln1Post => b.ln1_post.is_some(),
                    Site::Ln2Post => b.ln2_post.is_some(),
                    _ => true,
                };
                if present {
                    names.push(HookName::block(i, site));
                }
            }
        }
        names.push(HookName::global(Site::LnFinal));
        names.push(HookName::global(Site::Logits));
        names
    }

    /// The logit lens: the final norm and the unembedding applied to residual rows `[n, d]`.
    pub fn lens(&self, x: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(&self.norm.forward(x)?)
    }

    /// Elements one position of `site` holds (for attention patterns: per key position, so a
    /// row of `T_ctx` keys holds `T_ctx` times this).
    pub fn hook_width(&self, site: Site) -> usize {
        let c = &self.cfg;
        match site {
            Site::Q | Site::QNormed | Site::RotQ | Site::Z => c.num_heads * c.head_dim,
            Site::K | Site::V | Site::KNormed | Site::RotK => c.num_kv_heads * c.head_dim,
            Site::Pattern => c.num_heads,
            Site::MlpPre | Site::MlpPreLinear | Site::MlpPost => c.intermediate_size,
            Site::Logits => c.vocab_size,
            _ => c.hidden_size,
        }
    }

    /// One forward pass over a flat batch (`ctx.layout` says which rows belong to whom).
    /// Returns logits for `ctx.layout.logit_rows`, `[rows, vocab]`.
    pub fn forward(&self, tokens: &[u32], ctx: &mut ForwardCtx) -> Result<Tensor> {
        let d = self.cfg.hidden_size;
        let t = ctx.start();
        let mut rows = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            let t = t as usize;
            if t >= self.cfg.vocab_size {
                return Err(ModelError::BadConfig(format!("token id {t} is outside the vocabulary ({})", self.cfg.vocab_size)));
            }
            rows.extend_from_slice(&self.embed[t * d..(t + 1) * d]);
        }
        let x = Tensor::from_vec(rows, (tokens.len(), d), &Device::Cpu)?;
        ctx.done(t, None, "embed");
        let mut x = ctx.hook(HookName::global(Site::Embed), x)?;
        let positions = &ctx.layout.positions;
        let (cos_g, sin_g) = self.rope_global.cos_sin(positions)?;
        let (cos_l, sin_l) = self.rope_local.cos_sin(positions)?;
        for (i, block) in self.layers.iter().enumerate() {
            let rope = if block.sliding { (&cos_l, &sin_l) } else { (&cos_g, &sin_g) };
            let t = ctx.start();
            x = block.forward(x, i, &self.cfg, rope, ctx)?;
            ctx.done(t, Some(i), "layer");
        }
        let x = ctx.timed(None, "final_norm", || self.norm.forward(&x))?;
        let x = ctx.hook(HookName::global(Site::LnFinal), x)?;
        let layout = ctx.layout;
        if layout.logit_rows.is_empty() {
            // A step of prompt chunks only: nothing to project.
            return Ok(Tensor::zeros((0, self.cfg.vocab_size), candle_core::DType::F32, &Device::Cpu)?);
        }
        let x = if layout.logit_rows.len() == layout.n_tokens() {
            x
        } else {
            let rows = Tensor::new(layout.logit_rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &Device::Cpu)?;
            x.index_select(&rows, 0)?
        };
        let logits = ctx.timed(None, "lm_head", || self.lm_head.forward(&x))?;
        ctx.hook(HookName::global(Site::Logits), logits)
    }
}

impl Block {
    fn forward(&self, x: Tensor, layer: usize, cfg: &ModelConfig, rope: (&Tensor, &Tensor), ctx: &mut ForwardCtx) -> Result<Tensor> {
        let name = |site| HookName::block(layer, site);
        let l = Some(layer);
        let x = ctx.hook(name(Site::ResidPre), x)?;
        let h = ctx.timed(l, "attn_norm", || self.ln1.forward(&x))?;
        let h = ctx.hook(name(Site::Ln1), h)?;
        let mut a = self.attn.forward(&h, layer, cfg, self.sliding, rope, ctx)?;
        if let Some(n) = &self.ln1_post {
            let normed = ctx.timed(l, "post_attn_norm", || n.forward(&a))?;
            a = ctx.hook(name(Site::Ln1Post), normed)?;
        }
        let a = ctx.hook(name(Site::AttnOut), a)?;
        let x = ctx.hook(name(Site::ResidMid), (x + a)?)?;
        let h = ctx.timed(l, "mlp_norm", || self.ln2.forward(&x))?;
        let h = ctx.hook(name(Site::Ln2), h)?;
        let mut m = self.mlp.forward(&h, layer, ctx)?;
        if let Some(n) = &self.ln2_post {
            let normed = ctx.timed(l, "post_mlp_norm", || n.forward(&m))?;
            m = ctx.hook(name(Site::Ln2Post), normed)?;
        }
        let m = ctx.hook(name(Site::MlpOut), m)?;
        ctx.hook(name(Site::ResidPost), (x + m)?)
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, layer: usize, cfg: &ModelConfig, sliding: bool, (cos, sin): (&Tensor, &Tensor), ctx: &mut ForwardCtx) -> Result<Tensor> {
        let name = |site| HookName::block(layer, site);
        let l = Some(layer);
        let n = ctx.layout.n_tokens();
        let (h, kvh, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let q = ctx.timed(l, "q_proj", || Ok(self.q.forward(x)?.reshape((n, h, dh))?))?;
        let q = ctx.hook(name(Site::Q), q)?;
        let k = ctx.timed(l, "k_proj", || Ok(self.k.forward(x)?.reshape((n, kvh, dh))?))?;
        let k = ctx.hook(name(Site::K), k)?;
        let v = ctx.timed(l, "v_proj", || Ok(self.v.forward(x)?.reshape((n, kvh, dh))?))?;
        let v = ctx.hook(name(Site::V), v)?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => {
                let (q, k) = ctx.timed(l, "qk_norm", || Ok((qn.forward(&q)?, kn.forward(&k)?)))?;
                (ctx.hook(name(Site::QNormed), q)?, ctx.hook(name(Site::KNormed), k)?)
            }
            _ => (q, k),
        };
        let (q, k) = ctx.timed(l, "rope", || Ok((Rope::apply(&q, cos, sin)?, Rope::apply(&k, cos, sin)?)))?;
        let q = ctx.hook(name(Site::RotQ), q)?;
        let k = ctx.hook(name(Site::RotK), k)?;
        let window = if sliding { cfg.sliding_window } else { None };
        let shape = AttnShape { heads: h, kv_heads: kvh, head_dim: dh, scale: cfg.attn_scale, window };
        let want_pattern = ctx.wants(name(Site::Pattern));
        let t = ctx.start();
        let (qf, kf, vf) = (to_vec(&q)?, to_vec(&k)?, to_vec(&v)?);
        let (qrow, kvrow) = (h * dh, kvh * dh);
        let mut z = Vec::with_capacity(n * qrow);
        for (s, seq) in ctx.layout.seqs.iter().enumerate() {
            let rows = seq.start..seq.start + seq.len;
            ctx.cache.write(layer, seq, &kf[rows.start * kvrow..rows.end * kvrow], &vf[rows.start * kvrow..rows.end * kvrow])?;
            let view = ctx.cache.view(layer, seq)?;
            let (zs, probs) = attention(&qf[rows.start * qrow..rows.end * qrow], seq.pos, seq.len, &view, &shape, want_pattern);
            if let Some(p) = probs {
                let p = Tensor::from_vec(p, (h, seq.len, seq.ctx_len()), &Device::Cpu)?;
                // Attention patterns are observed, not replaced: the output is already computed.
                ctx.hook_seq(name(Site::Pattern), s, p)?;
            }
            z.extend(zs);
        }
        let z = Tensor::from_vec(z, (n, h, dh), &Device::Cpu)?;
        ctx.done(t, l, "attention");
        let z = ctx.hook(name(Site::Z), z)?;
        ctx.timed(l, "o_proj", || self.o.forward(&z.reshape((n, h * dh))?))
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, layer: usize, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let name = |site| HookName::block(layer, site);
        let l = Some(layer);
        let gate = ctx.timed(l, "gate_proj", || self.gate.forward(x))?;
        let gate = ctx.hook(name(Site::MlpPre), gate)?;
        let up = ctx.timed(l, "up_proj", || self.up.forward(x))?;
        let up = ctx.hook(name(Site::MlpPreLinear), up)?;
        let post = ctx.timed(l, "act", || Ok((activate(self.act, &gate)? * up)?))?;
        let post = ctx.hook(name(Site::MlpPost), post)?;
        ctx.timed(l, "down_proj", || self.down.forward(&post))
    }
}
