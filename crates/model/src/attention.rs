//! Attention over the paged KV cache: causal, per sequence, each (row, head) computed alone
//! in a fixed order over its keys (so a row's numbers never depend on the batch or on how a
//! prompt was chunked). One task per (row, KV head) on the compute pool: the heads sharing a KV head
//! read each key and value row once.
//!
//! Scores are `kernels::dot(q, k) * scale`; the softmax's max and sum run in eight fixed
//! lanes of keys and its `exp` is `kernels::exp_in_place` (one polynomial on every path);
//! values are added as `z += p * v` per element, a multiply then an add. Key and value rows
//! are prefetched ahead: at long contexts attention is bound by reading the cache. The cache
//! holds f32 or f16 rows (`KvRows`); f16 is converted exactly on read, so the arithmetic is
//! the same.

use crate::kernels::dot_group;

/// `z_h = Σ_i p[i][h] · v_i` over the keys at `offsets` in `v`, for each head `h` of `z`
/// (`[heads, dh]`; `(p, stride, first)`: key `i`'s heads at `p[i * stride + first ..]`): per element
/// a multiply then an add (no FMA), in key order from zero, so every path gives the scalar
/// loop's numbers.
/// `row`: room for one value row (the portable loop converts f16 rows into it).
fn weighted_values(z: &mut [f32], dh: usize, (p, stride, first): (&[f32], usize, usize), v: KvRows, offsets: &[usize], row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::tiles::simd() && dh > 0 {
            let (ptr, len, f16) = v.raw();
            macro_rules! by_heads {
                ($f16:literal) => {
                    match z.len() / dh {
                        1 => values_avx::<1, 8, $f16>(z, dh, p, stride, first, (ptr, len), offsets),
                        2 => values_avx::<2, 4, $f16>(z, dh, p, stride, first, (ptr, len), offsets),
                        3 => values_avx::<3, 2, $f16>(z, dh, p, stride, first, (ptr, len), offsets),
                        4 => values_avx::<4, 2, $f16>(z, dh, p, stride, first, (ptr, len), offsets),
                        _ => false,
                    }
                };
            }
            // SAFETY: AVX and F16C are present (checked); `ptr` holds `len` elements of the
            // type `f16` says; each `values_avx` call checks its shapes against them.
            let done = unsafe { if f16 { by_heads!(true) } else { by_heads!(false) } };
            if done {
                return;
            }
        }
    }
    z.fill(0.0);
    for (i, &o) in offsets.iter().enumerate() {
        if let Some(&ahead) = offsets.get(i + PREFETCH) {
            v.prefetch(ahead, dh);
        }
        let row = v.read(o, &mut row[..dh]);
        for (h, zh) in z.chunks_exact_mut(dh.max(1)).enumerate() {
            let a = p[i * stride + first + h];
            for (zi, vi) in zh.iter_mut().zip(row) {
                *zi += a * vi;
            }
        }
    }
}

/// Keys per pass of [`values_avx`]: their value rows stay in L1 while each slice of the
/// head dimension is summed over them.
const KEY_BLOCK: usize = 32;

/// [`weighted_values`] for `H` heads with their sums in registers: `C` 8-float registers per
/// head, a slice of `8C` dimensions at a time over a block of keys (the accumulators stay in
/// registers across the block instead of a load and a store per key). `v`: the value rows'
/// address and element count, f16 elements when `F16` (converted exactly on load), else f32.
/// Returns false (nothing done) when the shapes do not fit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn values_avx<const H: usize, const C: usize, const F16: bool>(
    z: &mut [f32],
    dh: usize,
    p: &[f32],
    stride: usize,
    first: usize,
    (v, len): (*const u8, usize),
    offsets: &[usize],
) -> bool {
    use std::arch::x86_64::*;
    let fits = z.len() == H * dh
        && dh.is_multiple_of(8 * C)
        && first + H <= stride
        && p.len() >= offsets.len() * stride
        && offsets.iter().all(|&o| o + dh <= len);
    if !fits {
        return false;
    }
    let size = if F16 { 2 } else { 4 };
    // Eight values from element `at`, as f32.
    macro_rules! load {
        ($at:expr) => {
            if F16 {
                _mm256_cvtph_ps(_mm_loadu_si128(v.add(2 * $at) as *const __m128i))
            } else {
                _mm256_loadu_ps(v.add(4 * $at) as *const f32)
            }
        };
    }
    z.fill(0.0);
    for (b, block) in offsets.chunks(KEY_BLOCK).enumerate() {
        let key0 = b * KEY_BLOCK;
        // The next block's value rows, while this one is summed.
        for &ahead in offsets.iter().skip(key0 + KEY_BLOCK).take(KEY_BLOCK) {
            crate::kernels::prefetch(v.add(size * ahead), size * dh);
        }
        for c0 in (0..dh).step_by(8 * C) {
            let mut acc = [[_mm256_setzero_ps(); C]; H];
            for (h, a) in acc.iter_mut().enumerate() {
                for (c, r) in a.iter_mut().enumerate() {
                    *r = _mm256_loadu_ps(z.as_ptr().add(h * dh + c0 + 8 * c));
                }
            }
            for (i, &o) in block.iter().enumerate() {
                let pk = p.as_ptr().add((key0 + i) * stride + first);
                let mut vv = [_mm256_setzero_ps(); C];
                for (c, x) in vv.iter_mut().enumerate() {
                    *x = load!(o + c0 + 8 * c);
                }
                for (h, a) in acc.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(*pk.add(h));
                    for (c, r) in a.iter_mut().enumerate() {
                        *r = _mm256_add_ps(*r, _mm256_mul_ps(w, vv[c]));
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                for (c, r) in a.iter().enumerate() {
                    _mm256_storeu_ps(z.as_mut_ptr().add(h * dh + c0 + 8 * c), *r);
                }
            }
        }
    }
    true
}

/// How many positions ahead attention asks for key and value rows. The rows of one KV head are
/// strided by the whole row of every head, and the weights streaming through the caches evict
/// them between steps: without prefetching, the value loop stalled on each row (80% of its
/// `perf` samples on one load; attention took a third of a decode step at 512 tokens).
const PREFETCH: usize = 8;

/// `out[i * heads + h] = dot(q_h, k_i) * scale` for the heads `q` holds (`[heads, dh]`) and
/// the keys at `offsets` in `k`, 4 heads per key through `dot_group`; K rows prefetched
/// ahead; `key`: room for one key row (f16 rows are converted into it). (A kernel that reduced
/// eight keys' sums through one transpose measured no faster: attention at long contexts is
/// bound by reading the cache.)
fn scores(q: &[f32], dh: usize, k: KvRows, offsets: &[usize], scale: f32, key: &mut [f32], out: &mut [f32]) {
    let heads = q.len() / dh.max(1);
    // Four heads at a time over every key (more than four heads read the keys again, from
    // cache).
    for (c, qc) in q.chunks(4 * dh.max(1)).enumerate() {
        let n = qc.len() / dh;
        let qs: [&[f32]; 4] = std::array::from_fn(|j| &qc[j.min(n - 1) * dh..(j.min(n - 1) + 1) * dh]);
        for (i, &o) in offsets.iter().enumerate() {
            if let Some(&ahead) = offsets.get(i + PREFETCH) {
                k.prefetch(ahead, dh);
            }
            let row = k.read(o, &mut key[..dh]);
            let at = i * heads + 4 * c;
            for (p, v) in out[at..at + n].iter_mut().zip(dot_group(&qs[..n], row)) {
                *p = v * scale;
            }
        }
    }
}

/// Per-thread room for one attention task (reused: no allocation per (row, head) once the
/// buffers have grown to the longest context).
#[derive(Default)]
struct Scratch {
    offsets: Vec<usize>,
    probs: Vec<f32>,
    /// One key or value row (f16 rows are converted into it).
    row: Vec<f32>,
    /// The softmax's per-head maxima and sums.
    stats: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Keys per lane group of the softmax's sums: key `i` of a head adds into partial sum
/// `i % SUM_LANES`.
const SUM_LANES: usize = 8;

/// Softmax of each column of `p` (`[keys][heads]`, `heads` wide), soft-capped first when
/// asked: per head, the max, `exp(x - max)` (`kernels::exp_in_place`, the whole block at
/// once), their sum, then `· 1/sum`. The sum runs in eight partial sums (key `i` into partial
/// `i % 8`, in key order), then the fixed tree `((s0+s4)+(s2+s6))+((s1+s5)+(s3+s7))`: a
/// head's numbers depend only on its column and its length, never on how many heads share the
/// block (the parts attention splits a group into depend on the batch), and one head's column
/// runs as eight independent chains instead of one (the single chain of the max and the sum
/// was most of a batch-1 decode's softmax time). `stats`: room for the maxima and partials.
fn softmax_columns(p: &mut [f32], heads: usize, softcap: Option<f32>, stats: &mut Vec<f32>) {
    if heads == 0 {
        return;
    }
    if let Some(cap) = softcap {
        p.iter_mut().for_each(|e| *e = cap * (*e / cap).tanh());
    }
    stats.clear();
    let lanes = SUM_LANES * heads;
    stats.resize(lanes, f32::NEG_INFINITY);
    stats.resize(2 * lanes, 0.0);
    let (max, sum) = stats.split_at_mut(lanes);
    // Maxima in the same lanes (exact in any order), then folded into lane 0.
    for block in p.chunks(lanes) {
        for (m, &x) in max.iter_mut().zip(block) {
            *m = m.max(x);
        }
    }
    for l in 1..SUM_LANES {
        for h in 0..heads {
            max[h] = max[h].max(max[l * heads + h]);
        }
    }
    let max = &max[..heads];
    for row in p.chunks_exact_mut(heads) {
        for (e, m) in row.iter_mut().zip(max) {
            *e -= m;
        }
    }
    crate::kernels::exp_in_place(p);
    for block in p.chunks(lanes) {
        for (s, e) in sum.iter_mut().zip(block) {
            *s += e;
        }
    }
    // Per head the fixed tree over its eight partials, then the inverse, into partial 0's
    // place (no other head reads it).
    for h in 0..heads {
        let l = |i: usize| sum[i * heads + h];
        sum[h] = 1.0 / (((l(0) + l(4)) + (l(2) + l(6))) + ((l(1) + l(5)) + (l(3) + l(7))));
    }
    let inv = &sum[..heads];
    for row in p.chunks_exact_mut(heads) {
        for (e, i) in row.iter_mut().zip(inv) {
            *e *= i;
        }
    }
}

/// A KV cache's keys or values for one layer, in the cache's element type. Attention reads
/// f16 rows converted exactly to f32, so its arithmetic is the same as over f32 rows holding
/// the f16-rounded values.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl KvRows<'_> {
    /// `out` = the `out.len()` elements from `at`, as f32 (a copy only for f16).
    #[inline]
    fn read<'b>(&'b self, at: usize, out: &'b mut [f32]) -> &'b [f32] {
        match self {
            KvRows::F32(v) => &v[at..at + out.len()],
            KvRows::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                let n = out.len();
                v[at..at + n].convert_to_f32_slice(out);
                out
            }
        }
    }

    /// The elements' address, their count, and whether they are f16 (else f32).
    #[inline]
    fn raw(&self) -> (*const u8, usize, bool) {
        match self {
            KvRows::F32(v) => (v.as_ptr() as *const u8, v.len(), false),
            KvRows::F16(v) => (v.as_ptr() as *const u8, v.len(), true),
        }
    }

    /// Ask the CPU for the `n` elements from `at` ahead of use (a hint; no effect on results).
    #[inline]
    fn prefetch(&self, at: usize, n: usize) {
        let (p, len, f16) = self.raw();
        let size = if f16 { 2 } else { 4 };
        if at + n <= len {
            crate::kernels::prefetch(p.wrapping_add(size * at), size * n);
        }
    }
}

/// Keys and values of one sequence for one layer, as stored by a KV cache: rows of
/// `kv_heads * head_dim` elements, position `p` in block `block_table[p / block_size]`.
pub struct KvView<'a> {
    pub k: KvRows<'a>,
    pub v: KvRows<'a>,
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

/// One sequence's part of a step: `t` query rows (`heads * head_dim` each) at positions
/// `pos..pos+t`, and its keys and values (those of the step included).
pub struct SeqQueries<'a> {
    pub q: crate::batch::Rows<'a>,
    pub pos: usize,
    pub t: usize,
    pub kv: KvView<'a>,
}

/// What attention gives back for a step.
pub struct AttnOut {
    /// `[rows, heads, head_dim]`, the sequences' rows one after another.
    pub z: Vec<f32>,
    /// Per sequence, when asked: the probabilities `[heads, t, ctx]`, zeros where a key is
    /// invisible.
    pub probs: Vec<Option<Vec<f32>>>,
}

/// Causal attention for every sequence of a step, in one loop over the compute pool.
/// Each (row, head) is computed alone: scores in key order, max, exp and sum in fixed lanes
/// of keys (`softmax_columns`), then the weighted sum of values in key order; so a row's
/// numbers depend neither on the other sequences nor on how its prompt was chunked.
pub fn attention(seqs: &[SeqQueries], s: &AttnShape, want_probs: bool) -> AttnOut {
    let (h, dh) = (s.heads, s.head_dim);
    let group = h / s.kv_heads;
    // The step's rows as (sequence, row within it).
    let rows: Vec<(usize, usize)> = seqs.iter().enumerate().flat_map(|(i, sq)| (0..sq.t).map(move |r| (i, r))).collect();
    // One task per (row, KV head): the heads sharing a KV head read each key and value row
    // once instead of once per head. With few rows (decoding one sequence) a KV head's heads
    // are split into parts, so that every thread gets several tasks (4 KV heads on 2 threads
    // left one idle while the other ran a whole head group). A head's arithmetic is the same
    // in any part.
    let threads = crate::pool::Pool::global().threads();
    let parts = (4 * threads).div_ceil((rows.len() * s.kv_heads).max(1)).clamp(1, group.max(1));
    let per_part = group.div_ceil(parts);
    let parts = group.div_ceil(per_part);
    // Task `i`'s heads of its row, one contiguous piece of `z`.
    let task = |i: usize| {
        let (row, kvh, part) = (i / (s.kv_heads * parts), i / parts % s.kv_heads, i % parts);
        (row, kvh * group + part * per_part..kvh * group + ((part + 1) * per_part).min(group))
    };
    let pieces: Vec<std::ops::Range<usize>> = (0..rows.len() * s.kv_heads * parts)
        .map(|i| {
            let (row, heads) = task(i);
            (row * h + heads.start) * dh..(row * h + heads.end) * dh
        })
        .collect();
    // Probabilities leave the tasks only when the pattern was asked for: per (row, head).
    let pattern: Vec<std::sync::Mutex<Vec<f32>>> = (0..if want_probs { rows.len() * h } else { 0 }).map(|_| Default::default()).collect();
    let mut z = vec![0f32; rows.len() * h * dh];
    crate::pool::for_each_slice(&mut z, &pieces, |i, out| {
        let (row, heads) = task(i);
        let kvh = heads.start / group;
        let (sq, r) = rows[row];
        let SeqQueries { q, pos, kv, .. } = &seqs[sq];
        let p = pos + r;
        let lo = s.window.map_or(0, |w| (p + 1).saturating_sub(w));
        let n_heads = heads.len();
        let keys = p + 1 - lo;
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let Scratch { offsets, probs, row: kv_row, stats } = &mut *scratch;
            // Each position's offset once (a division), for its key and its value row.
            offsets.clear();
            offsets.extend((lo..=p).map(|j| kv.offset(j) + kvh * dh));
            // Scores key-major (`[key][head]`): each key's heads side by side for the value loop.
            probs.clear();
            probs.resize(keys * n_heads, 0.0);
            kv_row.resize(dh, 0.0);
            let qr = &q.row(r)[heads.start * dh..heads.end * dh];
            scores(qr, dh, kv.k, offsets, s.scale, kv_row, probs);
            softmax_columns(probs, n_heads, s.softcap, stats);
            for (c, chunk) in out.chunks_mut(4 * dh).enumerate() {
                weighted_values(chunk, dh, (probs, n_heads, 4 * c), kv.v, offsets, kv_row);
            }
            for (g, head) in heads.clone().enumerate().filter(|_| want_probs) {
                if let Ok(mut slot) = pattern[row * h + head].lock() {
                    *slot = probs.iter().skip(g).step_by(n_heads).copied().collect();
                }
            }
        });
    });
    let mut probs: Vec<Option<Vec<f32>>> = seqs.iter().map(|sq| want_probs.then(|| vec![0f32; h * sq.t * (sq.pos + sq.t)])).collect();
    for (rh, slot) in pattern.into_iter().enumerate() {
        let pr = slot.into_inner().unwrap_or_default();
        let ((sq, r), head) = (rows[rh / h], rh % h);
        if let Some(all) = probs[sq].as_mut() {
            let (t, p) = (seqs[sq].t, seqs[sq].pos + r);
            let lo = p + 1 - pr.len();
            let base = (head * t + r) * (seqs[sq].pos + t);
            all[base + lo..base + p + 1].copy_from_slice(&pr);
        }
    }
    AttnOut { z, probs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Rows;
    use crate::kernels::tests::data;

    /// A head's softmax is the same bitwise whatever heads share its block (the parts of a
    /// group depend on the batch), sums to one, and keeps the order of its scores.
    #[test]
    fn softmax_of_a_head_does_not_depend_on_its_neighbours() {
        let mut stats = vec![];
        for (keys, heads) in [(1, 1), (7, 3), (8, 2), (37, 4), (300, 8), (513, 3)] {
            let block: Vec<f32> = data(keys * heads, keys as u32).iter().map(|x| x * 30.0).collect();
            let mut all = block.clone();
            softmax_columns(&mut all, heads, None, &mut stats);
            for h in 0..heads {
                let mut alone: Vec<f32> = block.iter().skip(h).step_by(heads).copied().collect();
                softmax_columns(&mut alone, 1, None, &mut stats);
                let got: Vec<f32> = all.iter().skip(h).step_by(heads).copied().collect();
                assert!(got.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()), "{keys} keys, head {h} of {heads}");
                let total: f32 = alone.iter().sum();
                assert!((total - 1.0).abs() < 1e-5, "{keys} keys: sums to {total}");
                let col: Vec<f32> = block.iter().skip(h).step_by(heads).copied().collect();
                let top = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
                assert_eq!(top(&alone), top(&col));
            }
        }
    }

    /// The register-blocked value sum is the scalar loop, bitwise, for every head count and
    /// head size (including ones it leaves to the scalar loop) and more keys than a block.
    #[test]
    fn weighted_values_are_the_scalar_loop_bitwise() {
        for (heads, dh) in [(1, 64), (2, 64), (3, 64), (4, 64), (4, 256), (3, 8), (1, 40), (5, 64)] {
            let (keys, stride, first) = (KEY_BLOCK * 2 + 7, heads + 2, 1);
            let v = data(keys * dh * 2, 3);
            let p = data(keys * stride, 4);
            // Rows out of order, as a paged cache stores them.
            let offsets: Vec<usize> = (0..keys).map(|i| ((i * 7) % keys) * 2 * dh).collect();
            let mut zs = vec![f32::NAN; heads * dh];
            weighted_values(&mut zs, dh, (&p, stride, first), KvRows::F32(&v), &offsets, &mut vec![0f32; dh]);
            for (h, z) in zs.chunks_exact(dh).enumerate() {
                let mut want = vec![0f32; dh];
                for (i, &o) in offsets.iter().enumerate() {
                    let a = p[i * stride + first + h];
                    for (w, x) in want.iter_mut().zip(&v[o..o + dh]) {
                        *w += a * x;
                    }
                }
                assert!(z.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "heads {heads}, dh {dh}");
            }
        }
    }

    /// An f16 cache gives the numbers of an f32 cache holding the same (rounded) values,
    /// bitwise: the rows are converted exactly and the arithmetic is the same.
    #[test]
    fn f16_rows_are_their_f32_values() {
        use half::f16;
        let (h, kvh, dh, t) = (8, 2, 64, 45);
        let row = kvh * dh;
        let half: Vec<f16> = data(t * row * 2, 3).iter().map(|&x| f16::from_f32(x)).collect();
        let wide: Vec<f32> = half.iter().map(|x| x.to_f32()).collect();
        let (k16, v16) = half.split_at(t * row);
        let (k32, v32) = wide.split_at(t * row);
        let q = data(t * h * dh, 5);
        let table = [0u32];
        let shape = AttnShape { heads: h, kv_heads: kvh, head_dim: dh, scale: 0.125, window: None, softcap: None };
        let run = |k: KvRows, v: KvRows| {
            // A prompt chunk and then one decoded row, as two sequences of a step.
            let seqs = [
                SeqQueries { q: Rows::contiguous(&q[..(t - 1) * h * dh], h * dh), pos: 0, t: t - 1, kv: KvView { k, v, block_table: &table, block_size: usize::MAX, row } },
                SeqQueries { q: Rows::contiguous(&q[(t - 1) * h * dh..], h * dh), pos: t - 1, t: 1, kv: KvView { k, v, block_table: &table, block_size: usize::MAX, row } },
            ];
            attention(&seqs, &shape, false).z
        };
        let (a, b) = (run(KvRows::F16(k16), KvRows::F16(v16)), run(KvRows::F32(k32), KvRows::F32(v32)));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
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
        let view = || KvView { k: KvRows::F32(&ks), v: KvRows::F32(&vs), block_table: &table, block_size: 4, row };
        let shape = AttnShape { heads: h, kv_heads: kvh, head_dim: dh, scale: 0.3, window: None, softcap: None };
        let one = |q: &[f32], pos: usize, t: usize, shape: &AttnShape| {
            let out = attention(&[SeqQueries { q: Rows::contiguous(q, shape.heads * shape.head_dim), pos, t, kv: view() }], shape, true);
            (out.z, out.probs.into_iter().next().flatten().unwrap())
        };
        let (whole, probs) = one(&q, 0, t, &shape);
        // Rows sum to one; the future is masked.
        let r0: f32 = probs[0..t].iter().sum();
        assert!((r0 - 1.0).abs() < 1e-6 && probs[1] == 0.0);
        let first = one(&q[..3 * h * dh], 0, 3, &shape).0;
        let rest = one(&q[3 * h * dh..], 3, t - 3, &shape).0;
        assert_eq!([first, rest].concat(), whole);
        // Both chunks in one call (as two sequences of one step): the same rows, the same
        // probabilities.
        let both = attention(
            &[SeqQueries { q: Rows::contiguous(&q[..3 * h * dh], h * dh), pos: 0, t: 3, kv: view() }, SeqQueries { q: Rows::contiguous(&q[3 * h * dh..], h * dh), pos: 3, t: t - 3, kv: view() }],
            &shape,
            true,
        );
        assert_eq!(both.z, whole);
        let p1 = both.probs[1].as_ref().unwrap();
        assert_eq!(p1[..t], probs[3 * t..4 * t]);
        // A window of 2 sees only the last two keys.
        let win = AttnShape { window: Some(2), ..shape };
        let (_, p) = one(&q, 0, t, &win);
        assert_eq!(&p[6 * t..6 * t + 5], &[0.0; 5]);
    }
}
