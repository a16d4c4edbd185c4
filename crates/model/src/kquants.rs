//! The K-quant formats (Q4_K, Q5_K, Q6_K: 256 weights per super-block) for `qkernels`: each
//! 16-weight chunk expanded to f32 exactly as candle's dequantize computes it (the same
//! multiplies and subtractions, in the same order), so a product through these kernels is
//! bitwise the product over the dequantized f32 weights, from the file's own bytes (weights
//! stay in their blocks: nothing is repacked). Why ours: candle's K-quant matmul changes its
//! arithmetic with the batch size, so the engine had to feed it one row at a time, reading
//! every weight once per sequence of the batch; and it quantizes activations to 8 bits.
//!
//! Layouts (ggml's `block_q4_K`, `block_q5_K`, `block_q6_K`):
//! - Q4_K (144 bytes): f16 `d`, f16 `dmin`, 12 bytes of 6-bit (scale, min) pairs for 8
//!   sub-blocks of 32, 128 bytes of nibbles. Per 64 weights, 32 bytes: low nibbles are the
//!   first 32, high nibbles the next 32. `w = (d * sc) * q - dmin * m`.
//! - Q5_K (176 bytes): Q4_K plus 32 bytes `qh` holding each weight's fifth bit.
//! - Q6_K (210 bytes): 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 signed 8-bit
//!   scales (one per 16 weights), f16 `d` last. `w = (d * sc) * (q - 32)`.

use half::f16;

/// Weights per super-block.
pub const QK_K: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KFormat {
    Q4K,
    Q5K,
    Q6K,
}

impl KFormat {
    pub fn block_bytes(self) -> usize {
        match self {
            KFormat::Q4K => 144,
            KFormat::Q5K => 176,
            KFormat::Q6K => 210,
        }
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// ggml's `get_scale_min_k4`: sub-block `j`'s 6-bit scale and min.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// A super-block's per-sub-block factors, computed as candle does: Q4_K/Q5_K `d * sc` and
/// `dmin * m` per 32 weights; Q6_K `d * sc` per 16 weights (no offset).
pub struct Factors {
    pub scale: [f32; 16],
    pub offset: [f32; 8],
}

pub fn factors(format: KFormat, blk: &[u8]) -> Factors {
    let mut f = Factors { scale: [0.0; 16], offset: [0.0; 8] };
    match format {
        KFormat::Q4K | KFormat::Q5K => {
            let (d, min) = (half(blk, 0), half(blk, 2));
            let scales = &blk[4..16];
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                f.scale[j] = d * sc as f32;
                f.offset[j] = min * m as f32;
            }
        }
        KFormat::Q6K => {
            let d = half(blk, 208);
            for (s, &sc) in f.scale.iter_mut().zip(&blk[192..208]) {
                *s = d * (sc as i8) as f32;
            }
        }
    }
    f
}

/// The integer values of chunk `c` (weights `16c..16c+16` of the super-block): 0..15 (Q4_K),
/// 0..31 (Q5_K) or -32..31 (Q6_K).
pub fn chunk_values(format: KFormat, blk: &[u8], c: usize) -> [i8; 16] {
    let mut q = [0i8; 16];
    match format {
        KFormat::Q4K | KFormat::Q5K => {
            let (g, s) = (c / 4, c % 4);
            let qs = if format == KFormat::Q4K { &blk[16..144] } else { &blk[48..176] };
            let bytes = &qs[32 * g + 16 * (s % 2)..32 * g + 16 * (s % 2) + 16];
            for (t, v) in q.iter_mut().enumerate() {
                let nib = if s < 2 { bytes[t] & 0xF } else { bytes[t] >> 4 };
                let high = if format == KFormat::Q5K { (blk[16 + 16 * (s % 2) + t] >> (2 * g + s / 2)) & 1 } else { 0 };
                *v = (nib | (high << 4)) as i8;
            }
        }
        KFormat::Q6K => {
            let (half_idx, c) = (c / 8, c % 8);
            let (quarter, l0) = (c / 2, 16 * (c % 2));
            let ql = &blk[64 * half_idx..64 * half_idx + 64];
            let qh = &blk[128 + 32 * half_idx..128 + 32 * half_idx + 32];
            for (t, v) in q.iter_mut().enumerate() {
                let l = l0 + t;
                let low = match quarter {
                    0 => ql[l] & 0xF,
                    1 => ql[l + 32] & 0xF,
                    2 => ql[l] >> 4,
                    _ => ql[l + 32] >> 4,
                };
                let high = (qh[l] >> (2 * quarter)) & 3;
                *v = (low | (high << 4)) as i8 - 32;
            }
        }
    }
    q
}

/// Which factors chunk `c` uses: (index into `scale`, index into `offset` or None).
pub fn chunk_factors(format: KFormat, c: usize) -> (usize, Option<usize>) {
    match format {
        // Sub-block of 32: chunks 0-1 are sub-block 2g (low nibbles), 2-3 are 2g+1.
        KFormat::Q4K | KFormat::Q5K => {
            let sub = 2 * (c / 4) + (c % 4) / 2;
            (sub, Some(sub))
        }
        // One scale per 16: 8 per half, two per quarter.
        KFormat::Q6K => {
            let (h, c) = (c / 8, c % 8);
            (8 * h + c % 2 + 2 * (c / 2), None)
        }
    }
}

/// One super-block to f32, exactly candle's dequantization.
pub fn dequantize_block(format: KFormat, blk: &[u8], out: &mut [f32]) {
    let f = factors(format, blk);
    for c in 0..QK_K / 16 {
        let q = chunk_values(format, blk, c);
        let (s, o) = chunk_factors(format, c);
        for (y, &v) in out[16 * c..16 * c + 16].iter_mut().zip(&q) {
            *y = match o {
                Some(o) => f.scale[s] * v as f32 - f.offset[o],
                None => f.scale[s] * v as f32,
            };
        }
    }
}

/// Up to 4 input rows against one weight row (`row` holds its super-blocks), AVX2+FMA: each
/// chunk's weights expanded as `dequantize_block` computes them and accumulated by
/// `kernels::fma_chunk16`, so the result is bitwise `kernels::dot` over the dequantized row.
///
/// # Safety
/// The CPU must have AVX2 and FMA; every `xs` row must be as long as `row` has weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_rows_avx2<const R: usize>(format: KFormat, xs: [&[f32]; R], row: &[u8]) -> [f32; R] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (b, blk) in row.chunks_exact(format.block_bytes()).enumerate() {
        let f = factors(format, blk);
        for c in 0..QK_K / 16 {
            let q = chunk_values_avx2(format, blk, c);
            let (s, o) = chunk_factors(format, c);
            let scale = _mm256_set1_ps(f.scale[s]);
            let expand = |v: __m128i| {
                let w = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)));
                match o {
                    Some(o) => _mm256_sub_ps(w, _mm256_set1_ps(f.offset[o])),
                    None => w,
                }
            };
            let (w0, w1) = (expand(q), expand(_mm_srli_si128(q, 8)));
            crate::kernels::fma_chunk16(&mut acc, &xs, b * QK_K + 16 * c, w0, w1);
        }
    }
    crate::kernels::reduce_rows(acc)
}

/// `chunk_values` with byte-wide SIMD: the 16 values as signed bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn chunk_values_avx2(format: KFormat, blk: &[u8], c: usize) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    let low4 = _mm_set1_epi8(0x0F);
    let load = |at: usize| _mm_loadu_si128(blk.as_ptr().add(at) as *const __m128i);
    // Per-byte right shift: 16-bit shift, then mask off what crossed from the next byte.
    let shr = |v: __m128i, n: i32, mask: i8| _mm_and_si128(_mm_srl_epi16(v, _mm_cvtsi32_si128(n)), _mm_set1_epi8(mask));
    match format {
        KFormat::Q4K | KFormat::Q5K => {
            let (g, s) = (c / 4, c % 4);
            let qs = if format == KFormat::Q4K { 16 } else { 48 };
            let bytes = load(qs + 32 * g + 16 * (s % 2));
            let nib = if s < 2 { _mm_and_si128(bytes, low4) } else { shr(bytes, 4, 0x0F) };
            if format == KFormat::Q4K {
                return nib;
            }
            let high = shr(load(16 + 16 * (s % 2)), (2 * g + s / 2) as i32, 1);
            _mm_or_si128(nib, _mm_slli_epi16(high, 4))
        }
        KFormat::Q6K => {
            let (h, c) = (c / 8, c % 8);
            let (quarter, l0) = (c / 2, 16 * (c % 2));
            let ql = load(64 * h + l0 + if quarter % 2 == 1 { 32 } else { 0 });
            let low = if quarter < 2 { _mm_and_si128(ql, low4) } else { shr(ql, 4, 0x0F) };
            let high = shr(load(128 + 32 * h + l0), (2 * quarter) as i32, 3);
            _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(high, 4)), _mm_set1_epi8(32))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Random weights quantized by candle into `format`, and candle's own dequantization.
    pub fn random(format: KFormat, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut s = seed;
        let vals: Vec<f32> = (0..n * k)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect();
        let dtype = match format {
            KFormat::Q4K => GgmlDType::Q4K,
            KFormat::Q5K => GgmlDType::Q5K,
            KFormat::Q6K => GgmlDType::Q6K,
        };
        let t = Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        (q.data().unwrap().to_vec(), dense)
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::random;
    use super::*;

    #[test]
    fn dequantization_is_candles() {
        for format in [KFormat::Q4K, KFormat::Q5K, KFormat::Q6K] {
            let (data, dense) = random(format, 3, 512, 7);
            let mut ours = vec![0f32; dense.len()];
            for (blk, out) in data.chunks_exact(format.block_bytes()).zip(ours.chunks_exact_mut(QK_K)) {
                dequantize_block(format, blk, out);
            }
            assert!(ours.iter().zip(&dense).all(|(a, b)| a.to_bits() == b.to_bits()), "{format:?}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_values_are_the_scalar_values() {
        if !crate::kernels::has_avx2() {
            return;
        }
        for format in [KFormat::Q4K, KFormat::Q5K, KFormat::Q6K] {
            let (data, _) = random(format, 2, 256, 11);
            for blk in data.chunks_exact(format.block_bytes()) {
                for c in 0..16 {
                    let mut got = [0i8; 16];
                    // SAFETY: AVX2 is present (checked above).
                    unsafe { std::arch::x86_64::_mm_storeu_si128(got.as_mut_ptr() as *mut _, chunk_values_avx2(format, blk, c)) };
                    assert_eq!(got, chunk_values(format, blk, c), "{format:?} chunk {c}");
                }
            }
        }
    }
}
