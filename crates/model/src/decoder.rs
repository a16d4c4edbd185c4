//! One generic decoder for every supported architecture; [`ModelConfig`] switches the parts.
//!
//! Architecture invariant: every activation named in HOOKS.md passes through exactly one
//! hook call here (`ctx.hook`, `ctx.hook_input` for a norm's pre-quantized output,
//! `QkvRows::hook` for q, k and v kept in place), and a hook that nobody asked for leaves
//! its activation untouched.

use crate::config::{Activation, Arch, ModelConfig};
use crate::error::{ModelError, Result};
use crate::forward::ForwardCtx;
use crate::attention::{attention, AttnOut, AttnShape, SeqQueries};
use crate::heads::{Part, QkvRows};
use crate::qkernels::{Needs, QInput};
use crate::layers::{activate, add, Norm, Rope};
use crate::moe::Moe;
use crate::weights::{to_vec, Linear, LinearWeight, Table, Vb};
use candle_core::{Device, Tensor};
use glassbox_protocol::{HookName, Site};

pub struct DecoderModel {
    pub cfg: ModelConfig,
    /// `[vocab, d]`: f32, or the GGUF blocks (rows dequantized on lookup); one table shared
    /// with the output projection when they are tied.
    embed: Table,
    /// `[max_positions, d]`: learned absolute positions (GPT-2).
    pos_embed: Option<Vec<f32>>,
    layers: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    /// None when the architecture has no rotary embedding (GPT-2).
    rope_global: Option<Rope>,
    rope_local: Option<Rope>,
}

struct Block {
    ln1: Norm,
    attn: Attention,
    ln1_post: Option<Norm>,
    ln2: Norm,
    mlp: Ffn,
    ln2_post: Option<Norm>,
    sliding: bool,
}

/// A block's feed-forward part.
enum Ffn {
    Dense(Mlp),
    Experts(Moe),
}

/// The q/k/v projections: three matrices, or one whose rows are q, k then v.
enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

struct Attention {
    qkv: Qkv,
    o: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
}

/// The MLP's input projections.
enum MlpIn {
    /// act(gate) * up (Llama family).
    Gated { gate: Linear, up: Linear },
    /// The same with gate and up rows in one matrix (Phi-3).
    GatedFused(Linear),
    /// act(up) (GPT-2, GPT-NeoX).
    Plain(Linear),
}

struct Mlp {
    input: MlpIn,
    down: Linear,
    act: Activation,
}

impl DecoderModel {
    /// `vb` is the root of the weight names (`model.layers.0...`, `lm_head`): Llama's names,
    /// whatever the family (`weights.rs` maps them to each file's own).
    pub fn load(vb: &Vb, cfg: ModelConfig, is_gguf: bool) -> Result<Self> {
        let (d, eps, kind) = (cfg.hidden_size, cfg.norm_eps, cfg.norm_kind());
        // Gemma stores norms as `w` for `(1 + w)`; llama.cpp's converter already added the 1.
        let norm_offset = if matches!(cfg.arch, Arch::Gemma2 | Arch::Gemma3) && !is_gguf { 1.0 } else { 0.0 };
        let m = vb.pp("model");
        let pos_embed = cfg
            .learned_positions()
            .then(|| to_vec(&m.pp("embed_positions").tensor("weight", &[cfg.max_position_embeddings, d])?))
            .transpose()?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        let (h, kv, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (bias, out_bias) = (cfg.qkv_bias(), cfg.out_bias());
        for i in 0..cfg.num_layers {
            let l = m.pp("layers").pp(i);
            let a = l.pp("self_attn");
            let qkv = if a.pp("qkv_proj").contains("weight") {
                Qkv::Fused(a.linear_qkv("qkv_proj", d, (h, kv, dh), bias)?)
            } else {
                let q = a.linear_rope("q_proj", d, h * dh, bias, h)?;
                let k = a.linear_rope("k_proj", d, kv * dh, bias, kv)?;
                let v = a.linear("v_proj", d, kv * dh, bias)?;
                // One pass for the three where their weights share a kernel (same numbers).
                match Linear::concat(&[&q, &k, &v]) {
                    Some(qkv) => Qkv::Fused(qkv),
                    None => Qkv::Split { q, k, v },
                }
            };
            // Per head, or (OLMoE) over the whole projection.
            let (qn, kn) = if cfg.qk_norm_whole() { (h * dh, kv * dh) } else { (dh, dh) };
            let attn = Attention {
                qkv,
                o: a.linear("o_proj", h * dh, d, out_bias)?,
                q_norm: cfg.qk_norm().then(|| Norm::load(&a.pp("q_norm"), kind, qn, eps, norm_offset)).transpose()?,
                k_norm: cfg.qk_norm().then(|| Norm::load(&a.pp("k_norm"), kind, kn, eps, norm_offset)).transpose()?,
            };
            let mp = l.pp("mlp");
            let experts = cfg.moe.filter(|_| cfg.moe_layers[i] && mp.pp("gate").contains("weight"));
            let mlp = match experts {
                Some(moe) => Ffn::Experts(Moe::load(&mp, d, moe, cfg.activation)?),
                None => Ffn::Dense(Mlp::load(&mp, &cfg)?),
            };
            let sandwich = cfg.sandwich_norms();
            let norm = |name: &str| Norm::load(&l.pp(name), kind, d, eps, norm_offset);
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
        let norm = Norm::load(&m.pp("norm"), kind, d, eps, norm_offset)?;
        let has_head = vb.pp("lm_head").contains("weight");
        let tied = !has_head || cfg.tie_word_embeddings;
        let (embed, lm_head) = if !tied {
            (m.table("embed_tokens", cfg.vocab_size, d)?, vb.linear("lm_head", d, cfg.vocab_size, false)?)
        } else if is_gguf {
            // Tied: the quantized table doubles as the output projection, held once when the
            // projection's kernel reads the same blocks.
            let head = m.linear("embed_tokens", d, cfg.vocab_size, false)?;
            let embed = match &head.weight {
                LinearWeight::Blocks(q) => Table::Blocks(q.clone()),
                LinearWeight::Dense(w) => Table::Dense(w.clone()),
                LinearWeight::Quant { .. } => m.table("embed_tokens", cfg.vocab_size, d)?,
            };
            (embed, head)
        } else {
            let embed = m.table("embed_tokens", cfg.vocab_size, d)?;
            let head = match &embed {
                Table::Dense(w) => Linear::dense(w.clone()),
                Table::Blocks(q) => Linear { weight: LinearWeight::Blocks(q.clone()), bias: None },
            };
            (embed, head)
        };
        let (rope_global, rope_local) = if cfg.learned_positions() {
            (None, None)
        } else {
            let global = Rope::new(cfg.rotary_dim, cfg.rope_theta, &cfg.rope_scaling);
            let local = match cfg.rope_local_theta {
                Some(theta) => Rope::new(cfg.rotary_dim, theta, &crate::config::RopeScaling::None),
                None => global.clone(),
            };
            (Some(global), Some(local))
        };
        Ok(DecoderModel { cfg, embed, pos_embed, layers, norm, lm_head, rope_global, rope_local })
    }

    /// Every hook point this model has, in forward order.
    pub fn hook_names(&self) -> Vec<HookName> {
        let mut names = vec![HookName::global(Site::Embed)];
        if self.pos_embed.is_some() {
            names.push(HookName::global(Site::PosEmbed));
        }
        let rotary = self.rope_global.is_some();
        for (i, b) in self.layers.iter().enumerate() {
            for site in Site::ALL.iter().copied().filter(|s| !s.is_global()) {
                let present = match site {
                    Site::QNormed | Site::KNormed => b.attn.q_norm.is_some(),
                    Site::RotQ | Site::RotK => rotary,
                    Site::Ln1Post => b.ln1_post.is_some(),
                    Site::Ln2Post => b.ln2_post.is_some(),
                    Site::ResidMid => !self.cfg.parallel_residual,
                    Site::RouterLogits | Site::ExpertIds | Site::ExpertWeights => matches!(b.mlp, Ffn::Experts(_)),
                    Site::MlpPre | Site::MlpPost => matches!(b.mlp, Ffn::Dense(_)),
                    Site::MlpPreLinear => matches!(&b.mlp, Ffn::Dense(m) if !matches!(m.input, MlpIn::Plain(_))),
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
        self.unembed(&self.norm.forward(x)?)
    }

    /// The output projection, soft-capped where the architecture caps logits (Gemma 2).
    fn unembed(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(x)?;
        Ok(match self.cfg.final_softcap {
            Some(cap) => ((logits / cap as f64)?.tanh()? * cap as f64)?,
            None => logits,
        })
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
            Site::RouterLogits => c.moe.map_or(0, |m| m.num_experts),
            Site::ExpertIds | Site::ExpertWeights => c.moe.map_or(0, |m| m.top_k),
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
            self.embed.push_row(t, d, &mut rows);
        }
        // Gemma scales embeddings by sqrt(d) (rounded to the weights' dtype, as transformers does).
        if let Some(s) = self.cfg.embed_scale() {
            rows.iter_mut().for_each(|v| *v *= s);
        }
        let x = Tensor::from_vec(rows, (tokens.len(), d), &Device::Cpu)?;
        ctx.done(t, None, "embed");
        let mut x = ctx.hook(HookName::global(Site::Embed), x)?;
        let positions = &ctx.layout.positions;
        if let Some(table) = &self.pos_embed {
            let mut rows = Vec::with_capacity(positions.len() * d);
            for &p in positions {
                let p = p as usize;
                let row = table.get(p * d..(p + 1) * d).ok_or_else(|| {
                    ModelError::BadConfig(format!("position {p} is past the model's {} learned positions", self.cfg.max_position_embeddings))
                })?;
                rows.extend_from_slice(row);
            }
            let p = ctx.hook(HookName::global(Site::PosEmbed), Tensor::from_vec(rows, (positions.len(), d), &Device::Cpu)?)?;
            x = (x + p)?;
        }
        let rope_of = |r: &Option<Rope>| r.as_ref().map(|r| r.cos_sin(positions));
        let (global, local) = (rope_of(&self.rope_global), rope_of(&self.rope_local));
        for (i, block) in self.layers.iter().enumerate() {
            let rope = if block.sliding { local.as_ref() } else { global.as_ref() };
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
        let logits = ctx.timed(None, "lm_head", || self.unembed(&x))?;
        ctx.hook(HookName::global(Site::Logits), logits)
    }
}

/// cos and sin for each row of the step (None without rotary embeddings).
type CosSin<'a> = Option<&'a (Vec<f32>, Vec<f32>)>;

impl Block {
    fn forward(&self, x: Tensor, layer: usize, cfg: &ModelConfig, rope: CosSin, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let name = |site| HookName::block(layer, site);
        let l = Some(layer);
        let x = ctx.hook(name(Site::ResidPre), x)?;
        // The norms quantize their output for the projections that read it, in their pass.
        let h = ctx.timed(l, "attn_norm", || self.ln1.forward_input(&x, self.attn.needs()))?;
        let h = ctx.hook_input(name(Site::Ln1), h)?;
        let mut a = self.attn.forward(&h, layer, cfg, self.sliding, rope, ctx)?;
        if let Some(n) = &self.ln1_post {
            let normed = ctx.timed(l, "post_attn_norm", || n.forward(&a))?;
            a = ctx.hook(name(Site::Ln1Post), normed)?;
        }
        let a = ctx.hook(name(Site::AttnOut), a)?;
        // Parallel blocks (GPT-NeoX) feed the MLP from the block's input, and add both at once.
        let mid = if cfg.parallel_residual { None } else { Some(ctx.hook(name(Site::ResidMid), add(&x, &a)?)?) };
        let h = ctx.timed(l, "mlp_norm", || self.ln2.forward_input(mid.as_ref().unwrap_or(&x), self.mlp.needs()))?;
        let h = ctx.hook_input(name(Site::Ln2), h)?;
        let mut m = self.mlp.forward(&h, layer, ctx)?;
        if let Some(n) = &self.ln2_post {
            let normed = ctx.timed(l, "post_mlp_norm", || n.forward(&m))?;
            m = ctx.hook(name(Site::Ln2Post), normed)?;
        }
        let m = ctx.hook(name(Site::MlpOut), m)?;
        let out = match mid {
            Some(mid) => add(&mid, &m)?,
            // transformers' order: mlp + attn, then the residual.
            None => add(&add(&m, &a)?, &x)?,
        };
        ctx.hook(name(Site::ResidPost), out)
    }
}

impl Attention {
    /// The 8-bit forms of the input the q/k/v projections read.
    fn needs(&self) -> Needs {
        match &self.qkv {
            Qkv::Split { q, k, v } => q.needs().and(k.needs()).and(v.needs()),
            Qkv::Fused(w) => w.needs(),
        }
    }

    fn project(&self, x: &QInput, n: usize, cfg: &ModelConfig, layer: usize, ctx: &mut ForwardCtx) -> Result<QkvRows> {
        let l = Some(layer);
        let heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        match &self.qkv {
            Qkv::Split { q, k, v } => {
                let q = ctx.timed(l, "q_proj", || q.forward_rows(x))?;
                let k = ctx.timed(l, "k_proj", || k.forward_rows(x))?;
                let v = ctx.timed(l, "v_proj", || v.forward_rows(x))?;
                QkvRows::split(q, k, v, n, heads)
            }
            Qkv::Fused(w) => QkvRows::fused(ctx.timed(l, "qkv_proj", || w.forward_rows(x))?, n, heads),
        }
    }

    /// q, k and v stay in the projections' rows from here to the cache (`heads.rs`): the
    /// norms, clamps and rotations rewrite them in place, the cache and attention read them
    /// with a stride; the hooks asked for see tensors made from them.
    fn forward(&self, x: &QInput, layer: usize, cfg: &ModelConfig, sliding: bool, rope: CosSin, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let name = |site| HookName::block(layer, site);
        let l = Some(layer);
        let n = ctx.layout.n_tokens();
        let (h, kvh, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let mut qkv = self.project(x, n, cfg, layer, ctx)?;
        for (part, site) in [(Part::Q, Site::Q), (Part::K, Site::K), (Part::V, Site::V)] {
            qkv.hook(ctx, name(site), part)?;
        }
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            // Per head, or over the whole projection (OLMoE).
            let (qw, kw) = if cfg.qk_norm_whole() { (h * dh, kvh * dh) } else { (dh, dh) };
            ctx.timed(l, "qk_norm", || {
                qkv.norm(Part::Q, qn, qw)?;
                qkv.norm(Part::K, kn, kw)
            })?;
            qkv.hook(ctx, name(Site::QNormed), Part::Q)?;
            qkv.hook(ctx, name(Site::KNormed), Part::K)?;
        }
        // OLMoE clamps after its norms (transformers' order): candle's `clamp`, max then min.
        if let Some(c) = cfg.qkv_clip {
            for part in [Part::Q, Part::K, Part::V] {
                qkv.for_each_row(part, |_, row| row.iter_mut().for_each(|v| *v = v.max(-c).min(c)));
            }
        }
        if let Some((cos, sin)) = rope {
            let half = cos.len() / n.max(1);
            ctx.timed(l, "rope", || {
                for part in [Part::Q, Part::K] {
                    qkv.for_each_row(part, |i, row| Rope::rotate(row, dh, &cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]));
                }
                Ok(())
            })?;
            qkv.hook(ctx, name(Site::RotQ), Part::Q)?;
            qkv.hook(ctx, name(Site::RotK), Part::K)?;
        }
        let window = if sliding { cfg.sliding_window } else { None };
        let shape = AttnShape { heads: h, kv_heads: kvh, head_dim: dh, scale: cfg.attn_scale, window, softcap: cfg.attn_softcap };
        let want_pattern = ctx.wants(name(Site::Pattern));
        let t = ctx.start();
        let (q, k, v) = (qkv.rows(Part::Q), qkv.rows(Part::K), qkv.rows(Part::V));
        // The step's keys and values go into the cache first; then every sequence's queries
        // in one attention loop.
        for seq in &ctx.layout.seqs {
            ctx.cache.write(layer, seq, k.slice(seq.start, seq.len), v.slice(seq.start, seq.len))?;
        }
        let seqs = ctx
            .layout
            .seqs
            .iter()
            .map(|seq| Ok(SeqQueries { q: q.slice(seq.start, seq.len), pos: seq.pos, t: seq.len, kv: ctx.cache.view(layer, seq)? }))
            .collect::<Result<Vec<_>>>()?;
        let AttnOut { z, probs } = attention(&seqs, &shape, want_pattern);
        drop(seqs);
        for (s, (seq, p)) in ctx.layout.seqs.iter().zip(probs).enumerate() {
            if let Some(p) = p {
                let p = Tensor::from_vec(p, (h, seq.len, seq.ctx_len()), &Device::Cpu)?;
                // Attention patterns are observed, not replaced: the output is already computed.
                ctx.hook_seq(name(Site::Pattern), s, p)?;
            }
        }
        let z = Tensor::from_vec(z, (n, h, dh), &Device::Cpu)?;
        ctx.done(t, l, "attention");
        let z = ctx.hook(name(Site::Z), z)?;
        ctx.timed(l, "o_proj", || self.o.forward(&z.reshape((n, h * dh))?))
    }
}

impl Ffn {
    fn forward(&self, x: &QInput, layer: usize, ctx: &mut ForwardCtx) -> Result<Tensor> {
        match self {
            Ffn::Dense(m) => m.forward(x, layer, ctx),
            Ffn::Experts(m) => m.forward(x.tensor(), layer, ctx),
        }
    }

    /// The 8-bit forms of the input the projections read (the experts take f32 rows: each
    /// expert's rows are picked per step).
    fn needs(&self) -> Needs {
        match self {
            Ffn::Dense(m) => m.needs(),
            Ffn::Experts(_) => Needs::default(),
        }
    }
}

impl Mlp {
    fn load(mp: &Vb, cfg: &ModelConfig) -> Result<Self> {
        let (d, ff, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.out_bias());
        let input = if !cfg.gated_mlp() {
            MlpIn::Plain(mp.linear("up_proj", d, ff, bias)?)
        } else if mp.pp("gate_up_proj").contains("weight") {
            MlpIn::GatedFused(mp.linear("gate_up_proj", d, 2 * ff, false)?)
        } else {
            let (gate, up) = (mp.linear("gate_proj", d, ff, false)?, mp.linear("up_proj", d, ff, false)?);
            match Linear::concat(&[&gate, &up]) {
                Some(both) => MlpIn::GatedFused(both),
                None => MlpIn::Gated { gate, up },
            }
        };
        Ok(Mlp { input, down: mp.linear("down_proj", ff, d, bias)?, act: cfg.activation })
    }

    fn forward(&self, x: &QInput, layer: usize, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let name = |site| HookName::block(layer, site);
        let l = Some(layer);
        let (gate, up) = match &self.input {
            // No hook on gate or up: SiLU and the product straight from the fused output.
            MlpIn::GatedFused(w) if self.act == Activation::Silu && !ctx.wants(name(Site::MlpPre)) && !ctx.wants(name(Site::MlpPreLinear)) => {
                let y = ctx.timed(l, "gate_up_proj", || w.forward_input(x))?;
                let post = ctx.timed(l, "act", || crate::layers::silu_mul_halves(&y))?;
                return self.finish(post, layer, ctx);
            }
            MlpIn::Plain(up) => {
                let pre = ctx.timed(l, "up_proj", || up.forward_input(x))?;
                let pre = ctx.hook(name(Site::MlpPre), pre)?;
                let post = ctx.timed(l, "act", || activate(self.act, &pre))?;
                return self.finish(post, layer, ctx);
            }
            MlpIn::Gated { gate, up } => (ctx.timed(l, "gate_proj", || gate.forward_input(x))?, ctx.timed(l, "up_proj", || up.forward_input(x))?),
            MlpIn::GatedFused(w) => ctx.timed(l, "gate_up_proj", || {
                let y = w.forward_input(x)?;
                let half = y.dim(1)? / 2;
                Ok((y.narrow(1, 0, half)?.contiguous()?, y.narrow(1, half, half)?.contiguous()?))
            })?,
        };
        let gate = ctx.hook(name(Site::MlpPre), gate)?;
        let up = ctx.hook(name(Site::MlpPreLinear), up)?;
        let post = ctx.timed(l, "act", || Ok((activate(self.act, &gate)? * up)?))?;
        self.finish(post, layer, ctx)
    }

    /// The 8-bit forms of the input the input projections read.
    fn needs(&self) -> Needs {
        match &self.input {
            MlpIn::Gated { gate, up } => gate.needs().and(up.needs()),
            MlpIn::GatedFused(w) | MlpIn::Plain(w) => w.needs(),
        }
    }

    /// `hook_post`, then the down projection.
    fn finish(&self, post: Tensor, layer: usize, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let name = |site| HookName::block(layer, site);
        let l = Some(layer);
        let post = ctx.hook(name(Site::MlpPost), post)?;
        ctx.timed(l, "down_proj", || self.down.forward(&post))
    }
}
