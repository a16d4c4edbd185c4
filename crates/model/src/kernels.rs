//! Our own CPU kernels, written where candle's cannot give what the engine needs:
//! batch invariance. Each output element is reduced in one fixed order that depends only on
//! the reduction length, never on how many rows share the call, how they are split across
//! threads, or whether a prompt was chunked. (Candle's gemm picks blockings by matrix size,
//! so a row's result can change with its neighbours.)


/// Lanes of the fixed-order dot product: element `i` goes to lane `i % LANES`; lanes are
/// summed pairwise at the end. Wide enough for the compiler to vectorize.
const LANES: usize = 16;

/// Fixed-order dot product; AVX2+FMA when the CPU has it (checked once), else portable.
/// Either way the order depends only on the length, so every row of a batch gets the same
/// arithmetic as it would alone.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// AVX2 and FMA (the quantized kernels' SIMD path), checked once.
#[cfg(target_arch = "x86_64")]
pub fn has_avx2() -> bool {
    has_avx2_fma()
}

/// AVX-512 VNNI with 256-bit forms (`vpdpbusd` on ymm registers), checked once.
/// `GLASSBOX_NO_VNNI=1` keeps the AVX2 path (to compare them; the results are the same).
#[cfg(target_arch = "x86_64")]
pub fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        has_avx2_fma() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") && std::env::var_os("GLASSBOX_NO_VNNI").is_none()
    })
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// `R` rows against one weight row, AVX2+FMA. Per row: element `i` of each 16-chunk
/// accumulates in lane `i % 16` (two 8-lane registers), the tail in a scalar FMA chain, then a
/// fixed reduction tree. A row's arithmetic is the same whatever `R` it is computed with, so
/// grouping rows (batching) never changes a result.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2<const R: usize>(xs: [&[f32]; R], w: &[f32]) -> [f32; R] {
    use std::arch::x86_64::*;
    let n = w.len();
    let chunks = n / 16;
    let pw = w.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for c in 0..chunks {
        let o = c * 16;
        let w0 = _mm256_loadu_ps(pw.add(o));
        let w1 = _mm256_loadu_ps(pw.add(o + 8));
        fma_chunk16(&mut acc, &xs, o, w0, w1);
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let mut tail = 0f32;
        for i in chunks * 16..n {
            tail = xs[r][i].mul_add(w[i], tail);
        }
        out[r] = reduce_lanes(acc[r], tail);
    }
    out
}

/// One 16-chunk at offset `o` of every row against weights `w0` (elements 0-7) and `w1`
/// (8-15): one FMA per 8 lanes. Shared with the quantized kernels that expand their weights in
/// registers (`qkernels`), so both compute exactly this.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn fma_chunk16<const R: usize>(
    acc: &mut [[std::arch::x86_64::__m256; 2]; R],
    xs: &[&[f32]; R],
    o: usize,
    w0: std::arch::x86_64::__m256,
    w1: std::arch::x86_64::__m256,
) {
    use std::arch::x86_64::*;
    for r in 0..R {
        let px = xs[r].as_ptr();
        acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(o)), w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(o + 8)), w1, acc[r][1]);
    }
}

/// The fixed reduction of a row's two 8-lane accumulators, plus its scalar tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn reduce_lanes(acc: [std::arch::x86_64::__m256; 2], tail: f32) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm256_add_ps(acc[0], acc[1]);
    let mut l = [0f32; 8];
    _mm256_storeu_ps(l.as_mut_ptr(), s);
    (((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))) + tail
}

/// `reduce_lanes` for every row of kernels whose weights cover whole 16-chunks (no tail): the
/// empty tail is `0.0`, as in the f32 kernel, which turns a -0.0 sum into +0.0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn reduce_rows<const R: usize>(acc: [[std::arch::x86_64::__m256; 2]; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = reduce_lanes(acc[r], 0.0);
    }
    out
}

#[cfg(target_arch = "x86_64")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_rows_avx2::<1>([a], b)[0]
}

#[inline]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, ra) = a.split_at(a.len() / LANES * LANES);
    let (cb, rb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(LANES).zip(cb.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// Up to 4 rows against one weight row; each result equals `dot(row, w)` exactly.
#[inline]
pub fn dot_group(rows: &[&[f32]], w: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA are present (checked); rows have w's length.
            unsafe {
                return match rows.len() {
                    4 => dot_rows_avx2::<4>([rows[0], rows[1], rows[2], rows[3]], w),
                    3 => {
                        let r = dot_rows_avx2::<3>([rows[0], rows[1], rows[2]], w);
                        [r[0], r[1], r[2], 0.0]
                    }
                    2 => {
                        let r = dot_rows_avx2::<2>([rows[0], rows[1]], w);
                        [r[0], r[1], 0.0, 0.0]
                    }
                    _ => [dot_rows_avx2::<1>([rows[0]], w)[0], 0.0, 0.0, 0.0],
                };
            }
        }
    }
    let mut out = [0f32; 4];
    for (o, r) in out.iter_mut().zip(rows) {
        *o = dot_portable(r, w);
    }
    out
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`. Batch invariant: `y[i, j]` is `dot(x_i, w_j)` whatever `m`.
/// Work is split over output columns, so the weights stream through each core once per call.
pub fn matmul_bt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    let rows: Vec<&[f32]> = x.chunks_exact(k).collect();
    // Column blocks: each task owns a contiguous range of output columns for every row.
    crate::pool::by_column_blocks(m, n, 64, |c0, c1, out| {
        let mut i = 0;
        while i < m {
            let group = (m - i).min(4);
            for j in c0..c1 {
                let vals = dot_group(&rows[i..i + group], &w[j * k..(j + 1) * k]);
                for (g, v) in vals.iter().take(group).enumerate() {
                    out.set(i + g, j, *v);
                }
            }
            i += group;
        }
    })
}

/// `z_r += a_r * v` for every row `r`, element by element (a multiply, then an add: no FMA),
/// so the AVX path's numbers are the scalar loop's; `v` is read once for all rows.
#[inline]
pub fn axpy_rows(zs: &mut [Vec<f32>], a: &[f32], v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
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
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        // SAFETY: a prefetch of a valid address has no architectural effect.
        unsafe { std::arch::x86_64::_mm_prefetch(line.as_ptr() as *const i8, std::arch::x86_64::_MM_HINT_T0) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
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
    #[inline]
    pub fn k_row(&self, pos: usize) -> &[f32] {
        let o = self.offset(pos);
        &self.k[o..o + self.row]
    }
    #[inline]
    pub fn v_row(&self, pos: usize) -> &[f32] {
        let o = self.offset(pos);
        &self.v[o..o + self.row]
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
        for (i, &o) in offsets.iter().enumerate() {
            if let Some(&ahead) = offsets.get(i + PREFETCH) {
                prefetch(&kv.k[ahead..ahead + dh]);
            }
            let k = &kv.k[o..o + dh];
            // Up to 4 heads against one key: each result is `dot(q_head, k)` exactly.
            for (c, qc) in qs.chunks(4).enumerate() {
                let at = i * group + 4 * c;
                for (p, v) in probs[at..at + qc.len()].iter_mut().zip(dot_group(qc, k)) {
                    *p = v * s.scale;
                }
            }
        }
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
            let pr = probs.iter().skip(g).step_by(group).copied().collect();
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

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32) - 0.5).collect()
    }

    #[test]
    fn matmul_rows_do_not_depend_on_batch() {
        let (k, n) = (70, 130);
        let x = data(9 * k, 1);
        let w = data(n * k, 2);
        let all = matmul_bt(&x, &w, 9, k, n);
        for i in 0..9 {
            let one = matmul_bt(&x[i * k..(i + 1) * k], &w, 1, k, n);
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
        // And it is a matmul.
        let naive: f32 = (0..k).map(|c| x[k + c] * w[3 * k + c]).sum();
        assert!((all[n + 3] - naive).abs() < 1e-5);
    }

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
