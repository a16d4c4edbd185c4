//! Our own quantized matmul, starting with GGUF's Q8_0 (blocks of 32 weights: an f16 scale and
//! 32 signed bytes). Why ours: candle's quantized matmul walks the rows of the input outermost,
//! so a batch of 32 reads the whole weight matrix 32 times. SmolLM2's tied 49k×576 output
//! projection then took 27% of a 32-sequence decode step. Here each weight row is read once per
//! call, for every input row.
//!
//! Batch invariance by construction: `y[i, j]` is one fixed sequence of operations over
//! `x_i` and `w_j` (activation row quantized to Q8_0 as llama.cpp does, exact integer dot per
//! 4-weight group, one FMA per block into 8 lanes, a fixed reduction tree), whatever the
//! number of rows or how columns are split across threads. The AVX2 path and the portable
//! path compute exactly the same arithmetic (a test checks them bitwise).

use half::f16;
use rayon::prelude::*;

const QK: usize = 32;
const BLOCK_BYTES: usize = 2 + QK;

/// Q8_0 weights `[n, k]`, repacked at load: the block scales as f32 (one array), the values
/// as one contiguous array of bytes.
#[derive(Debug)]
pub struct Q8_0Matrix {
    d: Vec<f32>,
    q: Vec<i8>,
    n: usize,
    k: usize,
}

/// One activation row quantized to Q8_0: per block, the scale and 32 values.
struct QRow {
    d: Vec<f32>,
    q: Vec<i8>,
}

/// Input rows handled together against one weight row (each row's arithmetic is the same
/// as alone; grouping only saves loads).
const GROUP: usize = 4;

impl Q8_0Matrix {
    /// From GGUF bytes (`n` rows of `k / 32` blocks). `k` must be a multiple of 32.
    pub fn new(data: &[u8], n: usize, k: usize) -> Option<Self> {
        if !k.is_multiple_of(QK) || data.len() != n * (k / QK) * BLOCK_BYTES {
            return None;
        }
        let blocks = n * k / QK;
        let mut d = Vec::with_capacity(blocks);
        let mut q = Vec::with_capacity(n * k);
        for b in data.chunks_exact(BLOCK_BYTES) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            q.extend(b[2..].iter().map(|&v| v as i8));
        }
        Some(Q8_0Matrix { d, q, n, k })
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// `y[m, n] = x[m, k] · wᵀ`.
    pub fn matmul_bt(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k);
        let rows: Vec<QRow> = x.chunks_exact(self.k).map(quantize_row).collect();
        let nb = self.k / QK;
        const COLS: usize = 64;
        let blocks: Vec<(usize, Vec<f32>)> = (0..self.n.div_ceil(COLS))
            .into_par_iter()
            .map(|b| {
                let (c0, c1) = (b * COLS, ((b + 1) * COLS).min(self.n));
                let width = c1 - c0;
                let mut out = vec![0f32; m * width];
                for j in c0..c1 {
                    let (wd, wq) = (&self.d[j * nb..(j + 1) * nb], &self.q[j * self.k..(j + 1) * self.k]);
                    for (g, group) in rows.chunks(GROUP).enumerate() {
                        let vals = dot_group(wd, wq, group);
                        for (r, v) in vals.iter().take(group.len()).enumerate() {
                            out[(g * GROUP + r) * width + (j - c0)] = *v;
                        }
                    }
                }
                (c0, out)
            })
            .collect();
        let mut y = vec![0f32; m * self.n];
        for (c0, out) in blocks {
            let width = out.len() / m.max(1);
            for i in 0..m {
                y[i * self.n + c0..i * self.n + c0 + width].copy_from_slice(&out[i * width..(i + 1) * width]);
            }
        }
        y
    }
}

/// llama.cpp's activation quantization: per block, `d = max|x| / 127` (stored as f16),
/// `q = round(x / d)`.
fn quantize_row(x: &[f32]) -> QRow {
    let blocks = x.len() / QK;
    let mut d = Vec::with_capacity(blocks);
    let mut q = Vec::with_capacity(x.len());
    for b in x.chunks_exact(QK) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        d.push(f16::from_f32(scale).to_f32());
        q.extend(b.iter().map(|v| (v * inv).round() as i8));
    }
    QRow { d, q }
}

/// Up to `GROUP` rows against one weight row.
fn dot_group(wd: &[f32], wq: &[i8], rows: &[QRow]) -> [f32; GROUP] {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::has_avx2() {
            // SAFETY: AVX2 and FMA are present (checked); rows have the weight row's length.
            return unsafe {
                match rows.len() {
                    4 => dot_avx2::<4>(wd, wq, [&rows[0], &rows[1], &rows[2], &rows[3]]),
                    3 => pad(dot_avx2::<3>(wd, wq, [&rows[0], &rows[1], &rows[2]])),
                    2 => pad(dot_avx2::<2>(wd, wq, [&rows[0], &rows[1]])),
                    _ => pad(dot_avx2::<1>(wd, wq, [&rows[0]])),
                }
            };
        }
    }
    let mut out = [0f32; GROUP];
    for (o, r) in out.iter_mut().zip(rows) {
        *o = dot_portable(wd, wq, r);
    }
    out
}

fn pad<const R: usize>(v: [f32; R]) -> [f32; GROUP] {
    let mut out = [0f32; GROUP];
    out[..R].copy_from_slice(&v);
    out
}

/// The reference arithmetic: lane `l` of block `b` is the exact integer sum of products
/// `4l..4l+4`, added to lane `l`'s accumulator with one FMA by `d_w * d_x`; then
/// `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.
fn dot_portable(wd: &[f32], wq: &[i8], x: &QRow) -> f32 {
    let mut acc = [0f32; 8];
    for (b, (&dw, wb)) in wd.iter().zip(wq.chunks_exact(QK)).enumerate() {
        let d = dw * x.d[b];
        let xq = &x.q[b * QK..(b + 1) * QK];
        for (l, a) in acc.iter_mut().enumerate() {
            let s: i32 = (0..4).map(|t| wb[4 * l + t] as i32 * xq[4 * l + t] as i32).sum();
            *a = d.mul_add(s as f32, *a);
        }
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<const R: usize>(wd: &[f32], wq: &[i8], xs: [&QRow; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); R];
    let ones = _mm256_set1_epi16(1);
    for (b, &dw) in wd.iter().enumerate() {
        let w = _mm256_loadu_si256(wq.as_ptr().add(b * QK) as *const __m256i);
        let wabs = _mm256_sign_epi8(w, w);
        for r in 0..R {
            let x = _mm256_loadu_si256(xs[r].q.as_ptr().add(b * QK) as *const __m256i);
            // |w| · sign(x, w): unsigned × signed byte products summed in pairs (i16, exact
            // for |q| <= 127), then in fours (i32): lane l holds products 4l..4l+4.
            let quads = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w)), ones);
            let d = _mm256_set1_ps(dw * *xs[r].d.get_unchecked(b));
            acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(quads), acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), acc[r]);
        out[r] = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_matrix(n: usize, k: usize, seed: u64) -> (Q8_0Matrix, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut data = Vec::with_capacity(n * k / QK * BLOCK_BYTES);
        let mut dense = Vec::with_capacity(n * k);
        for _ in 0..n * k / QK {
            let d = f16::from_f32(rng.random_range(0.001f32..0.05));
            data.extend_from_slice(&d.to_le_bytes());
            for _ in 0..QK {
                let q: i8 = rng.random_range(-127..=127);
                data.push(q as u8);
                dense.push(d.to_f32() * q as f32);
            }
        }
        (Q8_0Matrix::new(&data, n, k).unwrap(), dense)
    }

    fn random_x(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    #[test]
    fn simd_and_portable_paths_agree_bitwise() {
        let (w, _) = random_matrix(7, 96, 1);
        let rows: Vec<QRow> = random_x(5, 96, 2).chunks_exact(96).map(quantize_row).collect();
        for j in 0..7 {
            let (wd, wq) = (&w.d[j * 3..(j + 1) * 3], &w.q[j * 96..(j + 1) * 96]);
            for group in [&rows[..4], &rows[4..]] {
                let got = dot_group(wd, wq, group);
                for (r, x) in group.iter().enumerate() {
                    assert_eq!(got[r].to_bits(), dot_portable(wd, wq, x).to_bits());
                }
            }
        }
    }

    #[test]
    fn batch_invariant_and_close_to_the_dense_product() {
        let (n, k, m) = (130, 576, 9);
        let (w, dense) = random_matrix(n, k, 3);
        let x = random_x(m, k, 4);
        let batched = w.matmul_bt(&x, m);
        for i in 0..m {
            let alone = w.matmul_bt(&x[i * k..(i + 1) * k], 1);
            assert!(alone.iter().zip(&batched[i * n..(i + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits()), "row {i} differs in a batch");
        }
        // Against f32 weights: only the 8-bit activations differ (relative error ~1%).
        let exact = crate::kernels::matmul_bt(&x, &dense, m, k, n);
        let (num, den) = exact.iter().zip(&batched).fold((0f64, 0f64), |(a, b), (e, g)| (a + ((e - g) as f64).powi(2), b + (*e as f64).powi(2)));
        assert!((num / den).sqrt() < 0.01, "relative error {}", (num / den).sqrt());
    }
}
