//! Small building blocks: norms, rotary embeddings, activations.

use crate::config::{Activation, NormKind, RopeScaling};
use crate::error::Result;
use crate::ktiles::KRows;
use crate::qkernels::{Needs, QInput};
use crate::tiles::QRows;
use crate::weights::Vb;
use candle_core::{Device, Tensor};

#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

/// Elements per piece of the elementwise ops below that go to the compute pool: smaller
/// outputs (a decode step's rows) stay on the calling thread.
const PAR_MIN: usize = 16 * 1024;

impl RmsNorm {
    /// `offset` is 1.0 for Gemma's `(1 + w)` norms stored as `w` (Hugging Face files);
    /// llama.cpp's converter already adds it, so GGUF files pass 0.0.
    pub fn load(vb: &Vb, size: usize, eps: f64, offset: f32) -> Result<Self> {
        let w = vb.tensor("weight", &[size])?;
        let weight = if offset != 0.0 { (w + offset as f64)? } else { w };
        Ok(RmsNorm { weight: crate::weights::to_vec(&weight)?, eps: eps as f32 })
    }

    /// Normalizes over the last dimension, rows on the compute pool. candle's `rms_norm`
    /// arithmetic, so its numbers (a test checks): `Σ x²` in element order, `m = sqrt(Σ/n +
    /// eps)`, then `x / m · w` (candle's own runs on its own thread pool, which spun beside
    /// ours: 6% of a 32-sequence decode step).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_input(x, Needs::default())?.into_tensor())
    }

    /// [`RmsNorm::forward`], and the 8-bit forms `needs` asks for made from each row right
    /// after it is normalized (while it is in L1): the one quantization of this output for
    /// every projection that reads it.
    pub fn forward_input(&self, x: &Tensor, needs: Needs) -> Result<QInput> {
        let n = self.weight.len();
        let shape = x.shape().clone();
        if n == 0 || x.dims().last() != Some(&n) {
            return Err(crate::error::ModelError::BadConfig(format!("rms norm of width {n} over a tensor of shape {shape:?}")));
        }
        let (out, pieces) = crate::weights::with_f32(x, |x| {
            let mut out = vec![0f32; x.len()];
            let pieces = crate::pool::map_rows_mut(&mut out, n, PAR_MIN, |first, piece| {
                let rows = piece.len() / n;
                let mut small = needs.small.then(|| QRows::with_capacity(n, rows));
                let mut kq = needs.k.then(|| KRows::with_capacity(n, rows));
                for (r, dst) in piece.chunks_exact_mut(n).enumerate() {
                    self.normalize(&x[(first + r) * n..(first + r + 1) * n], dst);
                    if let Some(q) = &mut small {
                        q.push(dst);
                    }
                    if let Some(q) = &mut kq {
                        q.push(dst);
                    }
                }
                (small, kq)
            });
            (out, pieces)
        })?;
        let (small, kq): (Vec<_>, Vec<_>) = pieces.into_iter().unzip();
        let (small, kq) = (small.into_iter().collect::<Option<Vec<_>>>(), kq.into_iter().collect::<Option<Vec<_>>>());
        Ok(QInput::quantized(Tensor::from_vec(out, shape, &Device::Cpu)?, small, kq))
    }

    /// One row: `Σ x²` in element order, `m = sqrt(Σ/n + eps)`, then `x / m · w`.
    fn normalize(&self, src: &[f32], dst: &mut [f32]) {
        let m = self.divisor(src);
        for ((d, s), w) in dst.iter_mut().zip(src).zip(&self.weight) {
            *d = *s / m * *w;
        }
    }

    /// [`RmsNorm::normalize`] of one row in place (q and k norms).
    pub fn normalize_in_place(&self, x: &mut [f32]) {
        let m = self.divisor(x);
        for (v, w) in x.iter_mut().zip(&self.weight) {
            *v = *v / m * *w;
        }
    }

    fn divisor(&self, x: &[f32]) -> f32 {
        let mut sum2 = 0f32;
        for &v in x {
            sum2 += v * v;
        }
        (sum2 / self.weight.len() as f32 + self.eps).sqrt()
    }
}

/// RMS norm or LayerNorm (weight and bias), per the architecture.
#[derive(Clone, Debug)]
pub enum Norm {
    Rms(RmsNorm),
    Layer { weight: Tensor, bias: Tensor, eps: f32 },
}

impl Norm {
    pub fn load(vb: &Vb, kind: NormKind, size: usize, eps: f64, offset: f32) -> Result<Self> {
        Ok(match kind {
            NormKind::Rms => Norm::Rms(RmsNorm::load(vb, size, eps, offset)?),
            NormKind::Layer => Norm::Layer { weight: vb.tensor("weight", &[size])?, bias: vb.tensor("bias", &[size])?, eps: eps as f32 },
        })
    }

    /// Normalizes over the last dimension, each row on its own.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms(n) => n.forward(x),
            Norm::Layer { weight, bias, eps } => Ok(candle_nn::ops::layer_norm(x, weight, bias, *eps)?),
        }
    }

    /// [`Norm::forward`] for projections that read the output in the forms `needs` asks for
    /// (made in the norm's pass for RMS norms).
    pub fn forward_input(&self, x: &Tensor, needs: Needs) -> Result<QInput> {
        match self {
            Norm::Rms(n) => n.forward_input(x, needs),
            Norm::Layer { .. } => Ok(QInput::new(self.forward(x)?)),
        }
    }
}

pub fn activate(act: Activation, x: &Tensor) -> Result<Tensor> {
    Ok(match act {
        Activation::Silu => candle_nn::ops::silu(x)?,
        Activation::GeluTanh => x.gelu()?,
        Activation::GeluErf => x.gelu_erf()?,
    })
}

/// `silu(gate) · up` for `y = [gate | up]` (`[n, 2f]` → `[n, f]`) in one pass: the gated MLP's
/// fused projection without splitting it into two tensors first. The same arithmetic as
/// candle's `silu` (`v / (1 + exp(-v))`) then the product, so the same numbers (a test checks).
pub fn silu_mul_halves(y: &Tensor) -> Result<Tensor> {
    let (n, two_f) = y.dims2()?;
    let f = two_f / 2;
    let out = crate::weights::with_f32(y, |v| {
        let mut out = vec![0f32; n * f];
        // Pieces of elements (a decode step has one row): a piece may start and end mid-row.
        // From 1024 elements a piece: the exponentials are dear (one 5632-wide row took 24 us
        // on one core, 16 us on two).
        crate::pool::for_each_rows(&mut out, 1, PAR_MIN / 16, |first, piece| {
            let (mut i, mut rest) = (first, piece);
            while !rest.is_empty() {
                let (r, c) = (i / f, i % f);
                let (head, tail) = rest.split_at_mut((f - c).min(rest.len()));
                let (gate, up) = (&v[r * two_f + c..], &v[r * two_f + f + c..]);
                for ((o, &g), &u) in head.iter_mut().zip(gate).zip(up) {
                    *o = (g / (1.0 + (-g).exp())) * u;
                }
                i += head.len();
                rest = tail;
            }
        });
        out
    })?;
    Ok(Tensor::from_vec(out, (n, f), &Device::Cpu)?)
}

/// `a + b`, element by element (same shapes), on the compute pool for large tensors: the
/// residual stream's adds without candle's thread pool.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return Ok((a + b)?);
    }
    let out = crate::weights::with_f32(a, |a| {
        crate::weights::with_f32(b, |b| {
            let mut out = vec![0f32; a.len()];
            crate::pool::for_each_rows(&mut out, 1, PAR_MIN, |first, piece| {
                for ((o, x), y) in piece.iter_mut().zip(&a[first..]).zip(&b[first..]) {
                    *o = x + y;
                }
            });
            out
        })
    })??;
    Ok(Tensor::from_vec(out, a.shape().clone(), &Device::Cpu)?)
}

/// Rotary position embedding in Hugging Face's half-split ("rotate_half") layout, over the
/// first `rotary_dim` dimensions of each head (all of them unless rotary is partial, as in
/// GPT-NeoX); the rest pass through.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// YaRN scales cos and sin.
    attention_factor: f32,
    /// Linear scaling divides positions.
    position_scale: f32,
}

impl Rope {
    /// `head_dim` here is the rotated width (the config's `rotary_dim`).
    pub fn new(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Rope {
        let half = head_dim / 2;
        let base: Vec<f64> = (0..half).map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64)).collect();
        let (mut attention_factor, mut position_scale) = (1.0f32, 1.0f32);
        let inv_freq: Vec<f64> = match scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => {
                position_scale = 1.0 / factor;
                base
            }
            RopeScaling::FreqFactors(f) => base.iter().zip(f).map(|(b, f)| b / *f as f64).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                let (factor, lo, hi, old) =
                    (*factor as f64, *low_freq_factor as f64, *high_freq_factor as f64, *original_max_position as f64);
                let (low_wavelen, high_wavelen) = (old / lo, old / hi);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn { factor, original_max_position, beta_fast, beta_slow, attention_factor: af } => {
                let (factor, old) = (*factor as f64, *original_max_position as f64);
                let dim = head_dim as f64;
                let correction = |rot: f64| dim * (old / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln() as f64);
                let low = correction(*beta_fast as f64).floor().max(0.0);
                let high = correction(*beta_slow as f64).ceil().min(dim - 1.0);
                attention_factor = af.unwrap_or(if factor <= 1.0 { 1.0 } else { (0.1 * factor.ln() + 1.0) as f32 });
                base.iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low).max(0.001)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (f / factor) * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect()
            }
        };
        Rope { inv_freq: inv_freq.iter().map(|&f| f as f32).collect(), attention_factor, position_scale }
    }

    /// cos and sin, `[n, head_dim/2]` row-major, for the given absolute positions (once per
    /// step, shared by every layer's `apply`).
    pub fn cos_sin(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let p = p as f32 * self.position_scale;
            for &f in &self.inv_freq {
                let a = p * f;
                cos.push(a.cos() * self.attention_factor);
                sin.push(a.sin() * self.attention_factor);
            }
        }
        (cos, sin)
    }

    /// Rotate one row's heads (`head_dim` values each) in place by the row's cos and sin
    /// (`rotary_dim / 2` values each): `x1·cos - x2·sin` and `x2·cos + x1·sin` per pair, each
    /// product and sum rounded (Hugging Face's `rotate_half` arithmetic).
    pub fn rotate(row: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        for head in row.chunks_exact_mut(head_dim.max(1)) {
            let (x1, rest) = head.split_at_mut(half);
            let x2 = &mut rest[..half];
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our RMSNorm and residual add are candle's, bitwise, for one row and for many (pool).
    #[test]
    fn norm_and_add_are_candles() {
        for (rows, d) in [(1, 576), (37, 2048), (3, 5)] {
            let x = Tensor::from_vec(crate::kernels::tests::data(rows * d, 7).iter().map(|v| v * 3.0).collect::<Vec<_>>(), (rows, d), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(crate::kernels::tests::data(d, 8), d, &Device::Cpu).unwrap();
            let norm = RmsNorm { weight: crate::weights::to_vec(&w).unwrap(), eps: 1e-5 };
            let same = |a: &Tensor, b: &Tensor| {
                let (a, b) = (crate::weights::to_vec(a).unwrap(), crate::weights::to_vec(b).unwrap());
                a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
            };
            assert!(same(&norm.forward(&x).unwrap(), &candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap()), "norm {rows}x{d}");
            let y = (x.clone() * 0.37).unwrap();
            assert!(same(&add(&x, &y).unwrap(), &(&x + &y).unwrap()), "add {rows}x{d}");
        }
    }

    /// The norm's fused quantization is the one a projection makes of the norm's output:
    /// the same products bitwise, for the 32-value and the 256-value forms, one row (on the
    /// caller) and many (pieces on the pool).
    #[test]
    fn fused_norm_quantize_is_quantizing_the_output() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use crate::qkernels::{QInput, QMatrix};
        let (n, d) = (24, 512);
        let norm = RmsNorm { weight: crate::kernels::tests::data(d, 8), eps: 1e-6 };
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&Tensor::from_vec(crate::kernels::tests::data(n * d, 2), (n, d), &Device::Cpu).unwrap(), dtype).unwrap();
            let w = QMatrix::new(QMatrix::format_of(dtype).unwrap(), &q.data().unwrap(), n, d, true).unwrap();
            for rows in [1, 100] {
                let x = Tensor::from_vec(crate::kernels::tests::data(rows * d, 7).iter().map(|v| v * 3.0).collect::<Vec<_>>(), (rows, d), &Device::Cpu).unwrap();
                let fused = norm.forward_input(&x, w.needs()).unwrap();
                let later = QInput::new(norm.forward(&x).unwrap());
                let (a, b) = (w.matmul_input(&fused).unwrap(), w.matmul_input(&later).unwrap());
                assert!(a.len() == rows * n && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{dtype:?}, {rows} rows");
            }
        }
    }

    /// The fused SiLU·up is candle's `silu(gate) * up`, bitwise.
    #[test]
    fn fused_silu_mul_is_candles() {
        // Small (on the caller), and large enough for pieces that split rows (on the pool).
        for (n, f) in [(3, 37), (1, 5632), (9, 5000)] {
            let v: Vec<f32> = crate::kernels::tests::data(n * 2 * f, 5).iter().map(|x| x * 20.0).collect();
            let y = Tensor::from_vec(v, (n, 2 * f), &Device::Cpu).unwrap();
            let want = (candle_nn::ops::silu(&y.narrow(1, 0, f).unwrap()).unwrap() * y.narrow(1, f, f).unwrap()).unwrap();
            let got = silu_mul_halves(&y).unwrap();
            let (a, b) = (crate::weights::to_vec(&got).unwrap(), crate::weights::to_vec(&want).unwrap());
            assert!(a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{n}x{f}");
        }
    }
}
