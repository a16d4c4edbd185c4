//! Integer matmul over the 32-weight GGUF block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), with
//! the weights repacked at load into tiles of 8 interleaved rows (llama.cpp's "repack" idea).
//!
//! Why tiles: one output per row and block means one FMA per block into one accumulator, and
//! with a row at a time that FMA chain (4 cycles a link) was the bound: `glassbox bench
//! kernels` showed our row-at-a-time Q8_0 at 0.3-0.6 ms for a 5632x2048 matrix against 0.1 ms
//! for candle's. With 8 rows interleaved, the 8 rows' integer sums of a block land in the 8
//! lanes of one register (a `hadd`), so one multiply and one FMA serve 8 rows, the scales of
//! 8 rows are one 16-byte load (`vcvtph2ps`), and each activation chunk is loaded once for 8
//! weight rows.
//!
//! The arithmetic, identical on every path (a test checks the AVX2 path bitwise against the
//! scalar one), batch invariant by construction: activations are quantized per block of 32
//! (`d = max|x| / 127` rounded to f16, `q = round(x / d)` to nearest even, `s = d * Σq`); for
//! output `j` of input row `x` the accumulator starts at 0 and, block by block,
//! `acc = fma(d_w * d_x, Σ w·q_x, acc)` with the integer sum exact (`w` the stored value minus
//! Q4_0's 8 or Q5_0's 16), then for Q4_1/Q5_1 `acc = fma(m_w, s_x, acc)`. Nothing depends on
//! how many rows share the call or how tiles are split across threads.

use crate::qkernels::QFormat;
use half::f16;

/// Weight rows per tile.
pub const TILE: usize = 8;
const QK: usize = 32;
/// Lane `l` of a tile's accumulator holds row `LANE_ROW[l]` (the order `_mm256_hadd_epi32`
/// leaves rows 0-3 and 4-7 in). It is its own inverse.
pub(crate) const LANE_ROW: [usize; TILE] = [0, 1, 4, 5, 2, 3, 6, 7];
/// Input rows computed together against one tile (each row's arithmetic is the same as
/// alone; grouping only saves unpacking the weights): 8 with AVX-512 VNNI (32 registers;
/// `glassbox bench kernels` at 5632 x 2048, 32 rows, medians of 6 alternated runs: Q4_0
/// 1.70 -> 1.60 ms, Q4_1 1.58 -> 1.45, Q5_0 2.38 -> 1.98, Q8_0 1.81 -> 1.62), 4 with AVX2 (16
/// registers: 8 spill).
const GROUP: usize = 8;
/// Activations quantized per piece of at least this many values on the pool (a decode step's
/// row stays on the caller).
pub(crate) const QUANTIZE_PIECE: usize = 16 * 1024;
const GROUP_AVX2: usize = 4;

/// A `[n, k]` weight matrix in tiles of 8 rows. Per tile and block: 8 f16 scales (and Q4_1/Q5_1
/// mins) in lane order; Q5_x's fifth bits as 8 words; the value bytes as 32-byte registers,
/// register `2c + h` holding bytes `8c..8c+8` of rows `4h..4h+4` (Q8_0: the values; 4/5-bit:
/// the nibble pairs, value `8c + i` low and `8c + 16 + i` high). Rows past `n` are zero.
#[derive(Debug)]
pub struct Tiles {
    format: QFormat,
    n: usize,
    k: usize,
    d: Vec<u16>,
    m: Vec<u16>,
    /// Word `2C + h` of a tile block: byte `r` is bits `8C..8C+8` of row `4h + r`'s fifth bits.
    h: Vec<u32>,
    q: Vec<u8>,
}

/// Input rows quantized to 8 bits per block of 32: values, scales, and per block `Σq` and
/// `d·Σq`.
pub struct QRows {
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<i32>,
    s: Vec<f32>,
}

impl QRows {
    pub fn quantize(x: &[f32], k: usize) -> QRows {
        let blocks = x.len() / QK;
        let mut r = QRows { k, q: Vec::with_capacity(x.len()), d: Vec::with_capacity(blocks), sum: Vec::with_capacity(blocks), s: Vec::with_capacity(blocks) };
        for b in x.chunks_exact(QK) {
            let scale = max_abs(b) / 127.0;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            let d = f16::from_f32(scale).to_f32();
            let start = r.q.len();
            r.q.resize(start + QK, 0);
            let sum = quantize_values(b, inv, &mut r.q[start..]);
            r.d.push(d);
            r.sum.push(sum);
            r.s.push(d * sum as f32);
        }
        r
    }

    fn row(&self, i: usize) -> XRow<'_> {
        let nb = self.k / QK;
        XRow { q: &self.q[i * self.k..(i + 1) * self.k], d: &self.d[i * nb..(i + 1) * nb], sum: &self.sum[i * nb..(i + 1) * nb], s: &self.s[i * nb..(i + 1) * nb] }
    }
}

#[derive(Clone, Copy)]
struct XRow<'a> {
    q: &'a [i8],
    d: &'a [f32],
    sum: &'a [i32],
    s: &'a [f32],
}

impl Tiles {
    /// From GGUF bytes of a 32-weight format (`n` rows of `k / 32` blocks); `None` for other
    /// formats or bytes that do not fit.
    pub fn new(format: QFormat, data: &[u8], n: usize, k: usize) -> Option<Tiles> {
        if let QFormat::K(_) = format {
            return None;
        }
        // f16 scale, then (Q4_1/Q5_1) f16 min, (Q5_x) 32 fifth bits, and the values last.
        let (bb, vb) = (format.block_bytes(), format.packed());
        let val_at = bb - vb;
        if !k.is_multiple_of(QK) || data.len() != n * (k / QK) * bb {
            return None;
        }
        let (nb, tiles) = (k / QK, n.div_ceil(TILE));
        let mins = matches!(format, QFormat::Q4_1 | QFormat::Q5_1);
        let highs = matches!(format, QFormat::Q5_0 | QFormat::Q5_1);
        let mut t = Tiles {
            format,
            n,
            k,
            d: vec![0; tiles * nb * TILE],
            m: if mins { vec![0; tiles * nb * TILE] } else { vec![] },
            h: if highs { vec![0; tiles * nb * TILE] } else { vec![] },
            q: vec![0; tiles * nb * TILE * vb],
        };
        let half = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        for (j, row) in data.chunks_exact(nb * bb).enumerate() {
            let (tile, r) = (j / TILE, j % TILE);
            let lane = LANE_ROW[r];
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let tb = tile * nb + b;
                t.d[tb * TILE + lane] = half(blk, 0);
                if mins {
                    t.m[tb * TILE + lane] = half(blk, 2);
                }
                if highs {
                    let word = u32::from_le_bytes([blk[val_at - 4], blk[val_at - 3], blk[val_at - 2], blk[val_at - 1]]);
                    for c in 0..4 {
                        t.h[tb * TILE + high_word(c, r)] |= ((word >> (8 * c)) & 0xFF) << (8 * (r % 4));
                    }
                }
                let vals = &blk[val_at..];
                for c in 0..vb / 8 {
                    let at = tb * TILE * vb + register_byte(c, r, 0);
                    t.q[at..at + 8].copy_from_slice(&vals[8 * c..8 * c + 8]);
                }
            }
        }
        Some(t)
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// The matrices' rows one after another, when each but the last fills its tiles.
    pub fn concat(parts: &[&Tiles]) -> Option<Tiles> {
        let first = parts.first()?;
        if !concatenable(parts.iter().map(|p| (p.format, p.k, p.n))) {
            return None;
        }
        Some(Tiles {
            format: first.format,
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            d: parts.iter().flat_map(|p| p.d.iter().copied()).collect(),
            m: parts.iter().flat_map(|p| p.m.iter().copied()).collect(),
            h: parts.iter().flat_map(|p| p.h.iter().copied()).collect(),
            q: parts.iter().flat_map(|p| p.q.iter().copied()).collect(),
        })
    }

    /// Value `v` (0..32) of row `r` of `tile`, block `b`, as stored (before any offset).
    fn raw(&self, tile: usize, r: usize, b: usize, v: usize) -> i32 {
        let nb = self.k / QK;
        let tb = tile * nb + b;
        let vb = self.format.packed();
        let byte = |c: usize, i: usize| self.q[tb * TILE * vb + register_byte(c, r, i)];
        if self.format == QFormat::Q8_0 {
            return byte(v / 8, v % 8) as i8 as i32;
        }
        let pair = byte((v % 16) / 8, v % 8);
        let nib = if v < 16 { pair & 0x0F } else { pair >> 4 } as i32;
        let high = if self.h.is_empty() { 0 } else { ((self.h[tb * TILE + high_word(v / 8, r)] >> (8 * (r % 4) + v % 8)) & 1) as i32 };
        nib | (high << 4)
    }

    fn offset(&self) -> i32 {
        self.format.offset().unwrap_or(0)
    }

    fn scale(v: &[u16], tile: usize, nb: usize, b: usize, r: usize) -> f32 {
        f16::from_bits(v[(tile * nb + b) * TILE + LANE_ROW[r]]).to_f32()
    }

    /// Row `j` in f32, exactly as candle's dequantization computes it (`(q - 8) * d`,
    /// `q * d + m`, ...).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let (tile, r, nb) = (j / TILE, j % TILE, self.k / QK);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let d = Self::scale(&self.d, tile, nb, b, r);
            for (v, y) in o.iter_mut().enumerate() {
                let q = self.raw(tile, r, b, v);
                *y = if self.m.is_empty() { ((q - self.offset()) as f32) * d } else { (q as f32) * d + Self::scale(&self.m, tile, nb, b, r) };
            }
        }
    }

    /// `y[m, n] = x[m, k] · wᵀ`, tiles split across threads.
    pub fn matmul_bt(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k);
        // Quantized in pieces of rows across the pool when there are many (each block alone,
        // so the same bytes).
        let pieces = crate::pool::map_rows(x, self.k, QUANTIZE_PIECE, |x| QRows::quantize(x, self.k));
        let rows: Vec<XRow> = pieces.iter().flat_map(|p| (0..p.q.len() / self.k).map(|i| p.row(i))).collect();
        #[cfg(target_arch = "x86_64")]
        {
            if crate::kernels::has_vnni() {
                return tiled_matmul(m, self.n, |tile, r| self.tile_group::<GROUP>(tile, &rows[r]));
            }
        }
        tiled_matmul(m, self.n, |tile, r| self.tile_group::<GROUP_AVX2>(tile, &rows[r]))
    }

    /// Rows `rows` of `x` (at most `G`) against one tile: per row, the tile's 8 outputs.
    fn tile_group<const G: usize>(&self, tile: usize, rows: &[XRow]) -> [[f32; TILE]; G] {
        debug_assert!(rows.len() <= G);
        #[cfg(target_arch = "x86_64")]
        {
            if simd() {
                // SAFETY: AVX2, FMA and F16C are present (checked); the rows are k long and the
                // tile holds k / 32 blocks.
                return unsafe { avx2::group::<G>(self, tile, rows) };
            }
        }
        let mut out = [[0f32; TILE]; G];
        for (o, i) in out.iter_mut().zip(rows) {
            *o = self.tile_portable(tile, *i);
        }
        out
    }

    /// The reference arithmetic (module docs), one row against one tile, rows in order.
    fn tile_portable(&self, tile: usize, x: XRow) -> [f32; TILE] {
        let nb = self.k / QK;
        let mut out = [0f32; TILE];
        for (r, o) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for b in 0..nb {
                let sum: i32 = (0..QK).map(|v| (self.raw(tile, r, b, v) - self.offset()) * x.q[b * QK + v] as i32).sum();
                acc = (Self::scale(&self.d, tile, nb, b, r) * x.d[b]).mul_add(sum as f32, acc);
                if !self.m.is_empty() {
                    acc = Self::scale(&self.m, tile, nb, b, r).mul_add(x.s[b], acc);
                }
            }
            *o = acc;
        }
        out
    }
}

/// Whether matrices (format, `k`, `n` each) can be stacked row-wise as tiles: one format and
/// width, and every part but the last filling its tiles.
pub(crate) fn concatenable<F: PartialEq>(parts: impl Iterator<Item = (F, usize, usize)>) -> bool {
    let parts: Vec<_> = parts.collect();
    let Some((f0, k0, _)) = parts.first() else { return false };
    parts.iter().all(|(f, k, _)| f == f0 && k == k0) && parts.iter().rev().skip(1).all(|(_, _, n)| n.is_multiple_of(TILE))
}

/// `y[m, n]` from `group(tile, rows)`, which gives up to `G` input rows' outputs against one
/// tile: tiles in blocks of 8 (64 columns) across the compute pool.
pub(crate) fn tiled_matmul<const G: usize>(m: usize, n: usize, group: impl Fn(usize, std::ops::Range<usize>) -> [[f32; TILE]; G] + Sync) -> Vec<f32> {
    crate::pool::by_column_blocks(m, n, 8 * TILE, |c0, c1, out| {
        for tile in c0 / TILE..c1.div_ceil(TILE) {
            for g in (0..m).step_by(G) {
                let vals = group(tile, g..(g + G).min(m));
                for (i, row) in vals.iter().enumerate().take((m - g).min(G)) {
                    for (r, v) in row.iter().enumerate() {
                        let j = tile * TILE + r;
                        if j < c1 {
                            out.set(g + i, j, *v);
                        }
                    }
                }
            }
        }
    })
}

/// `max |x|` (exact whatever the order).
pub(crate) fn max_abs(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if simd() {
            // SAFETY: AVX is present (checked).
            return unsafe { avx2::max_abs(x) };
        }
    }
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// `q = round(x · inv)` (ties to even) into `out`, returning `Σq`. `|x · inv| <= 127.5` is
/// the caller's promise (`inv = 127 / max|x|`).
pub(crate) fn quantize_values(x: &[f32], inv: f32, out: &mut [i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if simd() && x.len().is_multiple_of(8) {
            // SAFETY: AVX2 is present (checked); `out` is as long as `x`.
            return unsafe { avx2::quantize_values(x, inv, out) };
        }
    }
    let mut sum = 0;
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v * inv).round_ties_even() as i8;
        sum += *o as i32;
    }
    sum
}

/// Where byte `i` of chunk `c` (bytes `8c..8c+8` of a row's block) of tile row `r` lies in a
/// tile block's value registers: register `2c + r / 4`, row slot `r % 4`. The one layout of
/// `Tiles` and `KTiles` (whose 4-bit blocks are these blocks).
pub(crate) fn register_byte(c: usize, r: usize, i: usize) -> usize {
    (2 * c + r / 4) * 32 + (r % 4) * 8 + i
}

/// The fifth-bit word that holds byte `c` (values `8c..8c+8`) of tile row `r`'s fifth bits, at
/// byte `r % 4` of it (the register `2c + r / 4` those values sit in).
pub(crate) fn high_word(c: usize, r: usize) -> usize {
    2 * c + r / 4
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn simd() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| crate::kernels::has_avx2() && is_x86_feature_detected!("f16c"))
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{Tiles, LANE_ROW, QK, TILE};
    use crate::qkernels::QFormat;
    use std::arch::x86_64::*;

    /// Monomorphized per format and group size; AVX-512 VNNI's `vpdpbusd` where the CPU
    /// has it (the same exact integer sums, so the same results bitwise).
    pub(super) unsafe fn group<const G: usize>(t: &Tiles, tile: usize, rows: &[super::XRow]) -> [[f32; TILE]; G] {
        group_with::<G>(t, tile, rows, crate::kernels::has_vnni())
    }

    /// `group` on the given instruction set (`vnni` only where the CPU has it).
    pub(super) unsafe fn group_with<const G: usize>(t: &Tiles, tile: usize, rows: &[super::XRow], vnni: bool) -> [[f32; TILE]; G] {
        macro_rules! by_rows {
            ($kernel:ident, $nib:expr, $high:expr, $mins:expr) => {
                match rows.len().min(G) {
                    8 => $kernel::<8, G, $nib, $high, $mins>(t, tile, rows),
                    7 => $kernel::<7, G, $nib, $high, $mins>(t, tile, rows),
                    6 => $kernel::<6, G, $nib, $high, $mins>(t, tile, rows),
                    5 => $kernel::<5, G, $nib, $high, $mins>(t, tile, rows),
                    4 => $kernel::<4, G, $nib, $high, $mins>(t, tile, rows),
                    3 => $kernel::<3, G, $nib, $high, $mins>(t, tile, rows),
                    2 => $kernel::<2, G, $nib, $high, $mins>(t, tile, rows),
                    _ => $kernel::<1, G, $nib, $high, $mins>(t, tile, rows),
                }
            };
        }
        macro_rules! by_format {
            ($kernel:ident) => {
                match t.format {
                    QFormat::Q8_0 => by_rows!($kernel, false, false, false),
                    QFormat::Q4_0 => by_rows!($kernel, true, false, false),
                    QFormat::Q4_1 => by_rows!($kernel, true, false, true),
                    QFormat::Q5_0 => by_rows!($kernel, true, true, false),
                    _ => by_rows!($kernel, true, true, true),
                }
            };
        }
        if vnni {
            by_format!(tile_rows_vnni)
        } else {
            by_format!(tile_rows_avx2)
        }
    }

    /// Σ over the four chunks of unsigned weight bytes times signed activation bytes, as two
    /// exact i32 lanes per row: AVX2's pair sums in i16 (4 · 2 · 31 · 127 < 2^15), widened once.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn quad_avx2(w: [__m256i; 4], x: [__m256i; 4]) -> __m256i {
        let p = |c: usize| _mm256_maddubs_epi16(w[c], x[c]);
        _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(p(0), p(1)), _mm256_add_epi16(p(2), p(3))), _mm256_set1_epi16(1))
    }

    /// The same sums with AVX-512 VNNI (`vpdpbusd`: four byte products into each i32).
    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    pub(crate) unsafe fn quad_vnni(w: [__m256i; 4], x: [__m256i; 4]) -> __m256i {
        let mut s = _mm256_setzero_si256();
        for c in 0..4 {
            s = _mm256_dpbusd_epi32(s, w[c], x[c]);
        }
        s
    }

    /// Q8_0's signed weights on AVX2: |w| times x with w's sign, widened per chunk (a pair sum
    /// can reach 2 · 128 · 127, too much to add four in i16).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn signed_quad_avx2(w: [__m256i; 4], x: [__m256i; 4]) -> (__m256i, i32) {
        let mut s = _mm256_setzero_si256();
        for c in 0..4 {
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w[c], w[c]), _mm256_sign_epi8(x[c], w[c]));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
        }
        (s, 0)
    }

    /// Q8_0's signed weights on VNNI: `w + 128` is unsigned (an XOR), and `Σ (w + 128) x`
    /// exceeds the wanted sum by `128 Σx` (returned as the offset to subtract).
    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    unsafe fn signed_quad_vnni(w: [__m256i; 4], x: [__m256i; 4]) -> (__m256i, i32) {
        let flip = _mm256_set1_epi8(-128);
        (quad_vnni(std::array::from_fn(|c| _mm256_xor_si256(w[c], flip)), x), 128)
    }

    /// Fifth bits for register `2C + h`: byte `8r + i` is 0x10 when bit `i` of byte `r` of the
    /// word is set (spread the word's bytes, OR with every bit but bit `i`, compare).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn highs(word: u32) -> __m256i {
        let spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
        let bits = _mm256_shuffle_epi8(_mm256_set1_epi32(word as i32), spread);
        let set = _mm256_cmpeq_epi8(_mm256_or_si256(bits, others), _mm256_set1_epi8(-1));
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// A tile block's fifth bits (8 words at `words`, `super::high_word`'s layout) set as
    /// 0x10 into its value registers.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn add_highs(w: &mut [[__m256i; 2]; 4], words: *const u32) {
        for (c, wc) in w.iter_mut().enumerate() {
            for (h, wh) in wc.iter_mut().enumerate() {
                *wh = _mm256_or_si256(*wh, highs(std::ptr::read_unaligned(words.add(super::high_word(c, 4 * h)))));
            }
        }
    }

    /// A 4-bit tile block's 128 bytes as `[C][h]` registers of byte values (`C`: values
    /// `8C..8C+8`, `h`: rows `4h..4h+4`).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn nibbles(qp: *const u8) -> [[__m256i; 2]; 4] {
        let low = _mm256_set1_epi8(0x0F);
        let mut w = [[_mm256_setzero_si256(); 2]; 4];
        for reg in 0..4 {
            // Register `2c + h` holds values `8c..` (low nibbles) and `8c + 16..` (high).
            let (c, h) = (reg / 2, reg % 2);
            let p = _mm256_loadu_si256(qp.add(reg * 32) as *const __m256i);
            w[c][h] = _mm256_and_si256(p, low);
            w[c + 2][h] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
        }
        w
    }

    /// One kernel body, compiled once per instruction set (`$quad`: unsigned weights;
    /// `$signed`: Q8_0's signed ones, with the offset its sums carry).
    macro_rules! tile_kernel {
        ($name:ident, $features:literal, $quad:ident, $signed:ident) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<const R: usize, const G: usize, const NIB: bool, const HIGH: bool, const MINS: bool>(t: &Tiles, tile: usize, rows: &[super::XRow]) -> [[f32; TILE]; G] {
                let nb = t.k / QK;
                let vb = if NIB { QK / 2 } else { QK };
                let offset = t.offset();
                let mut acc = [_mm256_setzero_ps(); R];
                let xs: [super::XRow; R] = std::array::from_fn(|i| rows[i]);
                for b in 0..nb {
                    let tb = tile * nb + b;
                    // The tile's 32 values per row as 8 registers: w[C][h] holds values
                    // 8C..8C+8 of rows 4h..4h+4.
                    let qp = t.q.as_ptr().add(tb * TILE * vb);
                    prefetch_ahead(qp, TILE * vb);
                    let mut w = [[_mm256_setzero_si256(); 2]; 4];
                    if NIB {
                        w = nibbles(qp);
                        if HIGH {
                            add_highs(&mut w, t.h.as_ptr().add(tb * TILE));
                        }
                    } else {
                        for (c, wc) in w.iter_mut().enumerate() {
                            for (h, wh) in wc.iter_mut().enumerate() {
                                *wh = _mm256_loadu_si256(qp.add((2 * c + h) * 32) as *const __m256i);
                            }
                        }
                    }
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(tb * TILE) as *const __m128i));
                    let mw = if MINS { _mm256_cvtph_ps(_mm_loadu_si128(t.m.as_ptr().add(tb * TILE) as *const __m128i)) } else { dw };
                    for r in 0..R {
                        let xr = &xs[r];
                        let xp = xr.q.as_ptr().add(b * QK) as *const i64;
                        let xc: [__m256i; 4] = std::array::from_fn(|c| _mm256_set1_epi64x(std::ptr::read_unaligned(xp.add(c))));
                        let mut half = [_mm256_setzero_si256(); 2];
                        let mut extra = 0;
                        for (h, s) in half.iter_mut().enumerate() {
                            let wh = [w[0][h], w[1][h], w[2][h], w[3][h]];
                            if NIB {
                                *s = $quad(wh, xc);
                            } else {
                                (*s, extra) = $signed(wh, xc);
                            }
                        }
                        // Rows 0-3 hold two partial sums each in `half[0]`, rows 4-7 in
                        // `half[1]`: one hadd gives each row's total, lanes in `LANE_ROW` order.
                        let mut sum = _mm256_hadd_epi32(half[0], half[1]);
                        if offset + extra != 0 {
                            sum = _mm256_sub_epi32(sum, _mm256_set1_epi32((offset + extra) * *xr.sum.get_unchecked(b)));
                        }
                        let d = _mm256_mul_ps(dw, _mm256_set1_ps(*xr.d.get_unchecked(b)));
                        acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), acc[r]);
                        if MINS {
                            acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xr.s.get_unchecked(b)), acc[r]);
                        }
                    }
                }
                lanes_to_rows(acc)
            }
        };
    }

    tile_kernel!(tile_rows_avx2, "avx2,fma,f16c", quad_avx2, signed_quad_avx2);
    tile_kernel!(tile_rows_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", quad_vnni, signed_quad_vnni);

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn max_abs(x: &[f32]) -> f32 {
        let mut m = _mm256_setzero_ps();
        let chunks = x.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.0), _mm256_loadu_ps(c.as_ptr())));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes.iter().chain(tail).fold(0f32, |a, v| a.max(v.abs()))
    }

    /// `quantize_values` 8 at a time: multiply, round to nearest even, narrow (exact: the
    /// values fit i8), and the integer sum.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_values(x: &[f32], inv: f32, out: &mut [i8]) -> i32 {
        let vinv = _mm256_set1_ps(inv);
        let mut sum = _mm256_setzero_si256();
        for (c, o) in x.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
            let q = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            sum = _mm256_add_epi32(sum, q);
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, q);
            for (d, v) in o.iter_mut().zip(lanes) {
                *d = v as i8;
            }
        }
        let mut lanes = [0i32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, sum);
        lanes.iter().sum()
    }

    /// How far ahead of the kernel the weight stream is requested.
    pub(crate) const PREFETCH_BYTES: usize = 2048;

    /// Ask for the `len` bytes `PREFETCH_BYTES` past `p` (past the end of the weights is
    /// harmless: nothing is read).
    #[inline]
    pub(crate) fn prefetch_ahead(p: *const u8, len: usize) {
        crate::kernels::prefetch(p.wrapping_add(PREFETCH_BYTES), len);
    }

    /// Per input row, the 8 lanes of its accumulator back in row order.
    #[inline]
    #[target_feature(enable = "avx")]
    pub(crate) unsafe fn lanes_to_rows<const R: usize, const G: usize>(acc: [__m256; R]) -> [[f32; TILE]; G] {
        let mut out = [[0f32; TILE]; G];
        for r in 0..R {
            let mut lanes = [0f32; TILE];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]);
            for (l, v) in lanes.iter().enumerate() {
                out[r][LANE_ROW[l]] = *v;
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use crate::qkernels::tests::random_x;

    /// What every SIMD path this CPU has computes: AVX2, and AVX-512 VNNI where present.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn simd_paths<T>(f: impl Fn(bool) -> T) -> Vec<T> {
        let mut out = vec![];
        if simd() {
            out.push(f(false));
        }
        if crate::kernels::has_vnni() {
            out.push(f(true));
        }
        out
    }

    const FORMATS: [(QFormat, GgmlDType); 5] =
        [(QFormat::Q8_0, GgmlDType::Q8_0), (QFormat::Q4_0, GgmlDType::Q4_0), (QFormat::Q4_1, GgmlDType::Q4_1), (QFormat::Q5_0, GgmlDType::Q5_0), (QFormat::Q5_1, GgmlDType::Q5_1)];

    /// `n` random rows of `k` in `dtype` through candle's quantizer: our tiles and candle's
    /// dequantized weights.
    fn matrix(format: QFormat, dtype: GgmlDType, n: usize, k: usize, seed: u64) -> (Tiles, Vec<f32>) {
        let q = QTensor::quantize(&Tensor::from_vec(random_x(n, k, seed), (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        (Tiles::new(format, &q.data().unwrap(), n, k).unwrap(), dense)
    }

    /// Per format (n not a multiple of the tile): rows read back as candle dequantizes them;
    /// every SIMD group size bitwise the scalar reference; a batch bitwise its rows alone; and
    /// the product within 1% of the f32 one over the dequantized weights.
    /// Activations quantized in pieces of rows on the pool are the whole matrix's bytes, and
    /// a large batch's products are its rows' alone, bitwise.
    #[test]
    fn quantized_in_pieces_is_quantized_whole() {
        let (m, k, n) = (300, 256, 16);
        let x = random_x(m, k, 9);
        let whole = QRows::quantize(&x, k);
        let pieces = crate::pool::map_rows(&x, k, QUANTIZE_PIECE, |x| QRows::quantize(x, k));
        assert!(pieces.len() > 1);
        let cat = |f: &dyn Fn(&QRows) -> Vec<u32>| pieces.iter().flat_map(f).collect::<Vec<_>>();
        assert_eq!(cat(&|p| p.q.iter().map(|&v| v as u32).collect()), whole.q.iter().map(|&v| v as u32).collect::<Vec<_>>());
        assert_eq!(cat(&|p| p.d.iter().map(|v| v.to_bits()).collect()), whole.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert_eq!(cat(&|p| p.sum.iter().map(|&v| v as u32).collect()), whole.sum.iter().map(|&v| v as u32).collect::<Vec<_>>());
        assert_eq!(cat(&|p| p.s.iter().map(|v| v.to_bits()).collect()), whole.s.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        let (t, _) = matrix(QFormat::Q4_0, GgmlDType::Q4_0, n, k, 3);
        let all = t.matmul_bt(&x, m);
        for i in [0, 150, 299] {
            let one = t.matmul_bt(&x[i * k..(i + 1) * k], 1);
            assert!(one.iter().zip(&all[i * n..(i + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits()), "row {i}");
        }
    }

    #[test]
    fn tiles_are_exact_invariant_and_close() {
        // k = 96: an odd number of blocks.
        for ((n, k, m), (format, dtype)) in [(19, 256, 6), (11, 96, 5)].into_iter().flat_map(|s| FORMATS.map(|f| (s, f))) {
            let (t, dense) = matrix(format, dtype, n, k, 3);
            let mut row = vec![0f32; k];
            for j in 0..n {
                t.dequantize_row(j, &mut row);
                assert!(row.iter().zip(&dense[j * k..(j + 1) * k]).all(|(a, b)| a.to_bits() == b.to_bits()), "{format:?}: row {j}");
            }
            let x = random_x(m, k, 4);
            let xq = QRows::quantize(&x, k);
            let rows: Vec<XRow> = (0..m).map(|i| xq.row(i)).collect();
            #[cfg(target_arch = "x86_64")]
            let simd = |tile: usize, rows: &[XRow], vnni: bool| unsafe { avx2::group_with::<GROUP>(&t, tile, rows, vnni) }.to_vec();
            #[cfg(not(target_arch = "x86_64"))]
            let simd = |_: usize, _: &[XRow], _: bool| vec![];
            check_tiled(&format!("{format:?}"), (n, k, GROUP), (&x, &dense), &rows, simd, |tile, row| t.tile_portable(tile, row), |x, m| t.matmul_bt(x, m));
        }
    }

    /// What every tiled format must do (`tiles`, `ktiles`), for `x` (`m` rows of `k`) against
    /// `n` weight rows (`dense` their dequantized values): every SIMD path (`simd(tile, rows,
    /// vnni)`) bitwise the scalar reference (`portable(tile, row)`) for every run of up to
    /// `group` rows; a batch bitwise its rows alone; within 1% of the f32 product.
    pub(crate) fn check_tiled<R: Copy>(
        label: &str,
        (n, k, group): (usize, usize, usize),
        (x, dense): (&[f32], &[f32]),
        rows: &[R],
        simd: impl Fn(usize, &[R], bool) -> Vec<[f32; TILE]>,
        portable: impl Fn(usize, R) -> [f32; TILE],
        matmul: impl Fn(&[f32], usize) -> Vec<f32>,
    ) {
        let m = rows.len();
        for tile in 0..n.div_ceil(TILE) {
            for start in 0..m {
                for len in 1..=group.min(m - start) {
                    #[cfg(target_arch = "x86_64")]
                    for got in simd_paths(|vnni| simd(tile, &rows[start..start + len], vnni)) {
                        for (i, got) in got.iter().enumerate().take(len) {
                            let want = portable(tile, rows[start + i]);
                            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{label}: tile {tile}, rows {start}+{len}: {got:?} vs {want:?}");
                        }
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (&simd, &portable);
        crate::qkernels::tests::check_product(label, (n, k), x, dense, matmul, false);
    }

    /// Extreme values: Q8_0's -128 and a full-scale activation block still sum exactly.
    #[test]
    fn extremes_sum_exactly() {
        let (n, k) = (8, 64);
        let mut data = vec![];
        for j in 0..n * k / QK {
            data.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
            data.extend((0..QK).map(|t| if (t + j) % 2 == 0 { 0x80u8 } else { 0x7F }));
        }
        let t = Tiles::new(QFormat::Q8_0, &data, n, k).unwrap();
        let x: Vec<f32> = (0..k).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        let xq = QRows::quantize(&x, k);
        #[cfg(target_arch = "x86_64")]
        for got in simd_paths(|vnni| unsafe { avx2::group_with::<GROUP>(&t, 0, &[xq.row(0)], vnni) }) {
            assert_eq!(got[0], t.tile_portable(0, xq.row(0)));
        }
    }

    /// The activations' quantization: SIMD equal to the scalar loop, ties to even.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn quantization_simd_is_scalar() {
        if !simd() {
            return;
        }
        let mut x = random_x(1, 256, 9);
        x[3] = 2.5 / 127.0 * 2.0; // a tie once scaled
        let inv = 127.0 / x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (mut a, mut b) = (vec![0i8; 256], vec![0i8; 256]);
        let sum = unsafe { avx2::quantize_values(&x, inv, &mut a) };
        let mut want = 0;
        for (o, v) in b.iter_mut().zip(&x) {
            *o = (v * inv).round_ties_even() as i8;
            want += *o as i32;
        }
        assert_eq!((a, sum), (b, want));
        assert_eq!(unsafe { avx2::max_abs(&x[..37]) }, x[..37].iter().fold(0f32, |m, v| m.max(v.abs())));
    }

    #[test]
    fn concat_keeps_every_row() {
        let (a, da) = matrix(QFormat::Q4_1, GgmlDType::Q4_1, 16, 64, 1);
        let (b, db) = matrix(QFormat::Q4_1, GgmlDType::Q4_1, 5, 64, 2);
        let c = Tiles::concat(&[&a, &b]).unwrap();
        let mut row = vec![0f32; 64];
        for (j, want) in da.chunks(64).chain(db.chunks(64)).enumerate() {
            c.dequantize_row(j, &mut row);
            assert_eq!(row, want, "row {j}");
        }
        assert!(Tiles::concat(&[&b, &a]).is_none(), "a part that does not fill its tiles can only come last");
    }
}
