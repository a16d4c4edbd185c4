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

/// AVX-512 (F, BW, VL) with VNNI (`vpdpbusd`), checked once.
/// `GLASSBOX_NO_VNNI=1` keeps the AVX2 path (to compare them; the results are the same).
#[cfg(target_arch = "x86_64")]
pub fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        has_avx2_fma()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && std::env::var_os("GLASSBOX_NO_VNNI").is_none()
    })
}

/// Ask the CPU to bring the `len` bytes at `p` into cache: a hint, with no effect on results
/// (any address may be named, nothing is read). A no-op off x86-64.
#[inline]
pub(crate) fn prefetch(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..len).step_by(64) {
        // SAFETY: a prefetch has no architectural effect, whatever the address.
        unsafe { std::arch::x86_64::_mm_prefetch(p.wrapping_add(line) as *const i8, std::arch::x86_64::_MM_HINT_T0) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
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
    // `(((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))) + tail` over the lanes `l` of the
    // two accumulators' sum, in registers: the halves' sum pairs lane i with i + 4, the high
    // pair of that is added to the low pair, then the two lanes left (each add the same
    // operands as the scalar tree's, so the same bits; a test checks).
    let s = _mm256_add_ps(acc[0], acc[1]);
    let quad = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    let one = _mm_add_ss(pair, _mm_shuffle_ps::<0b01>(pair, pair));
    _mm_cvtss_f32(one) + tail
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
                    3 => pad4(dot_rows_avx2::<3>([rows[0], rows[1], rows[2]], w)),
                    2 => pad4(dot_rows_avx2::<2>([rows[0], rows[1]], w)),
                    _ => pad4(dot_rows_avx2::<1>([rows[0]], w)),
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

/// `e^x` for attention's softmax, one fixed sequence of operations per element whatever the
/// instruction set (a test checks the AVX2 lanes against the scalar twin bitwise): `n =
/// round(x·log2 e)`, `r = x - n·ln 2` in two parts, Cephes' degree-5 polynomial, times `2^n`
/// by the exponent bits. Within 2 ulp of `exp` (a test checks) and 0 below `-87.3` (where
/// `e^x` leaves the normal range); libm's `expf` one element at a time was 9% of a batch-1
/// decode step at 500 tokens of context.
pub fn exp_in_place(x: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA are present (checked).
            unsafe { exp_avx2(x) };
            done = x.len() / 8 * 8;
        }
    }
    for v in &mut x[done..] {
        *v = exp_scalar(*v);
    }
}

const EXP_LO: f32 = -87.336_55;
const EXP_HI: f32 = 88.376_26;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

/// The scalar twin of [`exp_avx2`]'s lanes (`max`/`min` ordered as `maxps`/`minps`, so a NaN
/// passes through).
fn exp_scalar(x: f32) -> f32 {
    let c = if EXP_LO > x { EXP_LO } else { x };
    let c = if EXP_HI < c { EXP_HI } else { c };
    let n = (c * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, c));
    let mut p = EXP_POLY[0];
    for k in &EXP_POLY[1..] {
        p = p.mul_add(r, *k);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < EXP_LO {
        0.0
    } else {
        y * scale
    }
}

/// [`exp_in_place`] eight lanes at a time (the tail is left to the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(x: &mut [f32]) {
    use std::arch::x86_64::*;
    for chunk in x.chunks_exact_mut(8) {
        let v = _mm256_loadu_ps(chunk.as_ptr());
        let c = _mm256_min_ps(_mm256_set1_ps(EXP_HI), _mm256_max_ps(_mm256_set1_ps(EXP_LO), v));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(c, _mm256_set1_ps(LOG2E)));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), c));
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for k in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*k));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
        let out = _mm256_mul_ps(y, scale);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_set1_ps(EXP_LO));
        _mm256_storeu_ps(chunk.as_mut_ptr(), _mm256_andnot_ps(under, out));
    }
}

/// 16-bit float weights (`bf16`: bfloat16, else IEEE half; little-endian bytes) widened
/// into `out`, exactly (every 16-bit value has an f32 twin).
pub fn widen_half(bf16: bool, w: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(w.chunks_exact(2)) {
        let bits = u16::from_le_bytes([b[0], b[1]]);
        *o = if bf16 { f32::from_bits((bits as u32) << 16) } else { half::f16::from_bits(bits).to_f32() };
    }
}

/// [`dot_group`] against a weight row of 16-bit floats (`w`: little-endian bytes): each
/// weight widened exactly in registers, then [`dot_group`]'s arithmetic, so each result is
/// bitwise `dot(row, widened w)`.
pub fn dot_group_half(rows: &[&[f32]], w: &[u8], bf16: bool) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::tiles::simd() {
            // SAFETY: AVX2, FMA and F16C are present (checked); rows are w.len() / 2 long.
            unsafe {
                return match (rows.len(), bf16) {
                    (4, false) => dot_rows_half_avx2::<4, false>([rows[0], rows[1], rows[2], rows[3]], w),
                    (4, true) => dot_rows_half_avx2::<4, true>([rows[0], rows[1], rows[2], rows[3]], w),
                    (3, false) => pad4(dot_rows_half_avx2::<3, false>([rows[0], rows[1], rows[2]], w)),
                    (3, true) => pad4(dot_rows_half_avx2::<3, true>([rows[0], rows[1], rows[2]], w)),
                    (2, false) => pad4(dot_rows_half_avx2::<2, false>([rows[0], rows[1]], w)),
                    (2, true) => pad4(dot_rows_half_avx2::<2, true>([rows[0], rows[1]], w)),
                    (_, false) => pad4(dot_rows_half_avx2::<1, false>([rows[0]], w)),
                    (_, true) => pad4(dot_rows_half_avx2::<1, true>([rows[0]], w)),
                };
            }
        }
    }
    let mut wide = vec![0f32; w.len() / 2];
    widen_half(bf16, w, &mut wide);
    dot_group(rows, &wide)
}

/// `R` (at most 4) results of a group of rows in the 4 slots a group returns, the rest zero.
pub(crate) fn pad4<const R: usize>(v: [f32; R]) -> [f32; 4] {
    let mut out = [0f32; 4];
    out[..R].copy_from_slice(&v);
    out
}

/// [`dot_rows_avx2`] over 16-bit weights: eight at a time widened (`vcvtph2ps`; bfloat16 by a
/// 16-bit shift), the same FMAs, tail and reduction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_half_avx2<const R: usize, const BF16: bool>(xs: [&[f32]; R], w: &[u8]) -> [f32; R] {
    use std::arch::x86_64::*;
    let n = w.len() / 2;
    let chunks = n / 16;
    let pw = w.as_ptr();
    let widen = |p: *const u8| {
        let h = _mm_loadu_si128(p as *const __m128i);
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        } else {
            _mm256_cvtph_ps(h)
        }
    };
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for c in 0..chunks {
        let o = c * 16;
        fma_chunk16(&mut acc, &xs, o, widen(pw.add(2 * o)), widen(pw.add(2 * o + 16)));
    }
    let mut tail_w = [0f32; 16];
    widen_half(BF16, &w[chunks * 32..], &mut tail_w[..n - chunks * 16]);
    let mut out = [0f32; R];
    for r in 0..R {
        let mut tail = 0f32;
        for i in chunks * 16..n {
            tail = xs[r][i].mul_add(tail_w[i - chunks * 16], tail);
        }
        out[r] = reduce_lanes(acc[r], tail);
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic test values in [-0.5, 0.5).
    pub(crate) fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32) - 0.5).collect()
    }

    /// The in-register reduction is the scalar tree, bitwise (signed zeros, infinities and
    /// NaNs included).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lane_reduction_is_the_scalar_tree() {
        if !has_avx2() {
            return;
        }
        let special = [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e38, -1e38, f32::MIN_POSITIVE];
        for seed in 0..400u32 {
            let mut v = data(17, seed);
            for (i, x) in v.iter_mut().enumerate() {
                *x *= 10f32.powi((seed % 7) as i32 * 3 - 9);
                if (seed as usize + i).is_multiple_of(11) {
                    *x = special[(seed as usize + i) % special.len()];
                }
            }
            let (a, b, tail) = (&v[..8], &v[8..16], v[16]);
            // SAFETY: AVX2 and FMA are present (checked).
            let got = unsafe {
                use std::arch::x86_64::*;
                reduce_lanes([_mm256_loadu_ps(a.as_ptr()), _mm256_loadu_ps(b.as_ptr())], tail)
            };
            let l: Vec<f32> = a.iter().zip(b).map(|(x, y)| x + y).collect();
            let want = (((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))) + tail;
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "seed {seed}: {got} vs {want}");
        }
    }

    /// The softmax's `exp`: every SIMD lane bitwise the scalar twin (the tail included), within
    /// 2 ulp of `exp` in f64 over the range a softmax sees, 0 for `-inf` and below the normal
    /// range, 1 at 0, NaN through.
    #[test]
    fn exp_is_its_scalar_twin_and_close() {
        let mut xs: Vec<f32> = (0..20001).map(|i| -90.0 + 100.0 * i as f32 / 20000.0).collect();
        xs.extend([0.0, -0.0, f32::NEG_INFINITY, -87.0, -87.5, -1e-8, 1e-8, f32::NAN, 88.0, 100.0]);
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for (x, g) in xs.iter().zip(&got) {
            let s = exp_scalar(*x);
            assert!(g.to_bits() == s.to_bits() || (g.is_nan() && s.is_nan()), "exp({x}): lanes {g} vs scalar {s}");
            let want = (*x as f64).exp();
            if x.is_nan() {
                assert!(g.is_nan());
            } else if *x < EXP_LO {
                assert_eq!(*g, 0.0, "exp({x})");
            } else if want < f32::MAX as f64 {
                let ulp = (want as f32).abs() * f32::EPSILON;
                assert!(((*g as f64) - want).abs() <= 2.0 * ulp as f64, "exp({x}) = {g}, want {want}");
            }
        }
        let mut one = [0.0f32];
        exp_in_place(&mut one);
        assert_eq!(one[0], 1.0);
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
}
