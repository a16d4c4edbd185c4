//! Weight sources behind one builder: model code asks for `vb.pp("self_attn").linear("q_proj")`
//! with Hugging Face's structural names, whatever the file format.

use crate::config::Arch;
use crate::error::{ModelError, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::path::{Path, PathBuf};
use crate::qkernels::{Needs, QFormat, QInput, QMatrix};
use std::sync::Arc;

/// Where tensors come from.
pub enum WeightFiles {
    Safetensors { paths: Vec<PathBuf>, st: candle_core::safetensors::MmapedSafetensors, arch: Arch },
    Gguf { path: PathBuf, mmap: memmap2::Mmap, content: gguf_file::Content, arch: Arch },
}

impl WeightFiles {
    pub fn safetensors(paths: Vec<PathBuf>, arch: Arch) -> Result<Self> {
        for p in &paths {
            check_safetensors_header(p)?;
        }
        // SAFETY: the files are not modified while mapped (the usual contract of model files).
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&paths) }
            .map_err(|e| ModelError::file(&paths[0], e))?;
        Ok(WeightFiles::Safetensors { paths, st, arch })
    }

    pub fn gguf(path: &Path, mmap: memmap2::Mmap, content: gguf_file::Content, arch: Arch) -> Self {
        WeightFiles::Gguf { path: path.to_path_buf(), mmap, content, arch }
    }

    pub fn root(&self, opts: LoadOptions) -> Vb<'_> {
        Vb { files: self, path: String::new(), opts }
    }

    fn describe(&self) -> String {
        match self {
            WeightFiles::Safetensors { paths, .. } => paths[0].display().to_string(),
            WeightFiles::Gguf { path, .. } => path.display().to_string(),
        }
    }
}

/// Safetensors files that are truncated fail with a clear message instead of a bad read later.
fn check_safetensors_header(p: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).map_err(|e| ModelError::file(p, e))?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| ModelError::file(p, "truncated safetensors file (no header)"))?;
    let header_len = u64::from_le_bytes(n);
    // The safetensors format caps headers at 100 MB; a larger length is corruption.
    if header_len > 100_000_000 {
        return Err(ModelError::file(p, format!("corrupt safetensors file: header length {header_len}")));
    }
    if header_len > len.saturating_sub(8) {
        return Err(ModelError::file(p, "truncated safetensors file (header runs past the end)"));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| ModelError::file(p, format!("corrupt safetensors header: {e}")))?;
    let data_len = len - 8 - header_len;
    let end = json
        .as_object()
        .into_iter()
        .flat_map(|o| o.values())
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if end > data_len {
        return Err(ModelError::file(p, format!("truncated safetensors file: tensors need {end} bytes, {data_len} present")));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Dequantize GGUF weights to f32 (exact reference numerics, more memory, slower).
    pub dequantize: bool,
    /// Keep every row's numbers independent of its batch (see `kernels`). Costs speed on
    /// quantized types whose candle kernel changes strategy with the batch size.
    pub batch_invariant: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dequantize: false, batch_invariant: true }
    }
}

/// A weight-path builder, like candle's `VarBuilder`: names come from nesting.
#[derive(Clone)]
pub struct Vb<'a> {
    files: &'a WeightFiles,
    path: String,
    opts: LoadOptions,
}

impl<'a> Vb<'a> {
    pub fn pp(&self, name: impl std::fmt::Display) -> Vb<'a> {
        let path = if self.path.is_empty() { name.to_string() } else { format!("{}.{name}", self.path) };
        Vb { files: self.files, path, opts: self.opts }
    }

    fn full(&self, name: &str) -> String {
        self.pp(name).path
    }

    pub fn contains(&self, name: &str) -> bool {
        let full = self.full(name);
        match self.files {
            WeightFiles::Safetensors { st, arch, .. } => hf_file_name(*arch, &full, |n| st.get(n).is_ok()).is_some(),
            WeightFiles::Gguf { content, arch, .. } => {
                gguf_name(*arch, &full).is_some_and(|n| content.tensor_infos.contains_key(&n))
            }
        }
    }

    /// A dense f32 tensor with the expected shape.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.full(name);
        let t = match self.files {
            WeightFiles::Safetensors { .. } => self.stored(&full)?.to_dtype(DType::F32)?,
            WeightFiles::Gguf { .. } => self.qtensor(&full)?.dequantize(&Device::Cpu)?,
        };
        check_shape(&full, t.dims(), shape)?;
        Ok(t)
    }

    /// A safetensors tensor in the file's own dtype, in Hugging Face's layout.
    fn stored(&self, full: &str) -> Result<Tensor> {
        let WeightFiles::Safetensors { st, arch, .. } = self.files else {
            unreachable!("stored is only called for safetensors files")
        };
        let name = hf_file_name(*arch, full, |n| st.get(n).is_ok())
            .ok_or_else(|| ModelError::MissingWeight(hf_file_name(*arch, full, |_| true).unwrap_or(full.to_string())))?;
        hf_layout(*arch, full, st.load(&name, &Device::Cpu)?)
    }

    /// A safetensors matrix `[rows, cols]`, read once: in f16 or bf16 kept in its 16 bits
    /// (`QFormat::F16`/`BF16`: half the memory of f32, the same numbers), else in f32.
    fn stored_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<StoredMatrix> {
        let full = self.full(name);
        let t = self.stored(&full)?;
        check_shape(&full, t.dims(), &[rows, cols])?;
        let flat = t.flatten_all()?;
        let (format, bytes): (QFormat, Vec<u8>) = match t.dtype() {
            DType::F16 => (QFormat::F16, flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::BF16 => (QFormat::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            _ => return Ok(StoredMatrix::F32(Arc::new(to_vec(&t)?))),
        };
        QMatrix::new(format, &bytes, rows, cols, false)
            .map(|m| StoredMatrix::Half(Arc::new(m)))
            .ok_or_else(|| ModelError::BadConfig(format!("{full}: {} bytes of {format:?} for [{rows}, {cols}]", bytes.len())))
    }

    fn qtensor(&self, full: &str) -> Result<QTensor> {
        let WeightFiles::Gguf { mmap, content, arch, path } = self.files else {
            unreachable!("qtensor is only called for GGUF files")
        };
        let name = gguf_name(*arch, full).ok_or_else(|| ModelError::MissingWeight(full.to_string()))?;
        if !content.tensor_infos.contains_key(&name) {
            return Err(ModelError::MissingWeight(format!("{name} (for {full})")));
        }
        let mut cursor = std::io::Cursor::new(&mmap[..]);
        content.tensor(&mut cursor, &name, &Device::Cpu).map_err(|e| ModelError::file(path, format!("tensor {name}: {e}")))
    }

    /// A linear layer `[out, inp]`, quantized when the file is and dequantization is off.
    pub fn linear(&self, name: &str, inp: usize, out: usize, bias: bool) -> Result<Linear> {
        self.linear_impl(name, inp, out, bias, None)
    }

    /// The q or k projection of `heads` heads. llama.cpp's converter permutes Llama's q/k rows
    /// for interleaved RoPE; we undo it so activations keep Hugging Face's layout and hooks
    /// match transformers.
    pub fn linear_rope(&self, name: &str, inp: usize, out: usize, bias: bool, heads: usize) -> Result<Linear> {
        self.linear_impl(name, inp, out, bias, Some(heads))
    }

    /// q, k and v in one `[(heads + 2 kv_heads) * head_dim, inp]` projection, rows q then k
    /// then v (GPT-2, GPT-NeoX, Phi-3).
    pub fn linear_qkv(&self, name: &str, inp: usize, (heads, kv_heads, head_dim): (usize, usize, usize), bias: bool) -> Result<Linear> {
        let lin = self.linear(name, inp, (heads + 2 * kv_heads) * head_dim, bias)?;
        match self.files {
            // GPT-NeoX interleaves per head: rows [head][q|k|v][dh] become [q|k|v][head][dh]
            // (as llama.cpp's converter does).
            WeightFiles::Safetensors { arch: Arch::GptNeox, .. } => lin.permute_rows(inp, |r| {
                let (head, part, i) = (r / (3 * head_dim), r % (3 * head_dim) / head_dim, r % head_dim);
                part * heads * head_dim + head * head_dim + i
            }),
            _ => Ok(lin),
        }
    }

    fn linear_impl(&self, name: &str, inp: usize, out: usize, bias: bool, heads: Option<usize>) -> Result<Linear> {
        let lin = self.pp(name);
        let bias = if bias { Some(lin.tensor("bias", &[out])?) } else { None };
        let full = lin.full("weight");
        let weight = match self.files {
            WeightFiles::Safetensors { .. } => match lin.stored_matrix("weight", out, inp)? {
                StoredMatrix::Half(m) => LinearWeight::Blocks(m),
                StoredMatrix::F32(w) => LinearWeight::Dense(w),
            },
            WeightFiles::Gguf { arch, .. } => {
                let q = self.qtensor(&full)?;
                check_shape(&full, q.shape().dims(), &[out, inp])?;
                let q = match heads {
                    Some(heads) if *arch == Arch::Llama => unpermute_rows(&q, heads)?,
                    _ => q,
                };
                self.weight_from_blocks(q, out, inp)?
            }
        };
        Ok(Linear { weight, bias })
    }

    /// A GGUF matrix `[out, inp]` as the fastest kernel this crate has for it that keeps its
    /// promises: the exact path (`dequantize`) computes with the dequantized f32 weights;
    /// the default path may quantize activations to 8 bits (as llama.cpp does).
    fn weight_from_blocks(&self, q: QTensor, out: usize, inp: usize) -> Result<LinearWeight> {
        let dequantize = self.opts.dequantize;
        // By default every quantized format of ours runs integer dots over 8-bit activations,
        // weights in tiles of 16 interleaved rows (`tiles.rs`, `ktiles.rs`). On the exact path
        // the 4/5-bit formats and the K-quants are expanded in registers with the f32 kernel's
        // arithmetic, bitwise the dequantized product, from a fifth to a third of the f32
        // bytes; Q8_0 is dense there. F16 and BF16 are always expanded in registers (exact on
        // both paths, half the f32 bytes).
        let ours = QMatrix::format_of(q.dtype()).filter(|f| !(dequantize && *f == QFormat::Q8_0));
        Ok(if let Some(m) = ours.and_then(|f| blocks(&q, f, out, inp, !dequantize)) {
            LinearWeight::Blocks(Arc::new(m))
        } else if dequantize || !candle_has_fast_kernel(q.dtype()) {
            LinearWeight::Dense(Arc::new(to_vec(&q.dequantize(&Device::Cpu)?)?))
        } else {
            LinearWeight::Quant { q: QMatMul::from_arc(Arc::new(q))?, rowwise: self.opts.batch_invariant, out }
        })
    }

    /// A `[rows, cols]` table read by row (token embeddings): GGUF blocks stay blocks when the
    /// format is one of ours (a row is dequantized on lookup, bitwise as candle would), else
    /// f32.
    pub fn table(&self, name: &str, rows: usize, cols: usize) -> Result<Table> {
        let lin = self.pp(name);
        if let WeightFiles::Gguf { .. } = self.files {
            let full = lin.full("weight");
            let q = self.qtensor(&full)?;
            check_shape(&full, q.shape().dims(), &[rows, cols])?;
            if let Some(m) = QMatrix::format_of(q.dtype()).and_then(|f| blocks(&q, f, rows, cols, !self.opts.dequantize)) {
                return Ok(Table::Blocks(Arc::new(m)));
            }
            return Ok(Table::Dense(Arc::new(to_vec(&q.dequantize(&Device::Cpu)?)?)));
        }
        Ok(match lin.stored_matrix("weight", rows, cols)? {
            StoredMatrix::Half(m) => Table::Blocks(m),
            StoredMatrix::F32(w) => Table::Dense(w),
        })
    }

    /// One projection of each of `n` experts, `[out, inp]` each: `experts.{e}.{name}` in
    /// Hugging Face files, one stacked `[n, out, inp]` tensor in GGUF (`ffn_gate_exps`...).
    pub fn experts(&self, name: &str, n: usize, inp: usize, out: usize) -> Result<Vec<Linear>> {
        let WeightFiles::Gguf { .. } = self.files else {
            return (0..n).map(|e| self.pp(e).linear(name, inp, out, false)).collect();
        };
        let full = self.pp(name).full("weight");
        let q = self.qtensor(&full)?;
        check_shape(&full, q.shape().dims(), &[n, out, inp])?;
        let dtype = q.dtype();
        let data = q.data()?;
        let per_expert = data.len() / n.max(1);
        (0..n)
            .map(|e| {
                let bytes = &data[e * per_expert..(e + 1) * per_expert];
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, vec![out, inp], &Device::Cpu)?;
                Ok(Linear { weight: self.weight_from_blocks(q, out, inp)?, bias: None })
            })
            .collect()
    }

    pub fn describe(&self) -> String {
        self.files.describe()
    }
}

/// A GGUF tensor's blocks as our kernels hold them (`None` if the bytes do not fit the shape);
/// `integer`: see `QMatrix::new`.
fn blocks(q: &QTensor, format: QFormat, rows: usize, cols: usize, integer: bool) -> Option<QMatrix> {
    QMatrix::new(format, &q.data().ok()?, rows, cols, integer)
}

/// `f` over a tensor's elements, row-major: borrowed in place when the tensor is contiguous
/// f32 on the CPU (the forward pass's activations always are), else copied.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&v[a..b]));
        }
    }
    Ok(f(&to_vec(t)?))
}

/// A tensor's elements, row-major.
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

fn check_shape(name: &str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got != expected {
        return Err(ModelError::WeightShape { name: name.to_string(), got: got.to_vec(), expected: expected.to_vec() });
    }
    Ok(())
}

/// Hugging Face structural names to llama.cpp's GGUF names. Load-time only.
pub fn gguf_name(arch: Arch, hf: &str) -> Option<String> {
    let (stem, suffix) = hf.rsplit_once('.')?;
    let mapped = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.embed_positions" => "position_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = stem.strip_prefix("model.layers.")?;
            let (layer, part) = rest.split_once('.')?;
            let part = match part {
                "input_layernorm" => "attn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.qkv_proj" => "attn_qkv",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "post_attention_layernorm" if matches!(arch, Arch::Gemma2 | Arch::Gemma3) => "post_attention_norm",
                "post_attention_layernorm" => "ffn_norm",
                "pre_feedforward_layernorm" => "ffn_norm",
                "post_feedforward_layernorm" => "post_ffw_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                // Phi-3: one tensor, gate rows then up rows (llama.cpp splits it the same way).
                "mlp.gate_up_proj" if arch == Arch::Phi3 => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                // Mixture of experts: the router, and each projection stacked over experts.
                "mlp.gate" => "ffn_gate_inp",
                "mlp.experts.gate_proj" => "ffn_gate_exps",
                "mlp.experts.up_proj" => "ffn_up_exps",
                "mlp.experts.down_proj" => "ffn_down_exps",
                _ => return None,
            };
            format!("blk.{layer}.{part}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// The name a Hugging Face checkpoint gives the weight our canonical (Llama-style) name
/// `canonical` means, if `present` says the file has it. GPT-2 and GPT-NeoX name every part
/// their own way; the model code still nests Llama's names, one segment maps to one segment.
/// GPT-2 checkpoints come with and without the `transformer.` prefix. Load-time only.
fn hf_file_name(arch: Arch, canonical: &str, present: impl Fn(&str) -> bool) -> Option<String> {
    let segment = |seg: &str| -> String {
        let renamed = match (arch, seg) {
            (Arch::Gpt2, "model") => "transformer",
            (Arch::Gpt2, "layers") => "h",
            (Arch::Gpt2, "embed_tokens") => "wte",
            (Arch::Gpt2, "embed_positions") => "wpe",
            (Arch::Gpt2, "norm") => "ln_f",
            (Arch::Gpt2, "input_layernorm") => "ln_1",
            (Arch::Gpt2, "post_attention_layernorm") => "ln_2",
            (Arch::Gpt2, "self_attn") => "attn",
            (Arch::Gpt2, "qkv_proj") => "c_attn",
            (Arch::Gpt2, "o_proj" | "down_proj") => "c_proj",
            (Arch::Gpt2, "up_proj") => "c_fc",
            (Arch::GptNeox, "model") => "gpt_neox",
            (Arch::GptNeox, "embed_tokens") => "embed_in",
            (Arch::GptNeox, "norm") => "final_layer_norm",
            (Arch::GptNeox, "self_attn") => "attention",
            (Arch::GptNeox, "qkv_proj") => "query_key_value",
            (Arch::GptNeox, "o_proj") => "dense",
            (Arch::GptNeox, "up_proj") => "dense_h_to_4h",
            (Arch::GptNeox, "down_proj") => "dense_4h_to_h",
            (Arch::GptNeox, "lm_head") => "embed_out",
            (Arch::Mixtral, "mlp") => "block_sparse_moe",
            (Arch::Mixtral, "gate_proj") => "w1",
            (Arch::Mixtral, "down_proj") => "w2",
            (Arch::Mixtral, "up_proj") => "w3",
            _ => seg,
        };
        renamed.to_string()
    };
    let name = canonical.split('.').map(segment).collect::<Vec<_>>().join(".");
    if present(&name) {
        return Some(name);
    }
    let bare = name.strip_prefix("transformer.").filter(|_| arch == Arch::Gpt2)?;
    present(bare).then(|| bare.to_string())
}

/// Bring a Hugging Face tensor into the layout the model code expects: GPT-2's `Conv1D`
/// stores linear weights `[in, out]`, we want `[out, in]` (llama.cpp's converter transposes
/// them the same way, so GGUF files already come so).
fn hf_layout(arch: Arch, canonical: &str, t: Tensor) -> Result<Tensor> {
    let linear = ["qkv_proj.weight", "o_proj.weight", "up_proj.weight", "down_proj.weight"];
    Ok(match arch {
        Arch::Gpt2 if canonical.starts_with("model.layers.") && linear.iter().any(|l| canonical.ends_with(l)) => t.t()?.contiguous()?,
        _ => t,
    })
}

/// Row `h*dh + 2i + j` of the GGUF tensor becomes row `h*dh + j*dh/2 + i`. Rows are quantized
/// independently, so this moves whole rows of bytes and works for every quantized type.
fn unpermute_rows(q: &QTensor, heads: usize) -> Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let (rows, cols) = (dims[0], dims[1]);
    if heads == 0 || rows % heads != 0 || !(rows / heads).is_multiple_of(2) {
        return Err(ModelError::BadConfig(format!("cannot un-permute {rows} rows over {heads} heads")));
    }
    let dh = rows / heads;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..dh / 2 {
            for j in 0..2 {
                let src = h * dh + 2 * i + j;
                let dst = h * dh + j * (dh / 2) + i;
                out[dst * row_bytes..(dst + 1) * row_bytes].copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &out, dims, &Device::Cpu)?)
}

/// What goes to candle after `qkernels.rs` (which takes Q8_0, the 4/5-bit formats and Q4_K,
/// Q5_K, Q6_K): its x86 kernels are SIMD for the other K-quants (Q2_K, Q3_K); anything else is
/// dequantized at load and run by our f32 kernel. Candle picks the K-quants' kernel by the
/// batch size, so the engine feeds them one row at a time when invariance is on.
fn candle_has_fast_kernel(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q8K)
}

/// A safetensors matrix as it is kept: 16-bit floats as they are, anything else in f32.
enum StoredMatrix {
    Half(Arc<QMatrix>),
    F32(Arc<Vec<f32>>),
}

/// A table read by rows (token embeddings), shared with the output projection when tied.
#[derive(Clone, Debug)]
pub enum Table {
    Dense(Arc<Vec<f32>>),
    Blocks(Arc<QMatrix>),
}

impl Table {
    /// Append row `i` (`cols` wide) to `out`.
    pub fn push_row(&self, i: usize, cols: usize, out: &mut Vec<f32>) {
        match self {
            Table::Dense(w) => out.extend_from_slice(&w[i * cols..(i + 1) * cols]),
            Table::Blocks(q) => {
                let start = out.len();
                out.resize(start + cols, 0.0);
                q.dequantize_row(i, &mut out[start..]);
            }
        }
    }
}

/// A linear layer; `forward` maps `[n, inp]` to `[n, out]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
}

#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// f32 `[out, inp]`, row-major, shared (tied embeddings use the same buffer).
    Dense(Arc<Vec<f32>>),
    /// GGUF blocks; candle quantizes the activations to 8 bits as llama.cpp does.
    /// `rowwise`: call once per row, for batch invariance. `out`: output width.
    Quant { q: QMatMul, rowwise: bool, out: usize },
    /// GGUF blocks, or 16-bit floats from GGUF or safetensors, through our own kernels
    /// (`qkernels.rs`: weights read once per call, batch invariant).
    Blocks(Arc<QMatrix>),
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_input(&QInput::new(x.clone()))
    }

    /// [`Linear::forward`] of an input that other projections read too (quantized once).
    pub fn forward_input(&self, x: &QInput) -> Result<Tensor> {
        if let LinearWeight::Quant { .. } = &self.weight {
            return self.forward_candle(x.tensor());
        }
        let (m, k) = x.tensor().dims2()?;
        let y = self.forward_rows(x)?;
        Ok(Tensor::from_vec(y, (m, self.out_features(k)), &Device::Cpu)?)
    }

    /// The output rows, row-major, in a buffer of their own (the attention layer works on
    /// them in place).
    pub fn forward_rows(&self, x: &QInput) -> Result<Vec<f32>> {
        let mut y = match &self.weight {
            LinearWeight::Dense(w) => {
                let (m, k) = x.tensor().dims2()?;
                let n = w.len() / k.max(1);
                with_f32(x.tensor(), |x| crate::kernels::matmul_bt(x, w, m, k, n))?
            }
            LinearWeight::Blocks(w) => w.matmul_input(x)?,
            // candle's kernels (Q2_K, Q3_K) add their bias themselves.
            LinearWeight::Quant { .. } => return to_vec(&self.forward_candle(x.tensor())?),
        };
        if let Some(b) = &self.bias {
            // `y + b` per element, as candle's broadcast add.
            let b = to_vec(b)?;
            for row in y.chunks_exact_mut(b.len().max(1)) {
                for (v, b) in row.iter_mut().zip(&b) {
                    *v += b;
                }
            }
        }
        Ok(y)
    }

    /// The 8-bit form of the input the kernel reads (none: f32).
    pub fn needs(&self) -> Needs {
        match &self.weight {
            LinearWeight::Blocks(w) => w.needs(),
            _ => Needs::default(),
        }
    }

    /// Outputs per row for inputs of width `k`.
    fn out_features(&self, k: usize) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.len() / k.max(1),
            LinearWeight::Blocks(w) => w.out_features(),
            LinearWeight::Quant { out, .. } => *out,
        }
    }

    /// candle's quantized matmul (the formats without a kernel of ours), bias included.
    fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        let LinearWeight::Quant { q, rowwise, out } = &self.weight else {
            return Err(ModelError::BadConfig("not a candle-quantized weight".into()));
        };
        let y = if !rowwise {
            q.forward(x)?
        } else {
            let rows = (0..x.dim(0)?).map(|i| q.forward(&x.narrow(0, i, 1)?)).collect::<candle_core::Result<Vec<_>>>()?;
            if rows.is_empty() {
                // `cat` of nothing is an error; zero rows in give zero rows out.
                Tensor::zeros((0, *out), DType::F32, &Device::Cpu)?
            } else {
                Tensor::cat(&rows, 0)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Several projections of the same input as one (q, k and v; gate and up): their rows one
    /// after another, when their weights use the same kernel. Every output element is computed
    /// exactly as by its own projection; what is saved is the passes (the input read and, on
    /// the integer paths, quantized once instead of per projection).
    pub fn concat(parts: &[&Linear]) -> Option<Linear> {
        let weight = match parts.first()?.weight {
            LinearWeight::Dense(_) => {
                let ws: Option<Vec<&Arc<Vec<f32>>>> = parts.iter().map(|p| if let LinearWeight::Dense(w) = &p.weight { Some(w) } else { None }).collect();
                LinearWeight::Dense(Arc::new(ws?.iter().flat_map(|w| w.iter().copied()).collect()))
            }
            LinearWeight::Blocks(_) => {
                let ms: Option<Vec<&QMatrix>> = parts.iter().map(|p| if let LinearWeight::Blocks(m) = &p.weight { Some(m.as_ref()) } else { None }).collect();
                LinearWeight::Blocks(Arc::new(QMatrix::concat_rows(&ms?)?))
            }
            LinearWeight::Quant { .. } => return None,
        };
        let bias = if parts.iter().all(|p| p.bias.is_none()) {
            None
        } else {
            let bs: Option<Vec<Tensor>> = parts.iter().map(|p| p.bias.clone()).collect();
            Some(Tensor::cat(&bs?, 0).ok()?)
        };
        Some(Linear { weight, bias })
    }

    /// Move row `r` of a dense weight (and its bias) to row `to(r)`. Load-time only.
    fn permute_rows(self, cols: usize, to: impl Fn(usize) -> usize) -> Result<Linear> {
        let (weight, rows) = match &self.weight {
            LinearWeight::Dense(w) => {
                let rows = w.len() / cols;
                let mut out = vec![0f32; w.len()];
                for r in 0..rows {
                    out[to(r) * cols..(to(r) + 1) * cols].copy_from_slice(&w[r * cols..(r + 1) * cols]);
                }
                (LinearWeight::Dense(Arc::new(out)), rows)
            }
            LinearWeight::Blocks(m) => match m.permute_rows(&to) {
                Some(p) => (LinearWeight::Blocks(Arc::new(p)), m.out_features()),
                None => return Err(ModelError::BadConfig("only dense and 16-bit weights can be reordered".into())),
            },
            LinearWeight::Quant { .. } => return Err(ModelError::BadConfig("only dense and 16-bit weights can be reordered".into())),
        };
        let bias = match &self.bias {
            Some(b) => {
                let b = to_vec(b)?;
                let mut o = vec![0f32; rows];
                for (r, v) in b.iter().enumerate() {
                    o[to(r)] = *v;
                }
                Some(Tensor::from_vec(o, rows, &Device::Cpu)?)
            }
            None => None,
        };
        Ok(Linear { weight, bias })
    }

    pub fn dense(data: Arc<Vec<f32>>) -> Self {
        Linear { weight: LinearWeight::Dense(data), bias: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names() {
        let check = |arch, hf: &str, expect: Option<&str>| assert_eq!(gguf_name(arch, hf).as_deref(), expect, "{hf}");
        check(Arch::Llama, "model.layers.3.self_attn.q_proj.weight", Some("blk.3.attn_q.weight"));
        check(Arch::Qwen2, "model.layers.0.self_attn.k_proj.bias", Some("blk.0.attn_k.bias"));
        check(Arch::Llama, "model.layers.1.post_attention_layernorm.weight", Some("blk.1.ffn_norm.weight"));
        check(Arch::Gemma3, "model.layers.1.post_attention_layernorm.weight", Some("blk.1.post_attention_norm.weight"));
        check(Arch::Gemma3, "model.layers.1.pre_feedforward_layernorm.weight", Some("blk.1.ffn_norm.weight"));
        check(Arch::Llama, "model.embed_tokens.weight", Some("token_embd.weight"));
        check(Arch::Llama, "model.layers.1.nonsense.weight", None);
    }

    #[test]
    fn unpermute_undoes_llama_cpp_permutation() {
        // 2 heads of dh=4, 3 columns: GGUF rows are [h0: 0 2 1 3] order of HF rows.
        let hf: Vec<f32> = (0..8 * 32).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    let (g, f) = (h * 4 + 2 * i + j, h * 4 + j * 2 + i);
                    gguf[g * 32..(g + 1) * 32].copy_from_slice(&hf[f * 32..(f + 1) * 32]);
                }
            }
        }
        let t = Tensor::from_vec(gguf, (8, 32), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let back = unpermute_rows(&q, 2).unwrap();
        let back: Vec<f32> = back.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(back, hf);
    }
}
