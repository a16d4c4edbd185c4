//! Integer matmul over the K-quants (Q4_K, Q5_K, Q6_K: 256 weights per super-block), weights
//! repacked at load into `tiles.rs`'s tiles of 16 interleaved rows. Why ours: candle's K-quant
//! kernel walks one input row at a time (a batch of 32 read every weight 32 times) and runs on
//! its own thread pool, which fought ours for the two cores (its barrier spin was 5% of a
//! decode step).
//!
//! The arithmetic, identical on every path (a test checks each SIMD path bitwise against the
//! scalar one) and batch invariant by construction: activations are quantized per super-block
//! (`d = max|x| / 127` in f32, `q = round(x / d)` to nearest even, with sums of `q` per 16
//! and per 32). For output `j` and input row `x`, per super-block: the exact integer
//! `S = Σ_slots sc · Σ_{t in slot} (w_t - o) q_t` (slots of 32 with 6-bit scales for Q4_K and
//! Q5_K, of 16 with signed 8-bit scales and `o = 32` for Q6_K), `M = Σ_32 m · Σq` (Q4_K and
//! Q5_K's mins), then `acc = fma(d_w · d_x, S, acc)` and `acc = fma(dmin_w · d_x, -M, acc)`.
//! With AVX-512 VNNI a slot's sum is `vpdpbusd`s into 16 rows' lanes (Q6_K's starting at
//! `-32 Σq`) times the rows' scales (`vpmulld`); AVX2 multiplies by the scales in `madd`.
//!
//! Tile layout per super-block (16 rows): f16 `d` and `dmin`, row `r` at `r`; scales as
//! signed bytes `[slot][row]`; mins in pairs of slots, `[pair][row][2]`; the values' low
//! nibbles as eight of `tiles.rs`'s 32-value blocks (2 KiB); Q5_K's fifth bits as 16
//! words per 32-value block (row `r`'s bit `v`: value `v`); Q6_K's top two bits as two 64-byte
//! registers per 32-value block, lane `r` byte `i` holding at bits `2j` the tops of value
//! `4(4K + j) + i` of row `r` (register `K`).

use crate::kquants::{scale_min_k4, KFormat, QK_K};
use crate::tiles::{value_byte, TILE};
use half::f16;

/// Input rows computed together against one tile, as in `tiles.rs`: 8 with AVX-512, 4 with
/// AVX2.
const GROUP: usize = 8;
const GROUP_AVX2: usize = 4;

/// 32-value blocks per super-block.
const BLOCKS: usize = QK_K / 32;

#[derive(Debug)]
pub struct KTiles {
    format: KFormat,
    n: usize,
    k: usize,
    d: Vec<u16>,
    dmin: Vec<u16>,
    sc: Vec<i8>,
    mn: Vec<i8>,
    q: Vec<u8>,
    h: Vec<u8>,
}

/// Input rows quantized per super-block: values, scales, and sums of the values per 16 and 32.
pub struct KRows {
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    s16: Vec<i16>,
    s32: Vec<i16>,
}

impl KRows {
    pub fn quantize(x: &[f32], k: usize) -> KRows {
        let mut r = KRows::with_capacity(k, x.len() / k.max(1));
        for row in x.chunks_exact(k) {
            r.push(row);
        }
        r
    }

    /// Room for `rows` rows of `k` values.
    pub fn with_capacity(k: usize, rows: usize) -> KRows {
        let blocks = rows * (k / QK_K);
        KRows { k, q: Vec::with_capacity(rows * k), d: Vec::with_capacity(blocks), s16: Vec::with_capacity(blocks * 16), s32: Vec::with_capacity(blocks * 8) }
    }

    /// Quantize one more row (`k` values).
    pub fn push(&mut self, x: &[f32]) {
        debug_assert_eq!(x.len(), self.k);
        for b in x.chunks_exact(QK_K) {
            let d = crate::tiles::max_abs(b) / 127.0;
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            let start = self.q.len();
            self.q.resize(start + QK_K, 0);
            for (c, q) in b.chunks_exact(16).zip(self.q[start..].chunks_exact_mut(16)) {
                self.s16.push(crate::tiles::quantize_values(c, inv, q) as i16);
            }
            for pair in self.s16[self.s16.len() - 16..].chunks_exact(2) {
                self.s32.push(pair[0] + pair[1]);
            }
            self.d.push(d);
        }
    }

    /// `x` (`[m, k]`) quantized in pieces of rows across the pool when there are many.
    pub fn quantize_pieces(x: &[f32], k: usize) -> Vec<KRows> {
        crate::pool::map_rows(x, k, crate::tiles::QUANTIZE_PIECE, |x| KRows::quantize(x, k))
    }

    fn row(&self, i: usize) -> KRow<'_> {
        let nb = self.k / QK_K;
        KRow { q: &self.q[i * self.k..(i + 1) * self.k], d: &self.d[i * nb..(i + 1) * nb], s16: &self.s16[i * nb * 16..(i + 1) * nb * 16], s32: &self.s32[i * nb * 8..(i + 1) * nb * 8] }
    }
}

#[derive(Clone, Copy)]
struct KRow<'a> {
    q: &'a [i8],
    d: &'a [f32],
    s16: &'a [i16],
    s32: &'a [i16],
}

/// Per-format sizes: slots per super-block, and bytes per tile and super-block of top bits.
fn slots(f: KFormat) -> usize {
    if f == KFormat::Q6K {
        16
    } else {
        8
    }
}

fn high_bytes(f: KFormat) -> usize {
    match f {
        KFormat::Q4K => 0,
        KFormat::Q5K => BLOCKS * TILE * 4,
        KFormat::Q6K => BLOCKS * TILE * 8,
    }
}

/// Value bytes per tile and super-block: 8 blocks of 16 nibble pairs a row.
const VALUE_BYTES: usize = BLOCKS * TILE * 16;

/// Where slot `s`'s min of row `r` lies among a super-block's: slots in pairs,
/// `[pair][row][2]`, so one `madd` takes two slots for every row.
fn pair_slot(s: usize, r: usize) -> usize {
    (s / 2) * 2 * TILE + r * 2 + s % 2
}

/// Where the top bits of value `v` (0..32) of row `r` lie in a Q6_K block's two registers,
/// and at which bit: group `v / 4` is register `group / 4`, bits `2 (group % 4)`.
fn top_at(r: usize, v: usize) -> (usize, u32) {
    let group = v / 4;
    ((group / 4) * 4 * TILE + 4 * r + v % 4, 2 * (group % 4) as u32)
}

impl KTiles {
    /// From GGUF bytes (`n` rows of `k / 256` super-blocks).
    pub fn new(format: KFormat, data: &[u8], n: usize, k: usize) -> Option<KTiles> {
        let bb = format.block_bytes();
        if !k.is_multiple_of(QK_K) || data.len() != n * (k / QK_K) * bb {
            return None;
        }
        let (nsb, tiles) = (k / QK_K, n.div_ceil(TILE));
        let tsbs = tiles * nsb;
        let (mins, ns, hb) = (format != KFormat::Q6K, slots(format), high_bytes(format));
        let mut t = KTiles {
            format,
            n,
            k,
            d: vec![0; tsbs * TILE],
            dmin: if mins { vec![0; tsbs * TILE] } else { vec![] },
            sc: vec![0; tsbs * TILE * ns],
            mn: if mins { vec![0; tsbs * TILE * 8] } else { vec![] },
            q: vec![0; tsbs * VALUE_BYTES],
            h: vec![0; tsbs * hb],
        };
        let half = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        for (j, row) in data.chunks_exact(nsb * bb).enumerate() {
            let (tile, r) = (j / TILE, j % TILE);
            for (sb, blk) in row.chunks_exact(bb).enumerate() {
                let tsb = tile * nsb + sb;
                // Values as unsigned integers (Q6_K: q + 32), 16 at a time.
                let mut v = [0u8; QK_K];
                for c in 0..16 {
                    let vals = crate::kquants::chunk_values(format, blk, c);
                    for (o, &x) in v[16 * c..16 * c + 16].iter_mut().zip(&vals) {
                        *o = if format == KFormat::Q6K { (x + 32) as u8 } else { x as u8 };
                    }
                }
                if mins {
                    t.d[tsb * TILE + r] = half(blk, 0);
                    t.dmin[tsb * TILE + r] = half(blk, 2);
                    for s in 0..8 {
                        let (sc, m) = scale_min_k4(s, &blk[4..16]);
                        t.sc[(tsb * ns + s) * TILE + r] = sc as i8;
                        t.mn[tsb * TILE * 8 + pair_slot(s, r)] = m as i8;
                    }
                } else {
                    t.d[tsb * TILE + r] = half(blk, 208);
                    for s in 0..16 {
                        t.sc[(tsb * ns + s) * TILE + r] = blk[192 + s] as i8;
                    }
                }
                for g in 0..BLOCKS {
                    let vals = &v[32 * g..32 * g + 32];
                    for p in 0..16 {
                        t.q[tsb * VALUE_BYTES + g * TILE * 16 + value_byte(r, p)] = (vals[p] & 0x0F) | ((vals[p + 16] & 0x0F) << 4);
                    }
                    let hp = tsb * hb + g * (hb / BLOCKS);
                    for (i, &x) in vals.iter().enumerate() {
                        let top = x >> 4;
                        match format {
                            KFormat::Q4K => {}
                            KFormat::Q5K => t.h[hp + 4 * r + i / 8] |= (top & 1) << (i % 8),
                            KFormat::Q6K => {
                                let (at, bit) = top_at(r, i);
                                t.h[hp + at] |= (top & 3) << bit;
                            }
                        }
                    }
                }
            }
        }
        Some(t)
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// The matrices' rows one after another, when each but the last fills its tiles.
    pub fn concat(parts: &[&KTiles]) -> Option<KTiles> {
        let first = parts.first()?;
        if !crate::tiles::concatenable(TILE, parts.iter().map(|p| (p.format, p.k, p.n))) {
            return None;
        }
        let cat = |f: fn(&KTiles) -> &Vec<u16>| parts.iter().flat_map(|p| f(p).iter().copied()).collect::<Vec<u16>>();
        let cat8 = |f: fn(&KTiles) -> &Vec<i8>| parts.iter().flat_map(|p| f(p).iter().copied()).collect::<Vec<i8>>();
        Some(KTiles {
            format: first.format,
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            d: cat(|p| &p.d),
            dmin: cat(|p| &p.dmin),
            sc: cat8(|p| &p.sc),
            mn: cat8(|p| &p.mn),
            q: parts.iter().flat_map(|p| p.q.iter().copied()).collect(),
            h: parts.iter().flat_map(|p| p.h.iter().copied()).collect(),
        })
    }

    /// Row `r` of super-block `tsb` (absolute), value `v` (0..256) as stored unsigned.
    fn raw(&self, tsb: usize, r: usize, v: usize) -> i32 {
        let (g, t) = (v / 32, v % 32);
        let pair = self.q[tsb * VALUE_BYTES + g * TILE * 16 + value_byte(r, t % 16)];
        let low = if t < 16 { pair & 0x0F } else { pair >> 4 } as i32;
        let hb = high_bytes(self.format);
        let hp = tsb * hb + g * (hb / BLOCKS);
        let top = match self.format {
            KFormat::Q4K => 0,
            KFormat::Q5K => (self.h[hp + 4 * r + t / 8] >> (t % 8)) & 1,
            KFormat::Q6K => {
                let (at, bit) = top_at(r, t);
                (self.h[hp + at] >> bit) & 3
            }
        } as i32;
        low | (top << 4)
    }

    /// Slot `s`'s scale of row `r`.
    fn scale(&self, tsb: usize, r: usize, s: usize) -> i32 {
        self.sc[(tsb * slots(self.format) + s) * TILE + r] as i32
    }

    /// Q4_K/Q5_K's min of 32-value block `s` of row `r`.
    fn min(&self, tsb: usize, r: usize, s: usize) -> i32 {
        self.mn[tsb * TILE * 8 + pair_slot(s, r)] as i32
    }

    fn half(v: &[u16], tsb: usize, r: usize) -> f32 {
        f16::from_bits(v[tsb * TILE + r]).to_f32()
    }

    /// Row `j` in f32, exactly as candle's dequantization computes it (`(d · sc) · q - dmin · m`,
    /// `(d · sc) · (q - 32)`).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let (tile, r, nsb) = (j / TILE, j % TILE, self.k / QK_K);
        let per = QK_K / slots(self.format);
        for (sb, o) in out.chunks_exact_mut(QK_K).enumerate() {
            let tsb = tile * nsb + sb;
            let d = Self::half(&self.d, tsb, r);
            for (v, y) in o.iter_mut().enumerate() {
                let scale = d * self.scale(tsb, r, v / per) as f32;
                let q = self.raw(tsb, r, v);
                *y = match self.format {
                    KFormat::Q6K => scale * (q - 32) as f32,
                    _ => scale * q as f32 - Self::half(&self.dmin, tsb, r) * self.min(tsb, r, v / 32) as f32,
                };
            }
        }
    }

    /// `y[m, n] = x[m, k] · wᵀ`, tiles split across threads.
    pub fn matmul_bt(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k);
        self.matmul_quantized(&KRows::quantize_pieces(x, self.k))
    }

    /// The product with input rows already quantized (pieces of rows, in order).
    pub fn matmul_quantized(&self, pieces: &[KRows]) -> Vec<f32> {
        assert!(pieces.iter().all(|p| p.k == self.k), "input rows of another width");
        let rows: Vec<KRow> = pieces.iter().flat_map(|p| (0..p.q.len() / self.k).map(|i| p.row(i))).collect();
        let m = rows.len();
        #[cfg(target_arch = "x86_64")]
        {
            if crate::kernels::has_vnni() {
                return crate::tiles::tiled_matmul(m, self.n, |tile, r| self.tile_group::<GROUP>(tile, &rows[r]));
            }
        }
        crate::tiles::tiled_matmul(m, self.n, |tile, r| self.tile_group::<GROUP_AVX2>(tile, &rows[r]))
    }

    fn tile_group<const G: usize>(&self, tile: usize, rows: &[KRow]) -> [[f32; TILE]; G] {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::tiles::simd() {
                // SAFETY: AVX2, FMA and F16C (and AVX-512 for `vnni`) are present (checked);
                // rows are k long and the tile holds k / 256 super-blocks.
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
    fn tile_portable(&self, tile: usize, x: KRow) -> [f32; TILE] {
        let nsb = self.k / QK_K;
        let ns = slots(self.format);
        let (per, offset) = (QK_K / ns, if self.format == KFormat::Q6K { 32 } else { 0 });
        let mut out = [0f32; TILE];
        for (r, o) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for sb in 0..nsb {
                let tsb = tile * nsb + sb;
                let xq = &x.q[sb * QK_K..(sb + 1) * QK_K];
                let s: i32 = (0..ns).map(|s| self.scale(tsb, r, s) * (s * per..(s + 1) * per).map(|v| (self.raw(tsb, r, v) - offset) * xq[v] as i32).sum::<i32>()).sum();
                acc = (Self::half(&self.d, tsb, r) * x.d[sb]).mul_add(s as f32, acc);
                if self.format != KFormat::Q6K {
                    let m: i32 = (0..8).map(|b| self.min(tsb, r, b) * x.s32[sb * 8 + b] as i32).sum();
                    acc = (Self::half(&self.dmin, tsb, r) * x.d[sb]).mul_add(-(m as f32), acc);
                }
            }
            *o = acc;
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{high_bytes, slots, KTiles, BLOCKS, QK_K, TILE, VALUE_BYTES};
    use crate::kquants::KFormat;
    use crate::tiles::x86::{prefetch_ahead, values_256, values_512};
    use std::arch::x86_64::*;

    /// Rows against one tile on the given instruction set (`vnni` only where the CPU has
    /// it); the same exact integer sums either way.
    pub(super) unsafe fn group_with<const G: usize>(t: &KTiles, tile: usize, rows: &[super::KRow], vnni: bool) -> [[f32; TILE]; G] {
        macro_rules! by_rows {
            ($kernel:ident, $f:expr) => {
                match rows.len().min(G) {
                    8 => $kernel::<8, G, $f>(t, tile, rows),
                    7 => $kernel::<7, G, $f>(t, tile, rows),
                    6 => $kernel::<6, G, $f>(t, tile, rows),
                    5 => $kernel::<5, G, $f>(t, tile, rows),
                    4 => $kernel::<4, G, $f>(t, tile, rows),
                    3 => $kernel::<3, G, $f>(t, tile, rows),
                    2 => $kernel::<2, G, $f>(t, tile, rows),
                    _ => $kernel::<1, G, $f>(t, tile, rows),
                }
            };
        }
        macro_rules! by_format {
            ($kernel:ident) => {
                match t.format {
                    KFormat::Q4K => by_rows!($kernel, 4),
                    KFormat::Q5K => by_rows!($kernel, 5),
                    KFormat::Q6K => by_rows!($kernel, 6),
                }
            };
        }
        if vnni {
            by_format!(ktile_vnni)
        } else {
            by_format!(ktile_avx2)
        }
    }

    /// Q6_K's top two bits of group `g` (0..8) as bits 4-5 of each byte, from the block's
    /// register `g / 4` (bits `2 (g % 4)`: 16-bit shifts, the bits that cross a byte masked).
    macro_rules! tops {
        ($src:expr, $g:expr, $slli:ident, $srli:ident, $and:ident, $set1:ident) => {{
            let src = $src;
            let moved = match $g % 4 {
                0 => $slli(src, 4),
                1 => $slli(src, 2),
                2 => src,
                _ => $srli(src, 2),
            };
            $and(moved, $set1(0x30))
        }};
    }

    /// AVX-512 VNNI: per 32-value block, the tile's values unpacked once; per row and slot
    /// the slot's `vpdpbusd`s (Q6_K's from `-32 Σq`), times the 16 rows' scales.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
    unsafe fn ktile_vnni<const R: usize, const G: usize, const BITS: u8>(t: &KTiles, tile: usize, rows: &[super::KRow]) -> [[f32; TILE]; G] {
        let (nsb, ns, hb) = (t.k / QK_K, slots(t.format), high_bytes(t.format));
        let xs: [super::KRow; R] = std::array::from_fn(|i| rows[i]);
        let mut acc = [_mm512_setzero_ps(); R];
        for sb in 0..nsb {
            let tsb = tile * nsb + sb;
            let mut sums = [_mm512_setzero_si512(); R];
            let scales = |s: usize| _mm512_cvtepi8_epi32(_mm_loadu_si128(t.sc.as_ptr().add((tsb * ns + s) * TILE) as *const __m128i));
            for g in 0..BLOCKS {
                let qp = t.q.as_ptr().add(tsb * VALUE_BYTES + g * TILE * 16);
                prefetch_ahead(qp, TILE * 16);
                let hp = t.h.as_ptr().wrapping_add(tsb * hb + g * (hb / BLOCKS));
                let mut w = if BITS == 5 { values_512::<true, true>(qp, hp as *const u32) } else { values_512::<true, false>(qp, hp as *const u32) };
                if BITS == 6 {
                    let regs = [_mm512_loadu_si512(hp as *const _), _mm512_loadu_si512(hp.add(64) as *const _)];
                    for (c, wc) in w.iter_mut().enumerate() {
                        *wc = _mm512_or_si512(*wc, tops!(regs[c / 4], c, _mm512_slli_epi16, _mm512_srli_epi16, _mm512_and_si512, _mm512_set1_epi8));
                    }
                }
                // The block's slots' scales (Q6_K: two slots of 16 values).
                let sc = if BITS == 6 { [scales(2 * g), scales(2 * g + 1)] } else { [scales(g); 2] };
                for r in 0..R {
                    let xr = &xs[r];
                    let xp = xr.q.as_ptr().add(sb * QK_K + g * 32) as *const i32;
                    let x = |c: usize| _mm512_set1_epi32(std::ptr::read_unaligned(xp.add(c)));
                    if BITS == 6 {
                        for (part, scp) in sc.iter().enumerate() {
                            let s = 2 * g + part;
                            let mut v = _mm512_set1_epi32(-32 * *xr.s16.get_unchecked(sb * 16 + s) as i32);
                            for (c, wc) in w.iter().enumerate().skip(4 * part).take(4) {
                                v = _mm512_dpbusd_epi32(v, *wc, x(c));
                            }
                            sums[r] = _mm512_add_epi32(sums[r], _mm512_mullo_epi32(v, *scp));
                        }
                    } else {
                        let (mut v, mut v2) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                        for c in 0..4 {
                            v = _mm512_dpbusd_epi32(v, w[c], x(c));
                            v2 = _mm512_dpbusd_epi32(v2, w[c + 4], x(c + 4));
                        }
                        sums[r] = _mm512_add_epi32(sums[r], _mm512_mullo_epi32(_mm512_add_epi32(v, v2), sc[0]));
                    }
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr().add(tsb * TILE) as *const __m256i));
            for r in 0..R {
                let xr = &xs[r];
                let dx = _mm512_set1_ps(*xr.d.get_unchecked(sb));
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(sums[r]), acc[r]);
                if BITS != 6 {
                    // Σ_32 m · Σq per row: the mins' slot pairs times the sums' pairs.
                    let mut m = _mm512_setzero_si512();
                    for pair in 0..4 {
                        let mins = _mm512_cvtepi8_epi16(_mm256_loadu_si256(t.mn.as_ptr().add(tsb * TILE * 8 + pair * 2 * TILE) as *const __m256i));
                        let s = _mm512_set1_epi32(std::ptr::read_unaligned(xr.s32.as_ptr().add(sb * 8 + 2 * pair) as *const i32));
                        m = _mm512_add_epi32(m, _mm512_madd_epi16(mins, s));
                    }
                    let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(t.dmin.as_ptr().add(tsb * TILE) as *const __m256i));
                    acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dmin, dx), _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_setzero_si512(), m)), acc[r]);
                }
            }
        }
        let mut out = [[0f32; TILE]; G];
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
        out
    }

    /// AVX2: the tile as two 8-row halves, one after the other (as `tiles.rs`). A slot's pair
    /// sums are added in i16 while exact (Q4_K: 8 groups, at most 16 · 15 · 127; Q5_K: 4;
    /// Q6_K: 2) and multiplied by the scales in `madd` (each row's scale in both i16 halves
    /// of its lane); Q6_K's `-32 Σ sc Σq` is one more `madd` per slot.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ktile_avx2<const R: usize, const G: usize, const BITS: u8>(t: &KTiles, tile: usize, rows: &[super::KRow]) -> [[f32; TILE]; G] {
        let (nsb, ns, hb) = (t.k / QK_K, slots(t.format), high_bytes(t.format));
        let xs: [super::KRow; R] = std::array::from_fn(|i| rows[i]);
        let mut out = [[0f32; TILE]; G];
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for sb in 0..nsb {
                let tsb = tile * nsb + sb;
                let mut sums = [_mm256_setzero_si256(); R];
                let scales = |s: usize| {
                    let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(t.sc.as_ptr().add((tsb * ns + s) * TILE + 8 * half) as *const __m128i));
                    _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(v, 16))
                };
                for g in 0..BLOCKS {
                    let qp = t.q.as_ptr().add(tsb * VALUE_BYTES + g * TILE * 16);
                    if half == 0 {
                        prefetch_ahead(qp, TILE * 16);
                    }
                    let hp = t.h.as_ptr().wrapping_add(tsb * hb + g * (hb / BLOCKS));
                    let (vq, vh) = (qp.add(32 * half), hp.wrapping_add(32 * half) as *const u32);
                    let mut w = if BITS == 5 { values_256::<true, true>(vq, vh) } else { values_256::<true, false>(vq, vh) };
                    if BITS == 6 {
                        let regs = [_mm256_loadu_si256(hp.add(32 * half) as *const __m256i), _mm256_loadu_si256(hp.add(64 + 32 * half) as *const __m256i)];
                        for (c, wc) in w.iter_mut().enumerate() {
                            *wc = _mm256_or_si256(*wc, tops!(regs[c / 4], c, _mm256_slli_epi16, _mm256_srli_epi16, _mm256_and_si256, _mm256_set1_epi8));
                        }
                    }
                    let sc = if BITS == 6 { [scales(2 * g), scales(2 * g + 1)] } else { [scales(g); 2] };
                    for r in 0..R {
                        let xr = &xs[r];
                        let xp = xr.q.as_ptr().add(sb * QK_K + g * 32) as *const i32;
                        let x = |c: usize| _mm256_set1_epi32(std::ptr::read_unaligned(xp.add(c)));
                        let run = |c0: usize, len: usize| {
                            let mut p = _mm256_maddubs_epi16(w[c0], x(c0));
                            for (c, wc) in w.iter().enumerate().skip(c0 + 1).take(len - 1) {
                                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(*wc, x(c)));
                            }
                            p
                        };
                        let mut s = sums[r];
                        if BITS == 6 {
                            for (part, scp) in sc.iter().enumerate() {
                                let bias = _mm256_set1_epi16(-16 * *xr.s16.get_unchecked(sb * 16 + 2 * g + part));
                                s = _mm256_add_epi32(s, _mm256_madd_epi16(run(4 * part, 2), *scp));
                                s = _mm256_add_epi32(s, _mm256_madd_epi16(run(4 * part + 2, 2), *scp));
                                s = _mm256_add_epi32(s, _mm256_madd_epi16(bias, *scp));
                            }
                        } else if BITS == 5 {
                            s = _mm256_add_epi32(s, _mm256_madd_epi16(run(0, 4), sc[0]));
                            s = _mm256_add_epi32(s, _mm256_madd_epi16(run(4, 4), sc[0]));
                        } else {
                            s = _mm256_add_epi32(s, _mm256_madd_epi16(run(0, 8), sc[0]));
                        }
                        sums[r] = s;
                    }
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(tsb * TILE + 8 * half) as *const __m128i));
                for r in 0..R {
                    let xr = &xs[r];
                    let dx = _mm256_set1_ps(*xr.d.get_unchecked(sb));
                    acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(sums[r]), acc[r]);
                    if BITS != 6 {
                        let mut m = _mm256_setzero_si256();
                        for pair in 0..4 {
                            let mins = _mm256_cvtepi8_epi16(_mm_loadu_si128(t.mn.as_ptr().add(tsb * TILE * 8 + pair * 2 * TILE + 16 * half) as *const __m128i));
                            let s = _mm256_set1_epi32(std::ptr::read_unaligned(xr.s32.as_ptr().add(sb * 8 + 2 * pair) as *const i32));
                            m = _mm256_add_epi32(m, _mm256_madd_epi16(mins, s));
                        }
                        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(t.dmin.as_ptr().add(tsb * TILE + 8 * half) as *const __m128i));
                        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_setzero_si256(), m)), acc[r]);
                    }
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * half), acc[r]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kquants::tests_support::random;
    use crate::qkernels::tests::random_x;

    /// Per format (n not a multiple of the tile): rows read back as candle dequantizes them;
    /// every SIMD group size bitwise the scalar reference; a batch bitwise its rows alone; the
    /// product within 1% of the f32 one over the dequantized weights.
    #[test]
    fn ktiles_are_exact_invariant_and_close() {
        let (n, k, m) = (19, 512, 6);
        for format in [KFormat::Q4K, KFormat::Q5K, KFormat::Q6K] {
            let (data, dense) = random(format, n, k, 5);
            let t = KTiles::new(format, &data, n, k).unwrap();
            let mut row = vec![0f32; k];
            for j in 0..n {
                t.dequantize_row(j, &mut row);
                assert!(row.iter().zip(&dense[j * k..(j + 1) * k]).all(|(a, b)| a.to_bits() == b.to_bits()), "{format:?}: row {j}");
            }
            let x = random_x(m, k, 6);
            let xq = KRows::quantize(&x, k);
            let rows: Vec<KRow> = (0..m).map(|i| xq.row(i)).collect();
            #[cfg(target_arch = "x86_64")]
            let simd = |tile: usize, rows: &[KRow], vnni: bool| unsafe { x86::group_with::<GROUP>(&t, tile, rows, vnni) }.to_vec();
            #[cfg(not(target_arch = "x86_64"))]
            let simd = |_: usize, _: &[KRow], _: bool| vec![];
            crate::tiles::tests::check_tiled(&format!("{format:?}"), (n, k, GROUP), (&x, &dense), &rows, simd, |tile, row| t.tile_portable(tile, row), |x, m| t.matmul_bt(x, m));
        }
    }

    #[test]
    fn concat_keeps_every_row() {
        let (a, da) = random(KFormat::Q6K, 16, 256, 1);
        let (b, db) = random(KFormat::Q6K, 3, 256, 2);
        let (a, b) = (KTiles::new(KFormat::Q6K, &a, 16, 256).unwrap(), KTiles::new(KFormat::Q6K, &b, 3, 256).unwrap());
        let c = KTiles::concat(&[&a, &b]).unwrap();
        let mut row = vec![0f32; 256];
        for (j, want) in da.chunks(256).chain(db.chunks(256)).enumerate() {
            c.dequantize_row(j, &mut row);
            assert_eq!(row, want, "row {j}");
        }
        assert!(KTiles::concat(&[&b, &a]).is_none(), "a part that does not fill its tiles can only come last");
    }
}
