//! Integer matmul over the K-quants (Q4_K, Q5_K, Q6_K: 256 weights per super-block), weights
//! repacked at load into tiles of 8 interleaved rows like `tiles.rs` does for the 32-weight
//! formats. Why ours: candle's K-quant kernel walks one input row at a time (a batch of 32
//! read every weight 32 times) and runs on its own thread pool, which fought ours for the two
//! cores (its barrier spin was 5% of a decode step).
//!
//! The arithmetic, identical on every path (a test checks the AVX2 path bitwise against the
//! scalar one) and batch invariant by construction: activations are quantized per super-block
//! (`d = max|x| / 127` in f32, `q = round(x / d)` to nearest even, with sums of `q` per 16
//! and per 32). For output `j` and input row `x`, per super-block: the exact integer
//! `S = Σ_slots sc · Σ_{t in slot} (w_t - o) q_t` (slots of 32 with 6-bit scales for Q4_K and
//! Q5_K, of 16 with signed 8-bit scales and `o = 32` for Q6_K), `M = Σ_32 m · Σq` (Q4_K and
//! Q5_K's mins), then `acc = fma(d_w · d_x, S, acc)` and `acc = fma(dmin_w · d_x, -M, acc)`.
//!
//! Tile layout per super-block (8 rows): f16 `d` and `dmin` in lane order; scales (and mins)
//! as signed bytes in pairs of slots, `[pair][lane][2]`; the values' low nibbles as eight of
//! `tiles.rs`'s 32-value blocks (1 KiB); Q5_K's fifth bits as `tiles.rs`'s words per 32-value
//! block; Q6_K's top two bits as two 32-byte registers per 32-value block, each byte holding
//! the 2-bit tops of four value registers (register `4K + j` at bits `2j`).

use crate::kquants::{scale_min_k4, KFormat, QK_K};
use half::f16;

/// Weight rows per tile.
pub const TILE: usize = 8;
/// Lane `l` of a tile's accumulator holds row `LANE_ROW[l]` (the order `_mm256_hadd_epi32`
/// leaves rows 0-3 and 4-7 in). It is its own inverse.
const LANE_ROW: [usize; TILE] = [0, 1, 4, 5, 2, 3, 6, 7];

/// Input rows computed together against one tile: 8 here (4 for the 32-weight formats), as
/// measured with `glassbox bench kernels` (Q4_K, 32 rows: 1.74 -> 1.37 ms with VNNI).
const GROUP: usize = 8;

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
        let blocks = x.len() / QK_K;
        let mut r = KRows { k, q: Vec::with_capacity(x.len()), d: Vec::with_capacity(blocks), s16: Vec::with_capacity(blocks * 16), s32: Vec::with_capacity(blocks * 8) };
        for b in x.chunks_exact(QK_K) {
            let d = crate::tiles::max_abs(b) / 127.0;
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            let start = r.q.len();
            r.q.resize(start + QK_K, 0);
            for (c, q) in b.chunks_exact(16).zip(r.q[start..].chunks_exact_mut(16)) {
                r.s16.push(crate::tiles::quantize_values(c, inv, q) as i16);
            }
            for pair in r.s16[r.s16.len() - 16..].chunks_exact(2) {
                r.s32.push(pair[0] + pair[1]);
            }
            r.d.push(d);
        }
        r
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

/// Per-format sizes: slots per super-block, and bytes per tile and super-block of scales,
/// mins and top bits.
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
        KFormat::Q5K => BLOCKS * 8 * 4,
        KFormat::Q6K => BLOCKS * 64,
    }
}

const VALUE_BYTES: usize = BLOCKS * TILE * 16;

/// Where byte `i` of chunk `c` (bytes `8c..8c+8` of a row's 32-value block) of tile row `r`
/// lies in the block's value registers: register `2c + r / 4`, row slot `r % 4`.
fn register_byte(c: usize, r: usize, i: usize) -> usize {
    (2 * c + r / 4) * 32 + (r % 4) * 8 + i
}

/// The fifth-bit word that holds byte `c` (values `8c..8c+8`) of tile row `r`'s fifth bits of
/// a 32-value block, at byte `r % 4` of it (the register `2c + r / 4` those values sit in).
fn high_word(c: usize, r: usize) -> usize {
    2 * c + r / 4
}

/// Where slot `s`'s scale (or min) of accumulator lane `lane` lies among a super-block's:
/// slots in pairs, `[pair][lane][2]`, so one 16-byte load holds two slots for all 8 lanes.
fn pair_slot(s: usize, lane: usize) -> usize {
    (s / 2) * 16 + lane * 2 + s % 2
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
        let mins = format != KFormat::Q6K;
        let mut t = KTiles {
            format,
            n,
            k,
            d: vec![0; tsbs * TILE],
            dmin: if mins { vec![0; tsbs * TILE] } else { vec![] },
            sc: vec![0; tsbs * TILE * slots(format)],
            mn: if mins { vec![0; tsbs * TILE * 8] } else { vec![] },
            q: vec![0; tsbs * VALUE_BYTES],
            h: vec![0; tsbs * high_bytes(format)],
        };
        let half = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        for (j, row) in data.chunks_exact(nsb * bb).enumerate() {
            let (tile, r) = (j / TILE, j % TILE);
            let lane = LANE_ROW[r];
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
                let ns = slots(format);
                if mins {
                    t.d[tsb * TILE + lane] = half(blk, 0);
                    t.dmin[tsb * TILE + lane] = half(blk, 2);
                    for s in 0..8 {
                        let (sc, m) = scale_min_k4(s, &blk[4..16]);
                        t.sc[tsb * TILE * ns + pair_slot(s, lane)] = sc as i8;
                        t.mn[tsb * TILE * 8 + pair_slot(s, lane)] = m as i8;
                    }
                } else {
                    t.d[tsb * TILE + lane] = half(blk, 208);
                    for s in 0..16 {
                        t.sc[tsb * TILE * ns + pair_slot(s, lane)] = blk[192 + s] as i8;
                    }
                }
                for g in 0..BLOCKS {
                    let vals = &v[32 * g..32 * g + 32];
                    for c in 0..2 {
                        for i in 0..8 {
                            t.q[tsb * VALUE_BYTES + g * TILE * 16 + register_byte(c, r, i)] = (vals[8 * c + i] & 0x0F) | ((vals[8 * c + 16 + i] & 0x0F) << 4);
                        }
                    }
                    for cc in 0..4 {
                        let reg = high_word(cc, r);
                        for i in 0..8 {
                            let top = vals[8 * cc + i] >> 4;
                            match format {
                                KFormat::Q4K => {}
                                KFormat::Q5K => t.h[tsb * high_bytes(format) + g * 32 + reg * 4 + r % 4] |= (top & 1) << i,
                                KFormat::Q6K => t.h[tsb * high_bytes(format) + g * 64 + (reg / 4) * 32 + (r % 4) * 8 + i] |= (top & 3) << (2 * (reg % 4)),
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

    /// Row `r` of `tile`, super-block `tsb` (absolute), value `v` (0..256) as stored unsigned.
    fn raw(&self, tsb: usize, r: usize, v: usize) -> i32 {
        let (g, t) = (v / 32, v % 32);
        let pair = self.q[tsb * VALUE_BYTES + g * TILE * 16 + register_byte((t % 16) / 8, r, t % 8)];
        let low = if t < 16 { pair & 0x0F } else { pair >> 4 } as i32;
        let reg = high_word(t / 8, r);
        let top = match self.format {
            KFormat::Q4K => 0,
            KFormat::Q5K => (self.h[tsb * high_bytes(self.format) + g * 32 + reg * 4 + r % 4] >> (t % 8)) & 1,
            KFormat::Q6K => (self.h[tsb * high_bytes(self.format) + g * 64 + (reg / 4) * 32 + (r % 4) * 8 + t % 8] >> (2 * (reg % 4))) & 3,
        } as i32;
        low | (top << 4)
    }

    /// Slot `s`'s scale of row `r` (and Q4_K/Q5_K's min of 32-value block `s`).
    fn scale(&self, tsb: usize, r: usize, s: usize) -> i32 {
        self.sc[tsb * TILE * slots(self.format) + pair_slot(s, LANE_ROW[r])] as i32
    }

    fn min(&self, tsb: usize, r: usize, s: usize) -> i32 {
        self.mn[tsb * TILE * 8 + pair_slot(s, LANE_ROW[r])] as i32
    }

    fn half(v: &[u16], tsb: usize, r: usize) -> f32 {
        f16::from_bits(v[tsb * TILE + LANE_ROW[r]]).to_f32()
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
        let pieces = crate::pool::map_rows(x, self.k, crate::tiles::QUANTIZE_PIECE, |x| KRows::quantize(x, self.k));
        let rows: Vec<KRow> = pieces.iter().flat_map(|p| (0..p.q.len() / self.k).map(|i| p.row(i))).collect();
        crate::tiles::tiled_matmul(m, self.n, |tile, r| self.tile_group(tile, &rows[r]))
    }

    fn tile_group(&self, tile: usize, rows: &[KRow]) -> [[f32; TILE]; GROUP] {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::tiles::simd() {
                // SAFETY: AVX2, FMA and F16C are present (checked); rows are k long and the
                // tile holds k / 256 super-blocks.
                return unsafe { avx2::group(self, tile, rows) };
            }
        }
        let mut out = [[0f32; TILE]; GROUP];
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
mod avx2 {
    use super::{high_bytes, slots, KTiles, BLOCKS, GROUP, LANE_ROW, TILE, VALUE_BYTES};
    use crate::kquants::{KFormat, QK_K};
    use crate::tiles::x86::prefetch_ahead;
    use std::arch::x86_64::*;

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

    /// A 32-value block's fifth bits (8 words at `words`, `super::high_word`'s layout) set as
    /// 0x10 into its value registers.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn add_highs(w: &mut [[__m256i; 2]; 4], words: *const u32) {
        for (c, wc) in w.iter_mut().enumerate() {
            for (h, wh) in wc.iter_mut().enumerate() {
                *wh = _mm256_or_si256(*wh, highs(std::ptr::read_unaligned(words.add(super::high_word(c, 4 * h)))));
            }
        }
    }

    /// A 4-bit block's 128 bytes as `[C][h]` registers of byte values (`C`: values
    /// `8C..8C+8`, `h`: rows `4h..4h+4`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(qp: *const u8) -> [[__m256i; 2]; 4] {
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

    /// Per input row, the 8 lanes of its accumulator back in row order.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn lanes_to_rows<const R: usize, const G: usize>(acc: [__m256; R]) -> [[f32; TILE]; G] {
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

    pub(super) unsafe fn group(t: &KTiles, tile: usize, rows: &[super::KRow]) -> [[f32; TILE]; GROUP] {
        group_with(t, tile, rows, crate::kernels::has_vnni())
    }

    /// `group` on the given instruction set (`vnni` only where the CPU has it); the same
    /// exact integer sums either way.
    pub(super) unsafe fn group_with(t: &KTiles, tile: usize, rows: &[super::KRow], vnni: bool) -> [[f32; TILE]; GROUP] {
        macro_rules! by_rows {
            ($kernel:ident, $f:expr) => {
                match rows.len() {
                    8 => $kernel::<8, $f>(t, tile, rows),
                    7 => $kernel::<7, $f>(t, tile, rows),
                    6 => $kernel::<6, $f>(t, tile, rows),
                    5 => $kernel::<5, $f>(t, tile, rows),
                    4 => $kernel::<4, $f>(t, tile, rows),
                    3 => $kernel::<3, $f>(t, tile, rows),
                    2 => $kernel::<2, $f>(t, tile, rows),
                    _ => $kernel::<1, $f>(t, tile, rows),
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
            by_format!(tile_rows_vnni)
        } else {
            by_format!(tile_rows_avx2)
        }
    }

    /// The shuffles that spread slot parity `par`'s scales of rows `4h..4h+4` over a value
    /// register's lanes of `WIDTH` bytes (i16 for AVX2's pair sums, i32 for VNNI's quad
    /// sums): each row's scale in the top byte of its lanes, the other bytes zero, so an
    /// arithmetic shift right by `8 * (WIDTH - 1)` sign-extends it. `[h][par]`.
    const fn patterns<const WIDTH: usize>() -> [[[i8; 32]; 2]; 2] {
        let mut p = [[[-1i8; 32]; 2]; 2];
        let mut h = 0;
        while h < 2 {
            let mut par = 0;
            while par < 2 {
                let mut i = WIDTH - 1;
                while i < 32 {
                    p[h][par][i] = (2 * LANE_ROW[4 * h + i / 8] + par) as i8;
                    i += WIDTH;
                }
                par += 1;
            }
            h += 1;
        }
        p
    }

    const PATTERNS_I16: [[[i8; 32]; 2]; 2] = patterns::<2>();
    const PATTERNS_I32: [[[i8; 32]; 2]; 2] = patterns::<4>();

    /// One slot's scaled sums as two exact i32 lanes per row, AVX2: the chunks' pair sums in
    /// i16 (at most 4 · 2 · 31 · 127, or 2 · 2 · 63 · 127 for Q6_K's 16-value slots), times
    /// the scales (i16 lanes) by `madd`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn slot_avx2<const N: usize>(w: [__m256i; N], x: [__m256i; N], pair: __m256i, pattern: __m256i) -> __m256i {
        let mut s = _mm256_maddubs_epi16(w[0], x[0]);
        for c in 1..N {
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[c], x[c]));
        }
        _mm256_madd_epi16(s, _mm256_srai_epi16(_mm256_shuffle_epi8(pair, pattern), 8))
    }

    /// The same with AVX-512 VNNI: quad sums by `vpdpbusd`, times the scales (i32 lanes).
    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    unsafe fn slot_vnni<const N: usize>(w: [__m256i; N], x: [__m256i; N], pair: __m256i, pattern: __m256i) -> __m256i {
        let mut s = _mm256_setzero_si256();
        for c in 0..N {
            s = _mm256_dpbusd_epi32(s, w[c], x[c]);
        }
        _mm256_mullo_epi32(s, _mm256_srai_epi32(_mm256_shuffle_epi8(pair, pattern), 24))
    }

    /// Per accumulator lane, `Σ_slots bytes[slot] · sums[slot]` over `pairs` pairs of slots:
    /// the scales or mins (`pair_slot`'s layout, signed bytes) against the activations' block
    /// sums, two slots per `madd` (exact in i32).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn pair_dot(bytes: *const i8, sums: *const i16, pairs: usize) -> __m256i {
        let mut acc = _mm256_setzero_si256();
        for pair in 0..pairs {
            let b = _mm256_cvtepi8_epi16(_mm_loadu_si128(bytes.add(pair * 16) as *const __m128i));
            let s = _mm256_set1_epi32(std::ptr::read_unaligned(sums.add(2 * pair) as *const i32));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(b, s));
        }
        acc
    }

    /// One kernel body compiled per instruction set (`$slot`, `$patterns`). `BITS`: 4 (Q4_K),
    /// 5 (Q5_K), 6 (Q6_K).
    macro_rules! ktile_kernel {
        ($name:ident, $features:literal, $slot:ident, $patterns:ident) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<const R: usize, const BITS: u8>(t: &KTiles, tile: usize, rows: &[super::KRow]) -> [[f32; TILE]; GROUP] {
                let format = t.format;
                let (nsb, ns, hb) = (t.k / QK_K, slots(format), high_bytes(format));
                let patterns: [[__m256i; 2]; 2] = std::array::from_fn(|h| std::array::from_fn(|par| _mm256_loadu_si256($patterns[h][par].as_ptr() as *const __m256i)));
                let xs: [super::KRow; R] = std::array::from_fn(|i| rows[i]);
                let mut acc = [_mm256_setzero_ps(); R];
                for sb in 0..nsb {
                    let tsb = tile * nsb + sb;
                    let mut sums = [[_mm256_setzero_si256(); 2]; R];
                    let scp = t.sc.as_ptr().add(tsb * TILE * ns);
                    for g in 0..BLOCKS {
                        let qp = t.q.as_ptr().add(tsb * VALUE_BYTES + g * TILE * 16);
                        prefetch_ahead(qp, TILE * 16);
                        let mut w = nibbles(qp);
                        if BITS == 5 {
                            add_highs(&mut w, t.h.as_ptr().add(tsb * hb + g * 32) as *const u32);
                        } else if BITS == 6 {
                            let hp = t.h.as_ptr().add(tsb * hb + g * 64);
                            let tops = [_mm256_loadu_si256(hp as *const __m256i), _mm256_loadu_si256(hp.add(32) as *const __m256i)];
                            let mask = _mm256_set1_epi8(0x30);
                            for (cc, wc) in w.iter_mut().enumerate() {
                                for (h, wh) in wc.iter_mut().enumerate() {
                                    let reg = 2 * cc + h;
                                    let src = tops[reg / 4];
                                    // Bits 2j, 2j+1 of each byte to bits 4, 5.
                                    let moved = match reg % 4 {
                                        0 => _mm256_slli_epi16(src, 4),
                                        1 => _mm256_slli_epi16(src, 2),
                                        2 => src,
                                        _ => _mm256_srli_epi16(src, 2),
                                    };
                                    *wh = _mm256_or_si256(*wh, _mm256_and_si256(moved, mask));
                                }
                            }
                        }
                        // This block's slots' scale bytes (a pair of slots per 16 bytes, both halves of
                        // the register): Q4_K/Q5_K one slot (32 values), Q6_K two (16 each).
                        let pair = |s: usize| _mm256_broadcastsi128_si256(_mm_loadu_si128(scp.add((s / 2) * 16) as *const __m128i));
                        for r in 0..R {
                            let xp = xs[r].q.as_ptr().add(sb * QK_K + g * 32) as *const i64;
                            let xc: [__m256i; 4] = std::array::from_fn(|c| _mm256_set1_epi64x(std::ptr::read_unaligned(xp.add(c))));
                            for h in 0..2 {
                                let s = if BITS == 6 {
                                    let (lo, hi) = (2 * g, 2 * g + 1);
                                    _mm256_add_epi32(
                                        $slot::<2>([w[0][h], w[1][h]], [xc[0], xc[1]], pair(lo), patterns[h][lo % 2]),
                                        $slot::<2>([w[2][h], w[3][h]], [xc[2], xc[3]], pair(hi), patterns[h][hi % 2]),
                                    )
                                } else {
                                    $slot::<4>([w[0][h], w[1][h], w[2][h], w[3][h]], xc, pair(g), patterns[h][g % 2])
                                };
                                sums[r][h] = _mm256_add_epi32(sums[r][h], s);
                            }
                        }
                    }
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(tsb * TILE) as *const __m128i));
                    for r in 0..R {
                        let xr = &xs[r];
                        let mut s = _mm256_hadd_epi32(sums[r][0], sums[r][1]);
                        if BITS == 6 {
                            // Σ_slots sc · 32 · Σq, per lane: the scales' slot pairs times the sums' pairs.
                            let c = pair_dot(scp, xr.s16.as_ptr().add(sb * 16), ns / 2);
                            s = _mm256_sub_epi32(s, _mm256_slli_epi32(c, 5));
                        }
                        let dx = _mm256_set1_ps(*xr.d.get_unchecked(sb));
                        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(s), acc[r]);
                        if BITS != 6 {
                            let m = pair_dot(t.mn.as_ptr().add(tsb * TILE * 8), xr.s32.as_ptr().add(sb * 8), 4);
                            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(t.dmin.as_ptr().add(tsb * TILE) as *const __m128i));
                            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_setzero_si256(), m)), acc[r]);
                        }
                    }
                }
                lanes_to_rows(acc)
            }
        };
    }

    ktile_kernel!(tile_rows_avx2, "avx2,fma,f16c", slot_avx2, PATTERNS_I16);
    ktile_kernel!(tile_rows_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", slot_vnni, PATTERNS_I32);
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
            let simd = |tile: usize, rows: &[KRow], vnni: bool| unsafe { avx2::group_with(&t, tile, rows, vnni) }.to_vec();
            #[cfg(not(target_arch = "x86_64"))]
            let simd = |_: usize, _: &[KRow], _: bool| vec![];
            crate::tiles::tests::check_tiled(&format!("{format:?}"), (n, k, GROUP), (&x, &dense), &rows, simd, |tile, row| t.tile_portable(tile, row), |x, m| t.matmul_bt(x, m));
        }
    }

    #[test]
    fn concat_keeps_every_row() {
        let (a, da) = random(KFormat::Q6K, 8, 256, 1);
        let (b, db) = random(KFormat::Q6K, 3, 256, 2);
        let (a, b) = (KTiles::new(KFormat::Q6K, &a, 8, 256).unwrap(), KTiles::new(KFormat::Q6K, &b, 3, 256).unwrap());
        let c = KTiles::concat(&[&a, &b]).unwrap();
        let mut row = vec![0f32; 256];
        for (j, want) in da.chunks(256).chain(db.chunks(256)).enumerate() {
            c.dequantize_row(j, &mut row);
            assert_eq!(row, want, "row {j}");
        }
    }
}
