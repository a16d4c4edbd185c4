//! One generic decoder for every supported architecture; [`ModelConfig`] switches the parts.
//!
//! Architecture invariant: every activation named in HOOKS.md passes through exactly one
//! `hooks.hook(..)` call here, and a hook that nobody asked for returns its input untouched.

use crate::batch::{BatchLayout, KvCache};
use crate::config::{Activation, Arch, ModelConfig};
use crate::error::{ModelError, Result};
use crate::hooks::Hooks;
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

    /// One forward pass over a flat batch. Returns logits for `layout.logit_rows`, `[rows, vocab]`.
    pub fn forward(&self, tokens: &[u32], layout: &BatchLayout, cache: &mut dyn KvCache, hooks: &mut Hooks) -> Result<Tensor> {
        let d = self.cfg.hidden_size;
        let mut rows = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            let t = t as usize;
            if t >= self.cfg.vocab_size {
                return Err(ModelError::BadConfig(format!("token id {t} is outside the vocabulary ({})", self.cfg.vocab_size)));
            }
            rows.extend_from_slice(&self.embed[t * d..(t + 1) * d]);
        }
        let x = Tensor::from_vec(rows, (tokens.len(), d), &Device::Cpu)?;
        let mut x = hooks.hook(HookName::global(Site::Embed), x, layout)?;
        let (cos_g, sin_g) = self.rope_global.cos_sin(&layout.positions)?;
        let (cos_l, sin_l) = self.rope_local.cos_sin(&layout.positions)?;
        for (i, block) in self.layers.iter().enumerate() {
            let rope = if block.sliding { (&cos_l, &sin_l) } else { (&cos_g, &sin_g) };
            x = block.forward(x, i, &self.cfg, rope, layout, cache, hooks)?;
        }
        let x = self.norm.forward(&x)?;
        let x = hooks.hook(HookName::global(Site::LnFinal), x, layout)?;
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
        let logits = self.lm_head.forward(&x)?;
        hooks.hook(HookName::global(Site::Logits), logits, layout)
    }
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: Tensor,
        layer: usize,
        cfg: &ModelConfig,
        rope: (&Tensor, &Tensor),
        layout: &BatchLayout,
        cache: &mut dyn KvCache,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let name = |site| HookName::block(layer, site);
        let x = hooks.hook(name(Site::ResidPre), x, layout)?;
        let h = hooks.hook(name(Site::Ln1), self.ln1.forward(&x)?, layout)?;
        let mut a = self.attn.forward(&h, layer, cfg, self.sliding, rope, layout, cache, hooks)?;
        if let Some(n) = &self.ln1_post {
            a = hooks.hook(name(Site::Ln1Post), n.forward(&a)?, layout)?;
        }
        let a = hooks.hook(name(Site::AttnOut), a, layout)?;
        let x = hooks.hook(name(Site::ResidMid), (x + a)?, layout)?;
        let h = hooks.hook(name(Site::Ln2), self.ln2.forward(&x)?, layout)?;
        let mut m = self.mlp.forward(&h, layer, layout, hooks)?;
        if let Some(n) = &self.ln2_post {
            m = hooks.hook(name(Site::Ln2Post), n.forward(&m)?, layout)?;
        }
        let m = hooks.hook(name(Site::MlpOut), m, layout)?;
        hooks.hook(name(Site::ResidPost), (x + m)?, layout)
    }
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cfg: &ModelConfig,
        sliding: bool,
        (cos, sin): (&Tensor, &Tensor),
        layout: &BatchLayout,
        cache: &mut dyn KvCache,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let name = |site| HookName::block(layer, site);
        let n = layout.n_tokens();
        let (h, kvh, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let q = hooks.hook(name(Site::Q), self.q.forward(x)?.reshape((n, h, dh))?, layout)?;
        let k = hooks.hook(name(Site::K), self.k.forward(x)?.reshape((n, kvh, dh))?, layout)?;
        let v = hooks.hook(name(Site::V), self.v.forward(x)?.reshape((n, kvh, dh))?, layout)?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (
                hooks.hook(name(Site::QNormed), qn.forward(&q)?, layout)?,
                hooks.hook(name(Site::KNormed), kn.forward(&k)?, layout)?,
            ),
            _ => (q, k),
        };
        let q = hooks.hook(name(Site::RotQ), Rope::apply(&q, cos, sin)?, layout)?;
        let k = hooks.hook(name(Site::RotK), Rope::apply(&k, cos, sin)?, layout)?;
        let window = if sliding { cfg.sliding_window } else { None };
        let shape = AttnShape { heads: h, kv_heads: kvh, head_dim: dh, scale: cfg.attn_scale, window };
        let want_pattern = hooks.wants(name(Site::Pattern));
        let (qf, kf, vf) = (to_vec(&q)?, to_vec(&k)?, to_vec(&v)?);
        let (qrow, kvrow) = (h * dh, kvh * dh);
        let mut z = Vec::with_capacity(n * qrow);
        for (s, seq) in layout.seqs.iter().enumerate() {
            let rows = seq.start..seq.start + seq.len;
            cache.write(layer, seq, &kf[rows.start * kvrow..rows.end * kvrow], &vf[rows.start * kvrow..rows.end * kvrow])?;
            let view = cache.view(layer, seq)?;
            let (zs, probs) = attention(&qf[rows.start * qrow..rows.end * qrow], seq.pos, seq.len, &view, &shape, want_pattern);
            if let Some(p) = probs {
                let p = Tensor::from_vec(p, (h, seq.len, seq.ctx_len()), &Device::Cpu)?;
                // Attention patterns are observed, not replaced: the output is already computed.
                hooks.hook_seq(name(Site::Pattern), s, p, layout)?;
            }
            z.extend(zs);
        }
        let z = hooks.hook(name(Site::Z), Tensor::from_vec(z, (n, h, dh), &Device::Cpu)?, layout)?;
        self.o.forward(&z.reshape((n, h * dh))?)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, layer: usize, layout: &BatchLayout, hooks: &mut Hooks) -> Result<Tensor> {
        let name = |site| HookName::block(layer, site);
        let gate = hooks.hook(name(Site::MlpPre), self.gate.forward(x)?, layout)?;
        let up = hooks.hook(name(Site::MlpPreLinear), self.up.forward(x)?, layout)?;
        let post = hooks.hook(name(Site::MlpPost), (activate(self.act, &gate)? * up)?, layout)?;
        self.down.forward(&post)
    }
}
