//! Attention over the paged KV cache: causal, per sequence, each (row, head) computed alone
//! in key order (so a row's numbers never depend on the batch or on how a prompt was
//! chunked). One task per (row, KV head) on the compute pool: the heads sharing a KV head
//! read each key and value row once.
//!
//! Scores are `kernels::dot(q, k) * scale`; values are added as `z += p * v` per element, a
//! multiply then an add. Key and value rows are prefetched ahead: at long contexts attention
//! is bound by reading the cache.

use crate::kernels::dot_group;
#[cfg(target_arch = "x86_64")]
use crate::kernels::has_avx2;

/// `z_r += a_r * v` for every row `r`, element by element (a multiply, then an add: no FMA),
/// so the AVX path's numbers are the scalar loop's; `v` is read once for all rows.
#[inline]
fn axpy_rows(zs: &mut [Vec<f32>], a: &[f32], v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: AVX is present (checked); every row is indexed within min(len).
            return unsafe { axpy_rows_avx(zs, a, v) };
        }
    }
    for (z, &a) in zs.iter_mut().zip(a) {
        for (zi, vi) in z.iter_mut().zip(v) {
            *zi += a * vi;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn axpy_rows_avx(zs: &mut [Vec<f32>], a: &[f32], v: &[f32]) {
    use std::arch::x86_64::*;
    let n = zs.iter().map(|z| z.len()).fold(v.len(), usize::min);
    let mut i = 0;
    while i + 8 <= n {
        let vv = _mm256_loadu_ps(v.as_ptr().add(i));
        for (z, &a) in zs.iter_mut().zip(a) {
            let zp = z.as_mut_ptr().add(i);
            _mm256_storeu_ps(zp, _mm256_add_ps(_mm256_loadu_ps(zp), _mm256_mul_ps(_mm256_set1_ps(a), vv)));
        }
        i += 8;
    }
    for (z, &a) in zs.iter_mut().zip(a) {
        for j in i..n {
            z[j] += a * v[j];
        }
    }
}

/// How many positions ahead attention asks for key and value rows. The rows of one KV head are
/// strided by the whole row of every head, and the weights streaming through the caches evict
/// them between steps: without prefetching, the value loop stalled on each row (80% of its
/// `perf` samples on one load; attention took a third of a decode step at 512 tokens).
const PREFETCH: usize = 8;

/// Ask the CPU to bring `row` into cache (a hint; no effect on results).
#[inline]
fn prefetch(row: &[f32]) {
    crate::kernels::prefetch(row.as_ptr() as *const u8, std::mem::size_of_val(row));
}

/// `out[i * heads + h] = dot(qs[h], k_i) * scale` for the keys at `offsets` in `k` (each as
/// long as a query), up to 4 heads per key through `dot_group`; K rows prefetched ahead. (A
/// kernel that reduced eight keys' sums through one transpose measured no faster: attention
/// at long contexts is bound by reading the cache.)
fn scores(qs: &[&[f32]], k: &[f32], offsets: &[usize], scale: f32, out: &mut [f32]) {
    let heads = qs.len();
    let dh = qs.first().map_or(0, |q| q.len());
    for (i, &o) in offsets.iter().enumerate() {
        if let Some(&ahead) = offsets.get(i + PREFETCH) {
            prefetch(&k[ahead..ahead + dh]);
        }
        let key = &k[o..o + dh];
        for (c, qc) in qs.chunks(4).enumerate() {
            let at = i * heads + 4 * c;
            for (p, v) in out[at..at + qc.len()].iter_mut().zip(dot_group(qc, key)) {
                *p = v * scale;
            }
        }
    }
}

/// Keys and values of one sequence for one layer, as stored by a KV cache: rows of
/// `kv_heads * head_dim` floats, position `p` in block `block_table[p / block_size]`.
pub struct KvView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub block_table: &'a [u32],
    pub block_size: usize,
    pub row: usize,
}

impl KvView<'_> {
    #[inline]
    pub fn offset(&self, pos: usize) -> usize {
        let b = self.block_table[pos / self.block_size] as usize;
        (b * self.block_size + pos % self.block_size) * self.row
    }
}

pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Keys more than `window - 1` positions back are invisible.
    pub window: Option<usize>,
    /// Scores become `cap * tanh(score / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

/// Causal attention for `t` query rows at positions `pos..pos+t` of one sequence.
/// `q` is `[t, heads, head_dim]`; returns `z` (`[t, heads, head_dim]`) and, when asked, the
/// probabilities `[heads, t, ctx]` with zeros where a key is invisible.
/// Each (row, head) is computed alone: scores in key order, max, exp, sum in key order,
/// then the weighted sum of values in key order.
pub fn attention(q: &[f32], pos: usize, t: usize, kv: &KvView, s: &AttnShape, want_probs: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let (h, dh) = (s.heads, s.head_dim);
    let group = h / s.kv_heads;
    let ctx = pos + t;
    // One task per (row, KV head): the heads sharing a KV head read each key and value row
    // once, from L1, instead of once per head. Each head's arithmetic is unchanged.
    let slots: Vec<std::sync::Mutex<(Vec<f32>, Vec<f32>)>> = (0..t * h).map(|_| Default::default()).collect();
    crate::pool::Pool::global().run(t * s.kv_heads, |task| {
        let (r, kvh) = (task / s.kv_heads, task % s.kv_heads);
        let p = pos + r;
        let lo = s.window.map_or(0, |w| (p + 1).saturating_sub(w));
        let heads = kvh * group..(kvh + 1) * group;
        let keys = p + 1 - lo;
        // Each position's offset once (a division), for its key and its value row.
        let offsets: Vec<usize> = (lo..=p).map(|j| kv.offset(j) + kvh * dh).collect();
        let qs: Vec<&[f32]> = heads.clone().map(|head| &q[(r * h + head) * dh..(r * h + head + 1) * dh]).collect();
        // Scores key-major (`[key][head]`): each key's heads side by side for the value loop.
        let mut probs = vec![0f32; keys * group];
        scores(&qs, kv.k, &offsets, s.scale, &mut probs);
        for g in 0..group {
            if let Some(cap) = s.softcap {
                probs.iter_mut().skip(g).step_by(group).for_each(|e| *e = cap * (*e / cap).tanh());
            }
            let max = probs.iter().skip(g).step_by(group).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0f32;
            for e in probs.iter_mut().skip(g).step_by(group) {
                *e = (*e - max).exp();
                sum += *e;
            }
            let inv = 1.0 / sum;
            probs.iter_mut().skip(g).step_by(group).for_each(|e| *e *= inv);
        }
        let mut zs = vec![vec![0f32; dh]; group];
        for (i, &o) in offsets.iter().enumerate() {
            if let Some(&ahead) = offsets.get(i + PREFETCH) {
                prefetch(&kv.v[ahead..ahead + dh]);
            }
            axpy_rows(&mut zs, &probs[i * group..(i + 1) * group], &kv.v[o..o + dh]);
        }
        for (g, (head, z)) in heads.zip(zs).enumerate() {
            // A head's probabilities are copied out only when the pattern was asked for.
            let pr = if want_probs { probs.iter().skip(g).step_by(group).copied().collect() } else { vec![] };
            if let Ok(mut slot) = slots[r * h + head].lock() {
                *slot = (z, pr);
            }
        }
    });
    let rows = slots.into_iter().map(|s| s.into_inner().unwrap_or_default());
    let mut z = vec![0f32; t * h * dh];
    let mut probs = want_probs.then(|| vec![0f32; h * t * ctx]);
    for (rh, (zr, pr)) in rows.enumerate() {
        let (r, head) = (rh / h, rh % h);
        z[rh * dh..(rh + 1) * dh].copy_from_slice(&zr);
        if let Some(all) = probs.as_mut() {
            let p = pos + r;
            let lo = p + 1 - pr.len();
            let base = (head * t + r) * ctx;
            all[base + lo..base + p + 1].copy_from_slice(&pr);
        }
    }
    (z, probs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::data;

    #[test]
    fn axpy_is_the_scalar_loop_bitwise() {
        for n in [1, 7, 8, 64, 67] {
            let (v, z0) = (data(n, 3), data(n, 4));
            let mut zs = vec![z0.clone(), z0.clone()];
            axpy_rows(&mut zs, &[0.37, -1.5], &v);
            for (z, a) in zs.iter().zip([0.37f32, -1.5]) {
                let want: Vec<f32> = z0.iter().zip(&v).map(|(z, v)| z + a * v).collect();
                assert!(z.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "n = {n}");
            }
        }
    }

    #[test]
    fn attention_chunked_equals_whole() {
        let (h, kvh, dh, t) = (4, 2, 8, 7);
        let row = kvh * dh;
        let k = data(t * row, 3);
        let v = data(t * row, 4);
        let q = data(t * h * dh, 5);
        let table = [1u32, 0]; // two blocks of 4, stored out of order
        let mut ks = vec![0f32; 8 * row];
        let mut vs = vec![0f32; 8 * row];
        for p in 0..t {
            let o = (table[p / 4] as usize * 4 + p % 4) * row;
            ks[o..o + row].copy_from_slice(&k[p * row..(p + 1) * row]);
            vs[o..o + row].copy_from_slice(&v[p * row..(p + 1) * row]);
        }
        let view = KvView { k: &ks, v: &vs, block_table: &table, block_size: 4, row };
        let shape = AttnShape { heads: h, kv_heads: kvh, head_dim: dh, scale: 0.3, window: None, softcap: None };
        let (whole, probs) = attention(&q, 0, t, &view, &shape, true);
        let probs = probs.unwrap();
        // Rows sum to one; the future is masked.
        let r0: f32 = probs[0..t].iter().sum();
        assert!((r0 - 1.0).abs() < 1e-6 && probs[1] == 0.0);
        let first = attention(&q[..3 * h * dh], 0, 3, &view, &shape, false).0;
        let rest = attention(&q[3 * h * dh..], 3, t - 3, &view, &shape, false).0;
        assert_eq!([first, rest].concat(), whole);
        // A window of 2 sees only the last two keys.
        let win = AttnShape { window: Some(2), ..shape };
        let (_, p) = attention(&q, 0, t, &view, &win, true);
        let p = p.unwrap();
        assert_eq!(&p[6 * t..6 * t + 5], &[0.0; 5]);
    }
}
