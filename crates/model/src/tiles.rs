//! Integer matmul over the 32-weight GGUF block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), with
//! the weights repacked at load into tiles of 16 interleaved rows (llama.cpp's "repack" idea).
//!
//! Why tiles: one output per row and block means one FMA per block into one accumulator, and
//! with a row at a time that FMA chain was the bound. In a tile, lane `r` of a value register
//! holds four consecutive values of row `r`, so one `vpdpbusd` (AVX-512 VNNI) adds four
//! products into each of 16 rows' integer sums, with the activations' four bytes broadcast
//! from memory: a block is 8 of them per input row, then one convert, multiply and FMA for 16
//! outputs; the scales of 16 rows are one 32-byte load (`vcvtph2ps`), and the weights are
//! unpacked once for a group of input rows. (The earlier 8-row tiles, two rows' partial sums
//! per register and a `hadd` per row and block, ran 1.5x slower at 32 rows: `glassbox bench
//! kernels`, PERFORMANCE.md.) AVX2 runs the same layout as two 8-row halves (`maddubs`,
//! `madd`).
//!
//! The arithmetic, identical on every path (a test checks each SIMD path bitwise against the
//! scalar one), batch invariant by construction: activations are quantized per block of 32
//! (`d = max|x| / 127` rounded to f16, `q = round(x / d)` to nearest even, `s = d * Σq`); for
//! output `j` of input row `x` the accumulator starts at 0 and, block by block,
//! `acc = fma(d_w * d_x, Σ w·q_x, acc)` with the integer sum exact (`w` the stored value minus
//! Q4_0's 8 or Q5_0's 16), then for Q4_1/Q5_1 `acc = fma(m_w, s_x, acc)`. Nothing depends on
//! how many rows share the call or how tiles are split across threads.

use crate::qkernels::QFormat;
use half::f16;

/// Weight rows per tile.
pub const TILE: usize = 16;
const QK: usize = 32;
/// Input rows computed together against one tile (each row's arithmetic is the same as
/// alone; grouping only saves unpacking the weights): 8 with AVX-512 (32 registers; 16 rows
/// measured no faster), 4 with AVX2 (16 registers).
const GROUP: usize = 8;
const GROUP_AVX2: usize = 4;
/// Activations quantized per piece of at least this many values on the pool (a decode step's
/// row stays on the caller).
pub(crate) const QUANTIZE_PIECE: usize = 16 * 1024;

/// A `[n, k]` weight matrix in tiles of 16 rows. Per tile and block: 16 f16 scales (and
/// Q4_1/Q5_1 mins), row `r` at `r`; Q5_x's fifth bits as 16 words (row `r`'s bit `v`: value
/// `v`); the value bytes in 64-byte registers, bytes `4c..4c+4` of row `r`'s block at
/// `64c + 4r` (`value_byte`; Q8_0: the values; 4/5-bit: the nibble pairs, value `i` low and
/// `16 + i` high). Rows past `n` are zero.
#[derive(Debug)]
pub struct Tiles {
    format: QFormat,
    n: usize,
    k: usize,
    d: Vec<u16>,
    m: Vec<u16>,
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
        let mut r = QRows::with_capacity(k, x.len() / k.max(1));
        for row in x.chunks_exact(k) {
            r.push(row);
        }
        r
    }

    /// Room for `rows` rows of `k` values.
    pub fn with_capacity(k: usize, rows: usize) -> QRows {
        let blocks = rows * (k / QK);
        QRows { k, q: Vec::with_capacity(rows * k), d: Vec::with_capacity(blocks), sum: Vec::with_capacity(blocks), s: Vec::with_capacity(blocks) }
    }

    /// Quantize one more row (`k` values).
    pub fn push(&mut self, x: &[f32]) {
        debug_assert_eq!(x.len(), self.k);
        for b in x.chunks_exact(QK) {
            let scale = max_abs(b) / 127.0;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            let d = f16::from_f32(scale).to_f32();
            let start = self.q.len();
            self.q.resize(start + QK, 0);
            let sum = quantize_values(b, inv, &mut self.q[start..]);
            self.d.push(d);
            self.sum.push(sum);
            self.s.push(d * sum as f32);
        }
    }

    /// `x` (`[m, k]`) quantized in pieces of rows across the pool when there are many (each
    /// block alone, so the same bytes as whole).
    pub fn quantize_pieces(x: &[f32], k: usize) -> Vec<QRows> {
        crate::pool::map_rows(x, k, QUANTIZE_PIECE, |x| QRows::quantize(x, k))
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
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let tb = tile * nb + b;
                t.d[tb * TILE + r] = half(blk, 0);
                if mins {
                    t.m[tb * TILE + r] = half(blk, 2);
                }
                if highs {
                    t.h[tb * TILE + r] = u32::from_le_bytes([blk[val_at - 4], blk[val_at - 3], blk[val_at - 2], blk[val_at - 1]]);
                }
                for (p, v) in blk[val_at..].iter().enumerate() {
                    t.q[tb * TILE * vb + value_byte(r, p)] = *v;
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
        if !concatenable(TILE, parts.iter().map(|p| (p.format, p.k, p.n))) {
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
        let tb = tile * (self.k / QK) + b;
        let vb = self.format.packed();
        let byte = |p: usize| self.q[tb * TILE * vb + value_byte(r, p)];
        if self.format == QFormat::Q8_0 {
            return byte(v) as i8 as i32;
        }
        let pair = byte(v % 16);
        let nib = if v < 16 { pair & 0x0F } else { pair >> 4 } as i32;
        let high = if self.h.is_empty() { 0 } else { ((self.h[tb * TILE + r] >> v) & 1) as i32 };
        nib | (high << 4)
    }

    fn offset(&self) -> i32 {
        self.format.offset().unwrap_or(0)
    }

    fn scale(v: &[u16], tile: usize, nb: usize, b: usize, r: usize) -> f32 {
        f16::from_bits(v[(tile * nb + b) * TILE + r]).to_f32()
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
        self.matmul_quantized(&QRows::quantize_pieces(x, self.k))
    }

    /// The product with input rows already quantized (pieces of rows, in order).
    pub fn matmul_quantized(&self, pieces: &[QRows]) -> Vec<f32> {
        assert!(pieces.iter().all(|p| p.k == self.k), "input rows of another width");
        let rows: Vec<XRow> = pieces.iter().flat_map(|p| (0..p.q.len() / self.k).map(|i| p.row(i))).collect();
        let m = rows.len();
        #[cfg(target_arch = "x86_64")]
        {
            if crate::kernels::has_vnni() {
                return tiled_matmul(m, self.n, |tile, r| self.tile_group::<GROUP>(tile, &rows[r]));
            }
        }
        tiled_matmul(m, self.n, |tile, r| self.tile_group::<GROUP_AVX2>(tile, &rows[r]))
    }

    /// Rows `rows` of `x` (at most `G`) against one tile: per row, the tile's 16 outputs.
    fn tile_group<const G: usize>(&self, tile: usize, rows: &[XRow]) -> [[f32; TILE]; G] {
        debug_assert!(rows.len() <= G);
        #[cfg(target_arch = "x86_64")]
        {
            if simd() {
                // SAFETY: AVX2, FMA and F16C (and AVX-512 for `vnni`) are present (checked);
                // the rows are k long and the tile holds k / 32 blocks.
                return unsafe { x86::group_with::<G>(self, tile, rows, crate::kernels::has_vnni()) };
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

/// Where byte `p` of tile row `r`'s block values lies among the tile block's value bytes: in
/// 64-byte register `p / 4`, at row slot `r` (four bytes a row).
pub(crate) fn value_byte(r: usize, p: usize) -> usize {
    (p / 4) * 4 * TILE + 4 * r + p % 4
}

/// Whether matrices (format, `k`, `n` each) can be stacked row-wise as tiles of `tile` rows:
/// one format and width, and every part but the last filling its tiles.
pub(crate) fn concatenable<F: PartialEq>(tile: usize, parts: impl Iterator<Item = (F, usize, usize)>) -> bool {
    let parts: Vec<_> = parts.collect();
    let Some((f0, k0, _)) = parts.first() else { return false };
    parts.iter().all(|(f, k, _)| f == f0 && k == k0) && parts.iter().rev().skip(1).all(|(_, _, n)| n.is_multiple_of(tile))
}

/// `y[m, n]` from `group(tile, rows)`, which gives up to `G` input rows' outputs against one
/// tile of `W` rows: tiles in blocks of 64 columns across the compute pool.
pub(crate) fn tiled_matmul<const W: usize, const G: usize>(m: usize, n: usize, group: impl Fn(usize, std::ops::Range<usize>) -> [[f32; W]; G] + Sync) -> Vec<f32> {
    const { assert!(64 % W == 0) };
    crate::pool::by_column_blocks(m, n, 64, |c0, c1, out| {
        for tile in c0 / W..c1.div_ceil(W) {
            for g in (0..m).step_by(G) {
                let vals = group(tile, g..(g + G).min(m));
                let j = tile * W;
                for (i, row) in vals.iter().enumerate().take((m - g).min(G)) {
                    out.set_run(g + i, j, &row[..W.min(c1 - j)]);
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
            return unsafe { x86::max_abs(x) };
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
            return unsafe { x86::quantize_values(x, inv, out) };
        }
    }
    let mut sum = 0;
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v * inv).round_ties_even() as i8;
        sum += *o as i32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn simd() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| crate::kernels::has_avx2() && is_x86_feature_detected!("f16c"))
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{Tiles, QK, TILE};
    use crate::qkernels::QFormat;
    use std::arch::x86_64::*;

    /// Rows against one tile on the given instruction set (`vnni`: AVX-512 with VNNI, only
    /// where the CPU has it; else AVX2), monomorphized per format and row count. The same
    /// exact integer sums either way, so the same results bitwise.
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
            by_format!(tile_vnni)
        } else {
            by_format!(tile_avx2)
        }
    }

    /// Per value `n` of four fifth bits, the four bytes they set: byte `i` 0x10 when bit `i`.
    const SPREAD: [i32; 16] = {
        let mut t = [0i32; 16];
        let mut n = 0;
        while n < 16 {
            let mut i = 0;
            while i < 4 {
                if n >> i & 1 == 1 {
                    t[n] |= 0x10 << (8 * i);
                }
                i += 1;
            }
            n += 1;
        }
        t
    };

    /// A tile block's value registers with AVX-512: `w[g]`'s lane `r` holds values
    /// `4g..4g+4` of row `r` as unsigned bytes (Q8_0's signed values plus 128, an XOR).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) unsafe fn values_512<const NIB: bool, const HIGH: bool>(qp: *const u8, hp: *const u32) -> [__m512i; 8] {
        let mut w = [_mm512_setzero_si512(); 8];
        if NIB {
            let low = _mm512_set1_epi8(0x0F);
            for c in 0..4 {
                let p = _mm512_loadu_si512(qp.add(64 * c) as *const _);
                w[c] = _mm512_and_si512(p, low);
                w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(p, 4), low);
            }
            if HIGH {
                // Bits 4g..4g+4 of each row's word, looked up (the low four bits of a lane
                // index `vpermd`'s 16 entries).
                let (words, spread) = (_mm512_loadu_si512(hp as *const _), _mm512_loadu_si512(SPREAD.as_ptr() as *const _));
                w[0] = _mm512_or_si512(w[0], _mm512_permutexvar_epi32(words, spread));
                for (g, wg) in w.iter_mut().enumerate().skip(1) {
                    *wg = _mm512_or_si512(*wg, _mm512_permutexvar_epi32(_mm512_srlv_epi32(words, _mm512_set1_epi32(4 * g as i32)), spread));
                }
            }
        } else {
            for (g, wg) in w.iter_mut().enumerate() {
                *wg = _mm512_xor_si512(_mm512_loadu_si512(qp.add(64 * g) as *const _), _mm512_set1_epi8(-128));
            }
        }
        w
    }

    /// AVX-512 VNNI: per input row and block, the integer sum starts at `-offset · Σq` (Q8_0's
    /// XOR adds 128 to every weight) and takes 8 `vpdpbusd` of the activations' four-byte
    /// groups broadcast; two chains for few rows (the latency of one would be the bound).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
    unsafe fn tile_vnni<const R: usize, const G: usize, const NIB: bool, const HIGH: bool, const MINS: bool>(t: &Tiles, tile: usize, rows: &[super::XRow]) -> [[f32; TILE]; G] {
        let nb = t.k / QK;
        let vb = if NIB { QK / 2 } else { QK };
        let offset = if NIB { t.offset() } else { 128 };
        let mut acc = [_mm512_setzero_ps(); R];
        let xs: [super::XRow; R] = std::array::from_fn(|i| rows[i]);
        for b in 0..nb {
            let tb = tile * nb + b;
            let qp = t.q.as_ptr().add(tb * TILE * vb);
            prefetch_ahead(qp, TILE * vb);
            let w = values_512::<NIB, HIGH>(qp, t.h.as_ptr().wrapping_add(tb * TILE));
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr().add(tb * TILE) as *const __m256i));
            let mw = if MINS { _mm512_cvtph_ps(_mm256_loadu_si256(t.m.as_ptr().add(tb * TILE) as *const __m256i)) } else { dw };
            for r in 0..R {
                let xr = &xs[r];
                let xp = xr.q.as_ptr().add(b * QK) as *const i32;
                let x = |g: usize| _mm512_set1_epi32(std::ptr::read_unaligned(xp.add(g)));
                let mut s = _mm512_set1_epi32(-offset * *xr.sum.get_unchecked(b));
                if R < 4 {
                    let mut s2 = _mm512_setzero_si512();
                    for g in 0..4 {
                        s = _mm512_dpbusd_epi32(s, w[g], x(g));
                        s2 = _mm512_dpbusd_epi32(s2, w[g + 4], x(g + 4));
                    }
                    s = _mm512_add_epi32(s, s2);
                } else {
                    for (g, wg) in w.iter().enumerate() {
                        s = _mm512_dpbusd_epi32(s, *wg, x(g));
                    }
                }
                let d = _mm512_mul_ps(dw, _mm512_set1_ps(*xr.d.get_unchecked(b)));
                acc[r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[r]);
                if MINS {
                    acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xr.s.get_unchecked(b)), acc[r]);
                }
            }
        }
        let mut out = [[0f32; TILE]; G];
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
        out
    }

    /// AVX2: the tile as two 8-row halves (a 64-byte register's low and high 32 bytes), one
    /// after the other (16 registers hold one half's values and four rows' accumulators; the
    /// second pass finds the tile in cache), with the pair sums of `maddubs` added in i16
    /// while exact (4-bit: eight groups, at most 8 · 2 · 15 · 127; 5-bit: four) and widened
    /// by `madd`; Q8_0's signed weights by the sign trick, widened per group.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2<const R: usize, const G: usize, const NIB: bool, const HIGH: bool, const MINS: bool>(t: &Tiles, tile: usize, rows: &[super::XRow]) -> [[f32; TILE]; G] {
        let nb = t.k / QK;
        let vb = if NIB { QK / 2 } else { QK };
        let offset = t.offset();
        let ones = _mm256_set1_epi16(1);
        let xs: [super::XRow; R] = std::array::from_fn(|i| rows[i]);
        let mut out = [[0f32; TILE]; G];
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let tb = tile * nb + b;
                let qp = t.q.as_ptr().add(tb * TILE * vb);
                if half == 0 {
                    prefetch_ahead(qp, TILE * vb);
                }
                let w = values_256::<NIB, HIGH>(qp.add(32 * half), t.h.as_ptr().wrapping_add(tb * TILE + 8 * half));
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(tb * TILE + 8 * half) as *const __m128i));
                for r in 0..R {
                    let xr = &xs[r];
                    let xp = xr.q.as_ptr().add(b * QK) as *const i32;
                    let x = |g: usize| _mm256_set1_epi32(std::ptr::read_unaligned(xp.add(g)));
                    let mut s = _mm256_set1_epi32(-offset * *xr.sum.get_unchecked(b));
                    if !NIB {
                        for (g, wg) in w.iter().enumerate() {
                            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(*wg, *wg), _mm256_sign_epi8(x(g), *wg));
                            s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                        }
                    } else {
                        let run = if HIGH { 4 } else { 8 };
                        for part in (0..8).step_by(run) {
                            let mut p = _mm256_maddubs_epi16(w[part], x(part));
                            for (g, wg) in w.iter().enumerate().skip(part + 1).take(run - 1) {
                                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(*wg, x(g)));
                            }
                            s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                        }
                    }
                    let d = _mm256_mul_ps(dw, _mm256_set1_ps(*xr.d.get_unchecked(b)));
                    acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[r]);
                    if MINS {
                        let mw = _mm256_cvtph_ps(_mm_loadu_si128(t.m.as_ptr().add(tb * TILE + 8 * half) as *const __m128i));
                        acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xr.s.get_unchecked(b)), acc[r]);
                    }
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * half), acc[r]);
            }
        }
        out
    }

    /// One 8-row half's value registers with AVX2 (`qp` at the half's first byte): as
    /// `values_512`, Q8_0's values signed. The fifth bits of group `g`: each row's byte `g / 2`
    /// spread over its lane, tested against bits `4(g % 2)..` per byte.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn values_256<const NIB: bool, const HIGH: bool>(qp: *const u8, hp: *const u32) -> [__m256i; 8] {
        let mut w = [_mm256_setzero_si256(); 8];
        if NIB {
            let low = _mm256_set1_epi8(0x0F);
            for c in 0..4 {
                let p = _mm256_loadu_si256(qp.add(64 * c) as *const __m256i);
                w[c] = _mm256_and_si256(p, low);
                w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
            }
            if HIGH {
                let words = _mm256_loadu_si256(hp as *const __m256i);
                for (g, wg) in w.iter_mut().enumerate() {
                    let byte = (g / 2) as i8;
                    let spread = _mm256_shuffle_epi8(words, _mm256_setr_epi8(byte, byte, byte, byte, byte + 4, byte + 4, byte + 4, byte + 4, byte + 8, byte + 8, byte + 8, byte + 8, byte + 12, byte + 12, byte + 12, byte + 12, byte, byte, byte, byte, byte + 4, byte + 4, byte + 4, byte + 4, byte + 8, byte + 8, byte + 8, byte + 8, byte + 12, byte + 12, byte + 12, byte + 12));
                    let bits = _mm256_set1_epi32(0x0804_0201 << (4 * (g % 2)));
                    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits);
                    *wg = _mm256_or_si256(*wg, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
                }
            }
        } else {
            for (g, wg) in w.iter_mut().enumerate() {
                *wg = _mm256_loadu_si256(qp.add(64 * g) as *const __m256i);
            }
        }
        w
    }

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
            let simd = |tile: usize, rows: &[XRow], vnni: bool| unsafe { x86::group_with::<GROUP>(&t, tile, rows, vnni) }.to_vec();
            #[cfg(not(target_arch = "x86_64"))]
            let simd = |_: usize, _: &[XRow], _: bool| vec![];
            check_tiled(&format!("{format:?}"), (n, k, GROUP), (&x, &dense), &rows, simd, |tile, row| t.tile_portable(tile, row), |x, m| t.matmul_bt(x, m));
        }
    }

    /// What every tiled format must do (`tiles`, `ktiles`), for `x` (`m` rows of `k`) against
    /// `n` weight rows (`dense` their dequantized values): every SIMD path (`simd(tile, rows,
    /// vnni)`) bitwise the scalar reference (`portable(tile, row)`) for every run of up to
    /// `group` rows; a batch bitwise its rows alone; within 1% of the f32 product.
    pub(crate) fn check_tiled<R: Copy, const W: usize>(
        label: &str,
        (n, k, group): (usize, usize, usize),
        (x, dense): (&[f32], &[f32]),
        rows: &[R],
        simd: impl Fn(usize, &[R], bool) -> Vec<[f32; W]>,
        portable: impl Fn(usize, R) -> [f32; W],
        matmul: impl Fn(&[f32], usize) -> Vec<f32>,
    ) {
        let m = rows.len();
        for tile in 0..n.div_ceil(W) {
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
        for got in simd_paths(|vnni| unsafe { x86::group_with::<GROUP>(&t, 0, &[xq.row(0)], vnni) }) {
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
        let sum = unsafe { x86::quantize_values(&x, inv, &mut a) };
        let mut want = 0;
        for (o, v) in b.iter_mut().zip(&x) {
            *o = (v * inv).round_ties_even() as i8;
            want += *o as i32;
        }
        assert_eq!((a, sum), (b, want));
        assert_eq!(unsafe { x86::max_abs(&x[..37]) }, x[..37].iter().fold(0f32, |m, v| m.max(v.abs())));
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
