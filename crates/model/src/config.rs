//! One small config drives the generic decoder: each architecture is a set of switches.

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file;
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, Mistral, TinyLlama, SmolLM.
    Llama,
    /// Llama plus q/k/v bias.
    Qwen2,
    /// Llama plus per-head q/k RMS norms.
    Qwen3,
    /// Llama with fused q/k/v and gate/up projections in the files.
    Phi3,
    /// Sandwich norms, sqrt(d) embedding scale, alternating sliding-window layers, GeGLU,
    /// attention and final logit soft-capping.
    Gemma2,
    /// Gemma 2's block without soft-capping, plus q/k norms and a second RoPE base.
    Gemma3,
    /// LayerNorm with bias, learned absolute positions, fused q/k/v, biases everywhere, a
    /// plain (ungated) GELU MLP.
    Gpt2,
    /// GPT-NeoX / Pythia: GPT-2's norms and biases with partial rotary embeddings and (usually)
    /// attention and MLP in parallel off the same residual.
    GptNeox,
    /// Llama with a mixture-of-experts MLP (its GGUF files say `llama`).
    Mixtral,
    /// Qwen3 with a mixture-of-experts MLP.
    Qwen3Moe,
    /// OLMoE: mixture of experts, q/k norms over the whole projection (not per head), optional
    /// q/k/v clipping.
    Olmoe,
}

/// A mixture-of-experts MLP: each token's `top_k` experts by router softmax, their outputs
/// summed with the softmax weights (renormalized over the chosen experts when `norm_top_k`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Width of each expert's MLP.
    pub expert_size: usize,
    pub norm_top_k: bool,
}

/// The names `Arch::parse` accepts, for error messages.
pub const ARCH_NAMES: &str = "llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, olmoe, phi3, gemma2, gemma3, gpt2, gpt_neox (gptneox)";

impl Arch {
    pub fn parse(name: &str) -> Result<Arch> {
        Ok(match name {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "phi3" => Arch::Phi3,
            "gemma2" => Arch::Gemma2,
            "gemma3" | "gemma3_text" => Arch::Gemma3,
            "gpt2" => Arch::Gpt2,
            "gpt_neox" | "gptneox" => Arch::GptNeox,
            "mixtral" => Arch::Mixtral,
            "qwen3_moe" | "qwen3moe" => Arch::Qwen3Moe,
            "olmoe" => Arch::Olmoe,
            other => return Err(ModelError::UnknownArchitecture(other.to_string())),
        })
    }

    fn gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// RMS norm, weight only.
    Rms,
    /// LayerNorm: mean removed, weight and bias.
    Layer,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (Gemma's `gelu_pytorch_tanh`, GPT-2's `gelu_new`).
    GeluTanh,
    /// GELU with the exact erf (transformers' `gelu`: GPT-NeoX / Pythia).
    GeluErf,
}

/// How rotary frequencies are adjusted for long context.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1's smooth frequency-dependent scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position: f32 },
    /// YaRN: blend of interpolation and extrapolation, with an attention factor on cos/sin.
    Yarn { factor: f32, original_max_position: f32, beta_fast: f32, beta_slow: f32, attention_factor: Option<f32> },
    /// Per-dimension divisors of the inverse frequencies (GGUF's `rope_freqs.weight`).
    FreqFactors(Vec<f32>),
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub norm_eps: f64,
    pub rope_theta: f32,
    /// Leading dimensions of each head that are rotated (head_dim unless rotary is partial).
    pub rotary_dim: usize,
    pub rope_scaling: RopeScaling,
    /// Gemma 3: RoPE base of the sliding-window layers.
    pub rope_local_theta: Option<f32>,
    pub sliding_window: Option<usize>,
    /// Per layer: true where attention is limited to `sliding_window`.
    pub sliding_layers: Vec<bool>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub activation: Activation,
    /// Attention scores are multiplied by this (1/sqrt(head_dim) unless the model says otherwise).
    pub attn_scale: f32,
    /// GPT-NeoX: attention and MLP both read the block's input and add to it together.
    pub parallel_residual: bool,
    /// Gemma 2: attention scores become `cap * tanh(score / cap)` before the softmax.
    pub attn_softcap: Option<f32>,
    /// Gemma 2: the same on the final logits.
    pub final_softcap: Option<f32>,
    /// OLMoE: q, k and v are clamped to `[-c, c]` after projection.
    pub qkv_clip: Option<f32>,
    /// Mixture of experts, and per layer whether that layer's MLP is one (Qwen3-MoE can keep
    /// some layers dense).
    pub moe: Option<MoeConfig>,
    pub moe_layers: Vec<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    pub fn norm_kind(&self) -> NormKind {
        match self.arch {
            Arch::Gpt2 | Arch::GptNeox => NormKind::Layer,
            _ => NormKind::Rms,
        }
    }
    pub fn qkv_bias(&self) -> bool {
        matches!(self.arch, Arch::Qwen2 | Arch::Gpt2 | Arch::GptNeox)
    }
    /// Bias on the attention output and both MLP projections.
    pub fn out_bias(&self) -> bool {
        matches!(self.arch, Arch::Gpt2 | Arch::GptNeox)
    }
    /// act(gate) * up (Llama family) rather than act(up) (GPT-2, NeoX).
    pub fn gated_mlp(&self) -> bool {
        !matches!(self.arch, Arch::Gpt2 | Arch::GptNeox)
    }
    /// GPT-2 adds a learned position embedding; everything else rotates q and k.
    pub fn learned_positions(&self) -> bool {
        self.arch == Arch::Gpt2
    }
    pub fn qk_norm(&self) -> bool {
        matches!(self.arch, Arch::Qwen3 | Arch::Gemma3 | Arch::Qwen3Moe | Arch::Olmoe)
    }
    /// OLMoE normalizes q and k over the whole projection; the others per head.
    pub fn qk_norm_whole(&self) -> bool {
        self.arch == Arch::Olmoe
    }
    pub fn sandwich_norms(&self) -> bool {
        self.arch.gemma()
    }
    /// Gemma scales embeddings by sqrt(d) (rounded to the weights' dtype, as transformers does).
    pub fn embed_scale(&self) -> Option<f32> {
        self.arch.gemma().then(|| (self.hidden_size as f32).sqrt())
    }

    /// Parse a Hugging Face `config.json`.
    pub fn from_hf_json(json: &Value) -> Result<ModelConfig> {
        // Multimodal Gemma 3 nests the language model's config.
        let text = json.get("text_config").filter(|v| v.is_object());
        let c = Cfg { root: json, text };
        let model_type = c.str("model_type")?;
        let arch = Arch::parse(&model_type)?;
        // GPT-2 spells the sizes its own way; everything else uses Llama's names.
        let hidden_size = c.usize_any(&["hidden_size", "n_embd"])?;
        let num_heads = c.usize_any(&["num_attention_heads", "n_head"])?;
        let num_layers = bounded("num_hidden_layers", c.usize_any(&["num_hidden_layers", "n_layer"])?)?;
        let intermediate_size = match arch {
            Arch::Gpt2 => c.opt_usize("n_inner").unwrap_or(4 * hidden_size),
            _ => c.usize("intermediate_size")?,
        };
        let head_dim = c.opt_usize("head_dim").unwrap_or(hidden_size / num_heads.max(1));
        let sliding_window = c.opt_usize("sliding_window").filter(|_| c.get("use_sliding_window").and_then(Value::as_bool) != Some(false));
        let sliding_layers = match (arch, c.get("layer_types")) {
            (_, Some(Value::Array(types))) => {
                types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect()
            }
            (Arch::Gemma3, _) => {
                let pattern = c.opt_usize("sliding_window_pattern").unwrap_or(6);
                gemma_sliding_layers(num_layers, pattern)
            }
            (Arch::Gemma2, _) => gemma_sliding_layers(num_layers, 2),
            // Mistral-style: every layer uses the window when one is set.
            _ => vec![sliding_window.is_some(); num_layers],
        };
        let act = c.opt_str("hidden_activation").or_else(|| c.opt_str("hidden_act")).or_else(|| c.opt_str("activation_function"));
        let activation = match act.as_deref() {
            None | Some("silu") | Some("swish") => Activation::Silu,
            Some("gelu_pytorch_tanh") | Some("gelu_new") => Activation::GeluTanh,
            Some("gelu") => Activation::GeluErf,
            Some(other) => return Err(ModelError::BadConfig(format!("unsupported activation `{other}`"))),
        };
        let attn_scale = match c.opt_f64("query_pre_attn_scalar") {
            Some(s) => (1.0 / s.sqrt()) as f32,
            None => 1.0 / (head_dim as f32).sqrt(),
        };
        let eos_token_ids = match c.get("eos_token_id") {
            Some(Value::Array(ids)) => ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => vec![],
        };
        // transformers 5 gathers RoPE settings in `rope_parameters`; released checkpoints keep
        // them at the top level (`rope_theta`, NeoX's `rotary_pct` / `rotary_emb_base`).
        // Gemma 3 there has one entry per attention type.
        let params = c.get("rope_parameters").or_else(|| c.get("rope_scaling")).filter(|v| v.is_object());
        let local_params = params.and_then(|p| p.get("sliding_attention"));
        let rope = params.map(|p| p.get("full_attention").unwrap_or(p));
        let rope_f = |k: &str| rope.and_then(|r| r.get(k)).and_then(Value::as_f64);
        let rope_theta = c.opt_f64("rope_theta").or_else(|| c.opt_f64("rotary_emb_base")).or_else(|| rope_f("rope_theta")).unwrap_or(10_000.0);
        let rotary_fraction = c.opt_f64("partial_rotary_factor").or_else(|| c.opt_f64("rotary_pct")).or_else(|| rope_f("partial_rotary_factor")).unwrap_or(1.0);
        let moe = match c.opt_usize("num_local_experts").or_else(|| c.opt_usize("num_experts")).filter(|&e| e > 0) {
            Some(num_experts) => Some(MoeConfig {
                num_experts,
                top_k: c.usize("num_experts_per_tok")?,
                expert_size: c.opt_usize("moe_intermediate_size").unwrap_or(intermediate_size),
                // Mixtral always renormalizes; Qwen3-MoE and OLMoE say so in the config.
                norm_top_k: c.get("norm_topk_prob").and_then(Value::as_bool).unwrap_or(arch == Arch::Mixtral),
            }),
            None => None,
        };
        // Qwen3-MoE: layers listed in `mlp_only_layers`, and those off the sparse step, stay dense.
        let dense: Vec<usize> = match c.get("mlp_only_layers") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|v| v as usize).collect(),
            _ => vec![],
        };
        let step = c.opt_usize("decoder_sparse_step").unwrap_or(1).max(1);
        let moe_layers = (0..num_layers).map(|i| moe.is_some() && !dense.contains(&i) && (i + 1) % step == 0).collect();
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads: c.opt_usize("num_key_value_heads").unwrap_or(num_heads),
            head_dim,
            vocab_size: c.usize("vocab_size")?,
            norm_eps: c.opt_f64("rms_norm_eps").or_else(|| c.opt_f64("layer_norm_eps")).or_else(|| c.opt_f64("layer_norm_epsilon")).unwrap_or(1e-6),
            rope_theta: rope_theta as f32,
            rotary_dim: (head_dim as f64 * rotary_fraction) as usize,
            rope_scaling: hf_rope_scaling(rope)?,
            rope_local_theta: c
                .opt_f64("rope_local_base_freq")
                .or_else(|| local_params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
                .map(|v| v as f32),
            sliding_window,
            sliding_layers,
            max_position_embeddings: c.opt_usize("max_position_embeddings").or_else(|| c.opt_usize("n_positions")).unwrap_or(4096),
            tie_word_embeddings: c
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(matches!(arch, Arch::Gemma2 | Arch::Gemma3 | Arch::Gpt2)),
            activation,
            attn_scale,
            parallel_residual: arch == Arch::GptNeox && c.get("use_parallel_residual").and_then(Value::as_bool).unwrap_or(true),
            attn_softcap: c.opt_f64("attn_logit_softcapping").map(|v| v as f32),
            final_softcap: c.opt_f64("final_logit_softcapping").map(|v| v as f32),
            qkv_clip: c.opt_f64("clip_qkv").map(|v| v as f32),
            moe,
            moe_layers,
            bos_token_id: c.opt_usize("bos_token_id").map(|v| v as u32),
            eos_token_ids,
        };
        cfg.validate()
    }

    /// Read the config from GGUF metadata (`{arch}.block_count` and friends).
    pub fn from_gguf(meta: &std::collections::HashMap<String, gguf_file::Value>) -> Result<ModelConfig> {
        let g = GgufMeta(meta);
        let arch_name = g.str("general.architecture")?;
        let arch = Arch::parse(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = g.usize(&key("embedding_length"))?;
        let num_heads = g.usize(&key("attention.head_count"))?;
        let num_layers = bounded("block_count", g.usize(&key("block_count"))?)?;
        let head_dim = g.opt_usize(&key("attention.key_length")).unwrap_or(hidden_size / num_heads.max(1));
        let rotary_dim = g.opt_usize(&key("rope.dimension_count")).filter(|_| !arch.gemma()).unwrap_or(head_dim);
        let vocab_size = match g.opt_usize(&key("vocab_size")) {
            Some(v) => v,
            None => match meta.get("tokenizer.ggml.tokens") {
                Some(gguf_file::Value::Array(a)) => a.len(),
                _ => return Err(ModelError::MissingConfig(key("vocab_size"))),
            },
        };
        // 0 means "no window" (Phi-3's converter writes it).
        let sliding_window = g.opt_usize(&key("attention.sliding_window")).filter(|&w| w > 0);
        let sliding_layers = match arch {
            Arch::Gemma3 => gemma_sliding_layers(num_layers, 6),
            Arch::Gemma2 => gemma_sliding_layers(num_layers, 2),
            _ => vec![sliding_window.is_some(); num_layers],
        };
        let rope_scaling = match g.opt_str(&key("rope.scaling.type")).as_deref() {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear { factor: g.f32(&key("rope.scaling.factor"))? },
            Some("yarn") => RopeScaling::Yarn {
                factor: g.f32(&key("rope.scaling.factor"))?,
                original_max_position: g.f32(&key("rope.scaling.original_context_length"))?,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: None,
            },
            Some(other) => return Err(ModelError::BadConfig(format!("unsupported rope scaling `{other}`"))),
        };
        let (rope_theta, rope_local_theta) = match arch {
            // llama.cpp stores the global base; local layers use 10k.
            Arch::Gemma3 => (g.opt_f32(&key("rope.freq_base")).unwrap_or(1_000_000.0), Some(10_000.0)),
            _ => (g.opt_f32(&key("rope.freq_base")).unwrap_or(10_000.0), None),
        };
        let eps = g
            .opt_f32(&key("attention.layer_norm_rms_epsilon"))
            .or_else(|| g.opt_f32(&key("attention.layer_norm_epsilon")))
            .ok_or_else(|| ModelError::MissingConfig(key("attention.layer_norm_rms_epsilon")))?;
        let activation = match arch {
            Arch::Gemma2 | Arch::Gemma3 | Arch::Gpt2 => Activation::GeluTanh,
            Arch::GptNeox => Activation::GeluErf,
            _ => Activation::Silu,
        };
        // GGUF has no query_pre_attn_scalar; like llama.cpp, Gemma 2 27B (46 layers) scales by
        // d / heads, every other model by the head size.
        let attn_scale = match arch {
            Arch::Gemma2 if num_layers == 46 => 1.0 / ((hidden_size / num_heads.max(1)) as f32).sqrt(),
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        let intermediate_size = g.usize(&key("feed_forward_length")).or_else(|e| g.opt_usize(&key("expert_feed_forward_length")).ok_or(e))?;
        let moe = match g.opt_usize(&key("expert_count")).filter(|&e| e > 0) {
            Some(num_experts) => Some(MoeConfig {
                num_experts,
                top_k: g.usize(&key("expert_used_count"))?,
                expert_size: g.opt_usize(&key("expert_feed_forward_length")).unwrap_or(intermediate_size),
                // As llama.cpp: Mixtral (llama) and Qwen3-MoE renormalize, OLMoE does not.
                norm_top_k: g.opt_bool(&key("expert_weights_norm")).unwrap_or(arch != Arch::Olmoe),
            }),
            None => None,
        };
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads: g.opt_usize(&key("attention.head_count_kv")).unwrap_or(num_heads),
            head_dim,
            vocab_size,
            norm_eps: eps as f64,
            rope_theta,
            rotary_dim,
            rope_scaling,
            rope_local_theta,
            sliding_window,
            sliding_layers,
            max_position_embeddings: g.opt_usize(&key("context_length")).unwrap_or(4096),
            // Decided by the loader: tied when the file has no `output.weight`.
            tie_word_embeddings: false,
            activation,
            attn_scale,
            parallel_residual: arch == Arch::GptNeox && g.opt_bool(&key("use_parallel_residual")).unwrap_or(true),
            attn_softcap: g.opt_f32(&key("attn_logit_softcapping")).filter(|&c| c > 0.0),
            final_softcap: g.opt_f32(&key("final_logit_softcapping")).filter(|&c| c > 0.0),
            // llama.cpp's OLMoE reads no clipping either (released OLMoE has none).
            qkv_clip: None,
            moe,
            // GGUF files say per layer by which tensors exist; the loader checks.
            moe_layers: vec![moe.is_some(); num_layers],
            bos_token_id: g.opt_usize("tokenizer.ggml.bos_token_id").map(|v| v as u32),
            eos_token_ids: g.opt_usize("tokenizer.ggml.eos_token_id").map(|v| vec![v as u32]).unwrap_or_default(),
        };
        cfg.validate()
    }

    fn validate(self) -> Result<Self> {
        let bad = |m: String| Err(ModelError::BadConfig(m));
        // A corrupt or hostile file must be an error here, not an overflow or a huge
        // allocation later: every size is bounded, and the products the loader and the KV
        // cache form from them fit comfortably in 64 bits.
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            bounded(name, v)?;
        }
        let q_width = self.num_heads.checked_mul(self.head_dim).filter(|&w| w <= MAX_DIM);
        if q_width.is_none() || self.vocab_size.checked_mul(self.hidden_size).is_none_or(|n| n > MAX_ELEMENTS) {
            return bad(format!(
                "implausible sizes: {} heads x {} head_dim, vocabulary {} x hidden {}",
                self.num_heads, self.head_dim, self.vocab_size, self.hidden_size
            ));
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!("{} heads cannot share {} kv heads", self.num_heads, self.num_kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            return bad(format!("head_dim {} must be even and positive", self.head_dim));
        }
        if !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > self.head_dim {
            return bad(format!("rotary dimension {} must be even and at most head_dim {}", self.rotary_dim, self.head_dim));
        }
        if let Some(m) = &self.moe {
            if m.top_k == 0 || m.top_k > m.num_experts || m.num_experts > 4096 {
                return bad(format!("{} experts per token out of {}", m.top_k, m.num_experts));
            }
        }
        if self.sliding_layers.len() != self.num_layers || self.moe_layers.len() != self.num_layers {
            return bad(format!("{} layer types for {} layers", self.sliding_layers.len(), self.num_layers));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_layers == 0 {
            return bad("hidden_size, vocab_size and num_hidden_layers must be positive".into());
        }
        Ok(self)
    }
}

/// The largest single dimension a config may declare (16M: above every real model's
/// vocabulary, width and context).
const MAX_DIM: usize = 1 << 24;
/// The largest matrix a config may imply (2^36 elements, 256 GiB in f32).
const MAX_ELEMENTS: usize = 1 << 36;

fn bounded(name: &str, v: usize) -> Result<usize> {
    if v > MAX_DIM {
        return Err(ModelError::BadConfig(format!("{name} = {v} is implausibly large (limit {MAX_DIM}); is the file corrupt?")));
    }
    Ok(v)
}

/// Gemma 3: every `pattern`-th layer is global, the rest slide.
fn gemma_sliding_layers(n: usize, pattern: usize) -> Vec<bool> {
    (0..n).map(|i| pattern == 0 || (i + 1) % pattern != 0).collect()
}

fn hf_rope_scaling(v: Option<&Value>) -> Result<RopeScaling> {
    let Some(v) = v.filter(|v| v.is_object()) else { return Ok(RopeScaling::None) };
    let f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
    let need = |k: &str| f(k).ok_or_else(|| ModelError::MissingConfig(format!("rope_scaling.{k}")));
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default");
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: need("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position: need("original_max_position_embeddings")?,
        },
        "yarn" => RopeScaling::Yarn {
            factor: need("factor")?,
            original_max_position: need("original_max_position_embeddings")?,
            beta_fast: f("beta_fast").unwrap_or(32.0),
            beta_slow: f("beta_slow").unwrap_or(1.0),
            attention_factor: f("attention_factor"),
        },
        other => return Err(ModelError::BadConfig(format!("unsupported rope_scaling type `{other}`"))),
    })
}

struct Cfg<'a> {
    root: &'a Value,
    text: Option<&'a Value>,
}

impl Cfg<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.text.and_then(|t| t.get(k)).or_else(|| self.root.get(k)).filter(|v| !v.is_null())
    }
    fn str(&self, k: &str) -> Result<String> {
        self.opt_str(k).ok_or_else(|| ModelError::MissingConfig(k.into()))
    }
    fn opt_str(&self, k: &str) -> Option<String> {
        self.get(k).and_then(Value::as_str).map(str::to_string)
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k).ok_or_else(|| ModelError::MissingConfig(k.into()))
    }
    /// The first of several spellings that is present.
    fn usize_any(&self, keys: &[&str]) -> Result<usize> {
        keys.iter().find_map(|k| self.opt_usize(k)).ok_or_else(|| ModelError::MissingConfig(keys[0].into()))
    }
    fn opt_usize(&self, k: &str) -> Option<usize> {
        self.get(k).and_then(Value::as_u64).map(|v| v as usize)
    }
    fn opt_f64(&self, k: &str) -> Option<f64> {
        self.get(k).and_then(Value::as_f64)
    }
}

struct GgufMeta<'a>(&'a std::collections::HashMap<String, gguf_file::Value>);

impl GgufMeta<'_> {
    fn str(&self, k: &str) -> Result<String> {
        self.opt_str(k).ok_or_else(|| ModelError::MissingConfig(k.into()))
    }
    fn opt_str(&self, k: &str) -> Option<String> {
        self.0.get(k).and_then(|v| v.to_string().ok()).cloned()
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k).ok_or_else(|| ModelError::MissingConfig(k.into()))
    }
    fn opt_usize(&self, k: &str) -> Option<usize> {
        use gguf_file::Value as V;
        match self.0.get(k)? {
            V::U8(v) => Some(*v as usize),
            V::U16(v) => Some(*v as usize),
            V::U32(v) => Some(*v as usize),
            V::U64(v) => Some(*v as usize),
            V::I8(v) if *v >= 0 => Some(*v as usize),
            V::I16(v) if *v >= 0 => Some(*v as usize),
            V::I32(v) if *v >= 0 => Some(*v as usize),
            V::I64(v) if *v >= 0 => Some(*v as usize),
            _ => None,
        }
    }
    fn opt_bool(&self, k: &str) -> Option<bool> {
        match self.0.get(k)? {
            gguf_file::Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    fn f32(&self, k: &str) -> Result<f32> {
        self.opt_f32(k).ok_or_else(|| ModelError::MissingConfig(k.into()))
    }
    fn opt_f32(&self, k: &str) -> Option<f32> {
        use gguf_file::Value as V;
        match self.0.get(k)? {
            V::F32(v) => Some(*v),
            V::F64(v) => Some(*v as f32),
            _ => self.opt_usize(k).map(|v| v as f32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str, expect: &str) {
        let v: Value = serde_json::from_str(json).unwrap();
        let got = match ModelConfig::from_hf_json(&v) {
            Ok(c) => format!("{:?} layers={} heads={}/{} dh={} sliding={:?}", c.arch, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.sliding_layers),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect);
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 10"#;

    #[test]
    fn hf_configs() {
        check(&format!(r#"{{"model_type": "llama", {BASE}}}"#), "Llama layers=2 heads=4/4 dh=16 sliding=[false, false]");
        check(&format!(r#"{{"model_type": "falcon", {BASE}}}"#), &format!("error: unsupported architecture `falcon` (glassbox runs {ARCH_NAMES})"));
        check(r#"{"model_type": "llama", "hidden_size": 64}"#, "error: config is missing `num_attention_heads`");
        check(&format!(r#"{{"model_type": "qwen2", {BASE}, "num_key_value_heads": 3}}"#), "error: invalid config: 4 heads cannot share 3 kv heads");
        check(
            &format!(r#"{{"model_type": "gemma3_text", {BASE}, "head_dim": 32, "num_hidden_layers": 6, "num_key_value_heads": 1}}"#),
            "Gemma3 layers=6 heads=4/1 dh=32 sliding=[true, true, true, true, true, false]",
        );
        check(
            &format!(r#"{{"model_type": "gemma3", "text_config": {{"model_type": "gemma3_text", {BASE}, "layer_types": ["sliding_attention", "full_attention"]}}}}"#),
            "Gemma3 layers=2 heads=4/4 dh=16 sliding=[true, false]",
        );
    }
}
