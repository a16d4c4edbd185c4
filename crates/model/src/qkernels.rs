//! Our own matmul over GGUF block formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (32 weights per
//! block) and the K-quants (256, `kquants.rs`). Why ours: candle walks the rows of the input
//! outermost, so a batch of 32 reads the whole weight matrix 32 times (SmolLM2's tied 49k×576
//! output projection took 27% of a 32-sequence decode step), and it runs Q4_1/Q5_x with scalar
//! code, which is why those used to be dequantized to f32 at load (4-6x the memory, and the
//! bytes read per decoded token). Here weights stay in their blocks and each weight row is read
//! once per call, for every input row, with the columns split across threads.
//!
//! Two arithmetics, each batch invariant by construction (`y[i, j]` is one fixed sequence of
//! operations over `x_i` and `w_j`, whatever the number of rows or the thread split):
//! - exact (`matmul_dequantized`, `matmul_kquant`; the exact path, `--dequantize`): each block
//!   is expanded to f32 in registers exactly as candle's dequantize does (`(q - 8) * d`,
//!   `q * d + m`, ...) and multiplied in the f32 kernel's lane order, so the numbers are bitwise
//!   those of the f32 path (and of the reference tests).
//! - integer (`tiles.rs` for the 32-weight formats, `ktiles.rs` for the K-quants; llama.cpp's
//!   arithmetic, the default path, Q8_0 always): activations quantized to 8 bits, exact integer
//!   sums per block, weights repacked into tiles of 16 interleaved rows.

use crate::error::Result;
use crate::kquants::{KFormat, QK_K};
use crate::ktiles::{KRows, KTiles};
use crate::tiles::{QRows, Tiles};
use candle_core::Tensor;
use std::cell::OnceCell;
use half::f16;
use crate::pool::Columns;

const QK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QFormat {
    /// f16 scale, 32 signed bytes: `w = d * q`.
    Q8_0,
    /// f16 scale, f16 min, 16 bytes of nibbles (low: weights 0-15, high: 16-31): `w = d * q + m`.
    Q4_1,
    /// f16 scale, 16 bytes of nibbles: `w = d * (q - 8)`.
    Q4_0,
    /// f16 scale, 32 fifth bits, 16 bytes of nibbles: `w = d * (q - 16)`.
    Q5_0,
    /// f16 scale, f16 min, 32 fifth bits, nibbles: `w = d * q + m`.
    Q5_1,
    /// The K-quants (256 per super-block, `kquants.rs`), kept in the file's own bytes.
    K(KFormat),
    /// 16-bit floats (GGUF F16/BF16, half-precision safetensors), kept as they are: widened
    /// exactly in registers, with the f32 kernel's arithmetic (`kernels::dot_group_half`).
    F16,
    BF16,
}

impl QFormat {
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            QFormat::Q8_0 => 2 + QK,
            QFormat::Q4_1 => 4 + QK / 2,
            QFormat::Q4_0 => 2 + QK / 2,
            QFormat::Q5_0 => 6 + QK / 2,
            QFormat::Q5_1 => 8 + QK / 2,
            QFormat::K(f) => f.block_bytes(),
            QFormat::F16 | QFormat::BF16 => 2,
        }
    }

    /// The fixed offset subtracted from every value (`None`: per-block mins instead).
    pub(crate) fn offset(self) -> Option<i32> {
        match self {
            QFormat::Q4_0 => Some(8),
            QFormat::Q5_0 => Some(16),
            _ => None,
        }
    }

    /// Weights per block.
    fn block_len(self) -> usize {
        match self {
            QFormat::K(_) => QK_K,
            QFormat::F16 | QFormat::BF16 => 1,
            _ => QK,
        }
    }

    /// Bytes of values per block once repacked (scales and mins live apart); in a 32-weight
    /// block they are its last bytes.
    pub(crate) fn packed(self) -> usize {
        match self {
            QFormat::Q8_0 => QK,
            QFormat::Q4_1 | QFormat::Q4_0 | QFormat::Q5_0 | QFormat::Q5_1 => QK / 2,
            QFormat::K(f) => f.block_bytes(),
            QFormat::F16 | QFormat::BF16 => 2,
        }
    }
}

/// Which 8-bit forms of an input the projections that read it take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Blocks of 32 (`tiles.rs`).
    pub small: bool,
    /// Super-blocks of 256 (`ktiles.rs`).
    pub k: bool,
}

impl Needs {
    pub fn and(self, other: Needs) -> Needs {
        Needs { small: self.small || other.small, k: self.k || other.k }
    }
}

/// One activation (`[m, k]` f32 rows) as the projections that read it take it: the f32 rows
/// and their 8-bit forms, each quantized at most once however many projections read it (q,
/// k and v in formats of their own; gate and up). A norm fills the forms its readers need
/// while each row is still in cache (`RmsNorm::forward_input`); any other is made on first
/// use. The quantization is per row and block, so where it happens changes no number.
pub struct QInput {
    x: Tensor,
    small: OnceCell<Vec<QRows>>,
    kq: OnceCell<Vec<KRows>>,
}

impl QInput {
    /// Rows to be quantized on first use.
    pub fn new(x: Tensor) -> QInput {
        QInput { x, small: OnceCell::new(), kq: OnceCell::new() }
    }

    /// Rows with 8-bit forms already made from them (pieces of rows, in order).
    pub fn quantized(x: Tensor, small: Option<Vec<QRows>>, kq: Option<Vec<KRows>>) -> QInput {
        QInput { x, small: small.map(OnceCell::from).unwrap_or_default(), kq: kq.map(OnceCell::from).unwrap_or_default() }
    }

    pub fn tensor(&self) -> &Tensor {
        &self.x
    }

    pub fn into_tensor(self) -> Tensor {
        self.x
    }

    fn small(&self, k: usize) -> Result<&[QRows]> {
        if self.small.get().is_none() {
            let q = crate::weights::with_f32(&self.x, |x| QRows::quantize_pieces(x, k))?;
            let _ = self.small.set(q);
        }
        Ok(self.small.get().map(Vec::as_slice).unwrap_or_default())
    }

    fn kquant(&self, k: usize) -> Result<&[KRows]> {
        if self.kq.get().is_none() {
            let q = crate::weights::with_f32(&self.x, |x| KRows::quantize_pieces(x, k))?;
            let _ = self.kq.set(q);
        }
        Ok(self.kq.get().map(Vec::as_slice).unwrap_or_default())
    }
}

/// Quantized weights `[n, k]`, repacked at load: block scales (and Q4_1/Q5_1 mins, Q5_x fifth
/// bits) in arrays of their own, the values as one contiguous byte array; K-quants keep the
/// file's bytes.
#[derive(Debug)]
pub struct QMatrix {
    format: QFormat,
    d: Vec<f32>,
    m: Vec<f32>,
    /// Q5_x: each block's 32 fifth bits.
    h: Vec<u32>,
    /// The integer path's layout; the fields above are then empty.
    tiles: Option<Packed>,
    q: Vec<u8>,
    n: usize,
    k: usize,
}


/// Input rows handled together against one weight row (each row's arithmetic is the same
/// as alone; grouping only saves loads).
const GROUP: usize = 4;

impl QMatrix {
    /// From GGUF bytes (`n` rows of `k / block_len` blocks). `k` must be a multiple of the
    /// block length. `integer`: integer dot products over 8-bit activations (`tiles.rs`,
    /// `ktiles.rs`; Q8_0 always), else the exact f32 expansion.
    pub fn new(format: QFormat, data: &[u8], n: usize, k: usize, integer: bool) -> Option<Self> {
        let len = format.block_len();
        if !k.is_multiple_of(len) || data.len() != n * (k / len) * format.block_bytes() {
            return None;
        }
        if matches!(format, QFormat::F16 | QFormat::BF16) {
            return Some(QMatrix { format, d: vec![], m: vec![], h: vec![], tiles: None, q: data.to_vec(), n, k });
        }
        if integer || format == QFormat::Q8_0 {
            let tiles = Some(match format {
                QFormat::K(f) => Packed::K(KTiles::new(f, data, n, k)?),
                _ => Packed::Small(Tiles::new(format, data, n, k)?),
            });
            return Some(QMatrix { format, d: vec![], m: vec![], h: vec![], tiles, q: vec![], n, k });
        }
        if let QFormat::K(_) = format {
            return Some(QMatrix { format, d: vec![], m: vec![], h: vec![], tiles: None, q: data.to_vec(), n, k });
        }
        let blocks = n * k / QK;
        let half = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        let (mut d, mut m, mut h) = (Vec::with_capacity(blocks), vec![], vec![]);
        let word = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut q = Vec::with_capacity(blocks * format.packed());
        for b in data.chunks_exact(format.block_bytes()) {
            d.push(half(b, 0));
            match format {
                QFormat::Q4_0 => q.extend_from_slice(&b[2..]),
                QFormat::Q4_1 => {
                    m.push(half(b, 2));
                    q.extend_from_slice(&b[4..]);
                }
                QFormat::Q5_0 => {
                    h.push(word(b, 2));
                    q.extend_from_slice(&b[6..]);
                }
                QFormat::Q5_1 => {
                    m.push(half(b, 2));
                    h.push(word(b, 4));
                    q.extend_from_slice(&b[8..]);
                }
                // Q8_0 is tiles; K-quants and 16-bit floats keep the file's bytes (returned above).
                QFormat::Q8_0 | QFormat::K(_) | QFormat::F16 | QFormat::BF16 => return None,
            }
        }
        Some(QMatrix { format, d, m, h, tiles: None, q, n, k })
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// The matrices' rows one after another (q, k and v as one projection), when they share
    /// format, width and kernel; each output is computed exactly as before.
    pub fn concat_rows(parts: &[&QMatrix]) -> Option<QMatrix> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.format != first.format || p.k != first.k || p.tiles.is_some() != first.tiles.is_some()) {
            return None;
        }
        let tiles = match first.tiles {
            Some(Packed::Small(_)) => Some(Packed::Small(Tiles::concat(&parts.iter().map(|p| if let Some(Packed::Small(t)) = &p.tiles { Some(t) } else { None }).collect::<Option<Vec<_>>>()?)?)),
            Some(Packed::K(_)) => Some(Packed::K(KTiles::concat(&parts.iter().map(|p| if let Some(Packed::K(t)) = &p.tiles { Some(t) } else { None }).collect::<Option<Vec<_>>>()?)?)),
            None => None,
        };
        let cat = |f: fn(&QMatrix) -> &Vec<f32>| parts.iter().flat_map(|p| f(p).iter().copied()).collect::<Vec<f32>>();
        Some(QMatrix {
            format: first.format,
            d: cat(|p| &p.d),
            m: cat(|p| &p.m),
            h: parts.iter().flat_map(|p| p.h.iter().copied()).collect(),
            tiles,
            q: parts.iter().flat_map(|p| p.q.iter().copied()).collect(),
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
        })
    }

    /// Row `j` in f32, exactly as candle's dequantization computes it (embedding lookups read
    /// single rows of the table this way, so the table stays in its blocks).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        if let Some(t) = &self.tiles {
            return t.dequantize_row(j, out);
        }
        let nb = self.k / self.format.block_len();
        match self.format {
            QFormat::K(f) => {
                let row = &self.q[j * nb * f.block_bytes()..(j + 1) * nb * f.block_bytes()];
                for (blk, o) in row.chunks_exact(f.block_bytes()).zip(out.chunks_exact_mut(QK_K)) {
                    crate::kquants::dequantize_block(f, blk, o);
                }
            }
            QFormat::F16 | QFormat::BF16 => crate::kernels::widen_half(self.format == QFormat::BF16, self.half_row(j), out),
            _ => dequantize_small(&self.small_row(j), out),
        }
    }

    /// The GGUF type this format reads, if it is one of ours.
    pub fn format_of(dtype: candle_core::quantized::GgmlDType) -> Option<QFormat> {
        use candle_core::quantized::GgmlDType as G;
        Some(match dtype {
            G::Q8_0 => QFormat::Q8_0,
            G::Q4_0 => QFormat::Q4_0,
            G::Q4_1 => QFormat::Q4_1,
            G::Q5_0 => QFormat::Q5_0,
            G::Q5_1 => QFormat::Q5_1,
            G::Q4K => QFormat::K(KFormat::Q4K),
            G::Q5K => QFormat::K(KFormat::Q5K),
            G::Q6K => QFormat::K(KFormat::Q6K),
            G::F16 => QFormat::F16,
            G::BF16 => QFormat::BF16,
            _ => return None,
        })
    }

    /// The 8-bit form of the input this matrix's kernel reads (none: f32).
    pub fn needs(&self) -> Needs {
        match &self.tiles {
            Some(Packed::Small(_)) => Needs { small: true, k: false },
            Some(Packed::K(_)) => Needs { small: false, k: true },
            None => Needs::default(),
        }
    }

    /// `y[m, n] = x[m, k] · wᵀ`, with the input's 8-bit form made once (`QInput`).
    pub fn matmul_input(&self, x: &QInput) -> Result<Vec<f32>> {
        match &self.tiles {
            Some(Packed::Small(t)) => Ok(t.matmul_quantized(x.small(self.k)?)),
            Some(Packed::K(t)) => Ok(t.matmul_quantized(x.kquant(self.k)?)),
            None => {
                let m = x.x.dim(0)?;
                crate::weights::with_f32(&x.x, |v| self.matmul_bt(v, m))
            }
        }
    }

    /// `y[m, n] = x[m, k] · wᵀ`.
    pub fn matmul_bt(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k);
        if let Some(t) = &self.tiles {
            return t.matmul_bt(x, m);
        }
        match self.format {
            QFormat::K(f) => self.matmul_kquant(f, x, m),
            QFormat::F16 | QFormat::BF16 => self.matmul_half(x, m),
            _ => self.matmul_dequantized(x, m),
        }
    }

    /// 16-bit float weights: each row widened in registers (or into f32 without AVX2), the
    /// f32 kernel's arithmetic either way, so bitwise the product over the widened matrix at
    /// half its bytes.
    fn matmul_half(&self, x: &[f32], m: usize) -> Vec<f32> {
        let bf16 = self.format == QFormat::BF16;
        let rows: Vec<&[f32]> = x.chunks_exact(self.k).collect();
        crate::pool::by_column_blocks(m, self.n, 64, |c0, c1, out| {
            exact_block(&rows, (c0, c1), out, self.k, |r: &[&[f32]], j| crate::kernels::dot_group_half(r, self.half_row(j), bf16), |j, wr| crate::kernels::widen_half(bf16, self.half_row(j), wr))
        })
    }

    /// Row `j` of a 16-bit float matrix: `2k` bytes.
    fn half_row(&self, j: usize) -> &[u8] {
        &self.q[j * 2 * self.k..(j + 1) * 2 * self.k]
    }

    /// Row `r` moved to row `to(r)` (GPT-NeoX's interleaved q/k/v, undone at load): for the
    /// formats kept as whole rows of bytes (16-bit floats).
    pub fn permute_rows(&self, to: impl Fn(usize) -> usize) -> Option<QMatrix> {
        if !matches!(self.format, QFormat::F16 | QFormat::BF16) {
            return None;
        }
        let row = 2 * self.k;
        let mut q = vec![0u8; self.q.len()];
        for r in 0..self.n {
            let t = to(r);
            q.get_mut(t * row..(t + 1) * row)?.copy_from_slice(self.half_row(r));
        }
        Some(QMatrix { format: self.format, d: vec![], m: vec![], h: vec![], tiles: None, q, n: self.n, k: self.k })
    }

    /// K-quants: each weight row expanded in registers (AVX2) or dequantized per column block
    /// (portable), with the f32 kernel's arithmetic either way (see `kquants`).
    fn matmul_kquant(&self, format: KFormat, x: &[f32], m: usize) -> Vec<f32> {
        let rows: Vec<&[f32]> = x.chunks_exact(self.k).collect();
        let row_bytes = self.k / QK_K * format.block_bytes();
        let wrow = |j: usize| &self.q[j * row_bytes..(j + 1) * row_bytes];
        crate::pool::by_column_blocks(m, self.n, 64, |c0, c1, out| {
            exact_block(&rows, (c0, c1), out, self.k, |r: &[&[f32]], j| {
                // SAFETY: only called where AVX2 and FMA are present; rows are k long and the
                // weight row holds k / 256 whole super-blocks.
                unsafe {
                    use crate::kquants::dot_rows_avx2 as dot;
                    match r.len() {
                        4 => dot::<4>(format, [r[0], r[1], r[2], r[3]], wrow(j)),
                        3 => crate::kernels::pad4(dot::<3>(format, [r[0], r[1], r[2]], wrow(j))),
                        2 => crate::kernels::pad4(dot::<2>(format, [r[0], r[1]], wrow(j))),
                        _ => crate::kernels::pad4(dot::<1>(format, [r[0]], wrow(j))),
                    }
                }
            }, |j, wr| {
                for (blk, o) in wrow(j).chunks_exact(format.block_bytes()).zip(wr.chunks_exact_mut(QK_K)) {
                    crate::kquants::dequantize_block(format, blk, o);
                }
            })
        })
    }

    /// The 4/5-bit formats on the f32 arithmetic (the exact path; Q4_1 and Q5_1 always).
    /// (Expanding a column block once into f32 for all groups of rows, instead of in registers
    /// per group, measured slower with `glassbox bench kernels` at k = 5632, where the block
    /// outgrows L2: 9.7 vs 7.2 ms at 32 rows.)
    fn matmul_dequantized(&self, x: &[f32], m: usize) -> Vec<f32> {
        let rows: Vec<&[f32]> = x.chunks_exact(self.k).collect();
        crate::pool::by_column_blocks(m, self.n, 64, |c0, c1, out| {
            exact_block(&rows, (c0, c1), out, self.k, |r: &[&[f32]], j| {
                // SAFETY: only called where AVX2 and FMA are present; rows are k long.
                unsafe { small_dot_group_avx2(r, &self.small_row(j)) }
            }, |j, wr| dequantize_small(&self.small_row(j), wr))
        })
    }

    /// Row `j`'s block mins (Q4_1, Q5_1), or `None` (Q4_0, Q5_0: a fixed offset instead).
    fn mins(&self, j: usize) -> Option<&[f32]> {
        let nb = self.k / QK;
        matches!(self.format, QFormat::Q4_1 | QFormat::Q5_1).then(|| &self.m[j * nb..(j + 1) * nb])
    }

    /// Row `j`'s fifth bits (Q5_x), or `None`.
    fn highs(&self, j: usize) -> Option<&[u32]> {
        let nb = self.k / QK;
        (!self.h.is_empty()).then(|| &self.h[j * nb..(j + 1) * nb])
    }

    /// Row `j` in the form the 4/5-bit kernels take.
    fn small_row(&self, j: usize) -> SmallRow<'_> {
        let nb = self.k / QK;
        SmallRow { d: &self.d[j * nb..(j + 1) * nb], m: self.mins(j), h: self.highs(j), q: &self.q[j * nb * QK / 2..(j + 1) * nb * QK / 2], offset: self.format.offset() }
    }

}

/// The integer path's weights: tiles of 16 interleaved rows.
#[derive(Debug)]
enum Packed {
    Small(Tiles),
    K(KTiles),
}

impl Packed {
    fn matmul_bt(&self, x: &[f32], m: usize) -> Vec<f32> {
        match self {
            Packed::Small(t) => t.matmul_bt(x, m),
            Packed::K(t) => t.matmul_bt(x, m),
        }
    }

    fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        match self {
            Packed::Small(t) => t.dequantize_row(j, out),
            Packed::K(t) => t.dequantize_row(j, out),
        }
    }
}

/// One column block (weight rows `c0..c1`) of an f32-arithmetic product, into `out`.
/// With AVX2, `fused(rows, j)` gives up to `GROUP` rows' results against weight row `j`
/// expanded in registers; without, `expand(j, row)` writes weight row `j` in f32 and the f32
/// kernel runs over it. The same numbers either way.
fn exact_block(
    rows: &[&[f32]],
    (c0, c1): (usize, usize),
    out: &Columns,
    k: usize,
    fused: impl Fn(&[&[f32]], usize) -> [f32; GROUP],
    expand: impl Fn(usize, &mut [f32]),
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::has_avx2() {
            for (g, group) in rows.chunks(GROUP).enumerate() {
                for j in c0..c1 {
                    for (r, v) in fused(group, j).iter().take(group.len()).enumerate() {
                        out.set(g * GROUP + r, j, *v);
                    }
                }
            }
            return;
        }
    }
    let _ = &fused;
    let mut w = vec![0f32; (c1 - c0) * k];
    for (wr, j) in w.chunks_exact_mut(k).zip(c0..c1) {
        expand(j, wr);
    }
    dot_all(rows, &w, k, out, c0);
}

/// Every input row against every expanded weight row of a column block (`w`: `width` rows of
/// `k`, the first being column `c0`), in groups of `GROUP` rows through the f32 kernel.
fn dot_all(rows: &[&[f32]], w: &[f32], k: usize, out: &Columns, c0: usize) {
    let mut i = 0;
    while i < rows.len() {
        let group = (rows.len() - i).min(GROUP);
        for (jj, wj) in w.chunks_exact(k).enumerate() {
            let vals = crate::kernels::dot_group(&rows[i..i + group], wj);
            for (g, v) in vals.iter().take(group).enumerate() {
                out.set(i + g, c0 + jj, *v);
            }
        }
        i += group;
    }
}

/// One weight row of a 4- or 5-bit format (32 weights per block).
struct SmallRow<'a> {
    d: &'a [f32],
    /// Per-block mins (Q4_1, Q5_1).
    m: Option<&'a [f32]>,
    /// Per-block fifth bits (Q5_0, Q5_1): bit `t` belongs to weight `t`.
    h: Option<&'a [u32]>,
    /// 16 bytes per block: low nibbles are weights 0-15, high nibbles 16-31.
    q: &'a [u8],
    /// Subtracted from every value (Q4_0: 8, Q5_0: 16) when there are no mins.
    offset: Option<i32>,
}

/// One 4/5-bit row into f32, exactly as candle's dequantize computes it (`q * d + m` as a
/// multiply then an add; `(q - offset) * d`), so the numbers match the f32 path bitwise.
fn dequantize_small(w: &SmallRow, out: &mut [f32]) {
    for (b, (wb, q)) in out.chunks_exact_mut(QK).zip(w.q.chunks_exact(QK / 2)).enumerate() {
        let high = w.h.map_or(0, |h| h[b]);
        for (t, y) in wb.iter_mut().enumerate() {
            let nib = if t < 16 { q[t] & 0x0F } else { q[t - 16] >> 4 };
            let v = nib as i32 | ((((high >> t) & 1) as i32) << 4);
            *y = match (w.m, w.offset) {
                (Some(m), _) => (v as f32) * w.d[b] + m[b],
                (None, off) => ((v - off.unwrap_or(0)) as f32) * w.d[b],
            };
        }
    }
}

/// Up to 4 rows against one 4/5-bit weight row, the weights expanded in registers: exactly the
/// arithmetic of `kernels::dot_rows_avx2` over `dequantize_small`'s values (each 16-chunk's
/// elements 0-7 into one 8-lane accumulator and 8-15 into another, one FMA each; then the
/// same reduction tree), so results are bitwise those of the f32 path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn small_dot_group_avx2(rows: &[&[f32]], w: &SmallRow) -> [f32; 4] {
    match rows.len() {
        4 => small_dot_rows_avx2::<4>([rows[0], rows[1], rows[2], rows[3]], w),
        3 => crate::kernels::pad4(small_dot_rows_avx2::<3>([rows[0], rows[1], rows[2]], w)),
        2 => crate::kernels::pad4(small_dot_rows_avx2::<2>([rows[0], rows[1]], w)),
        _ => crate::kernels::pad4(small_dot_rows_avx2::<1>([rows[0]], w)),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn small_dot_rows_avx2<const R: usize>(xs: [&[f32]; R], w: &SmallRow) -> [f32; R] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..w.d.len() {
        // The block's two 16-chunks: low nibbles (weights 0-15), then high (16-31).
        for c in 0..2 {
            let (w0, w1) = small_chunk_avx2(w, b, c);
            crate::kernels::fma_chunk16(&mut acc, &xs, b * QK + c * 16, w0, w1);
        }
    }
    crate::kernels::reduce_rows(acc)
}

/// Weights `32b + 16c .. +16` of a 4/5-bit row as two 8-lane vectors: `q * d + m`, or
/// `(q - offset) * d`, each value as `dequantize_small` computes it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn small_chunk_avx2(w: &SmallRow, b: usize, c: usize) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0F);
    let packed = _mm_loadu_si128(w.q.as_ptr().add(b * QK / 2) as *const __m128i);
    let nib = if c == 0 { _mm_and_si128(packed, low) } else { _mm_and_si128(_mm_srli_epi16(packed, 4), low) };
    let vd = _mm256_set1_ps(*w.d.get_unchecked(b));
    let high = w.h.map_or(0, |h| *h.get_unchecked(b));
    let expand = |nib: __m128i, t0: u32| {
        let mut v = _mm256_cvtepu8_epi32(nib);
        if w.h.is_some() {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let bits = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((high >> t0) as i32), lanes), _mm256_set1_epi32(1));
            v = _mm256_or_si256(v, _mm256_slli_epi32(bits, 4));
        }
        match w.m {
            Some(m) => _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), vd), _mm256_set1_ps(*m.get_unchecked(b))),
            None => _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, _mm256_set1_epi32(w.offset.unwrap_or(0)))), vd),
        }
    };
    let t0 = 16 * c as u32;
    (expand(nib, t0), expand(_mm_srli_si128(nib, 8), t0 + 8))
}




#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random GGUF bytes of `format` and the same weights in f32.
    fn random_matrix(format: QFormat, n: usize, k: usize, seed: u64) -> (QMatrix, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut data = vec![];
        let mut dense = vec![0f32; n * k];
        for blk in 0..n * k / QK {
            let d = f16::from_f32(rng.random_range(0.001f32..0.05));
            data.extend_from_slice(&d.to_le_bytes());
            let out = &mut dense[blk * QK..(blk + 1) * QK];
            match format {
                QFormat::Q8_0 => {
                    for o in out.iter_mut() {
                        let q: i8 = rng.random_range(-127..=127);
                        data.push(q as u8);
                        *o = d.to_f32() * q as f32;
                    }
                }
                QFormat::Q4_0 => {
                    let qs: Vec<u8> = (0..QK).map(|_| rng.random_range(0..16u8)).collect();
                    for j in 0..16 {
                        data.push(qs[j] | (qs[j + 16] << 4));
                    }
                    for (o, q) in out.iter_mut().zip(&qs) {
                        *o = ((*q as i16 - 8) as f32) * d.to_f32();
                    }
                }
                QFormat::Q4_1 => {
                    let m = f16::from_f32(rng.random_range(-0.4f32..0.0));
                    data.extend_from_slice(&m.to_le_bytes());
                    let qs: Vec<u8> = (0..QK).map(|_| rng.random_range(0..16u8)).collect();
                    for j in 0..16 {
                        data.push(qs[j] | (qs[j + 16] << 4));
                    }
                    for (o, q) in out.iter_mut().zip(&qs) {
                        *o = d.to_f32() * *q as f32 + m.to_f32();
                    }
                }
                QFormat::K(_) | QFormat::Q5_0 | QFormat::Q5_1 | QFormat::F16 | QFormat::BF16 => unreachable!("this format's test data comes from candle's quantizer"),
            }
        }
        (QMatrix::new(format, &data, n, k, false).unwrap(), dense)
    }

    /// `m * k` random values in [-2, 2).
    pub(crate) fn random_x(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// `w`'s product with random rows: bitwise the same alone as in a batch, and (`exact`)
    /// bitwise the f32 kernel's over `dense`, or else within 1% of it.
    fn check(w: &QMatrix, dense: &[f32], m: usize, exact: bool, label: &str) {
        check_product(label, (w.n, w.k), &random_x(m, w.k, 4), dense, |x, m| w.matmul_bt(x, m), exact);
    }

    /// What every quantized product must do, for `x` (rows of `k`) against `n` weight rows
    /// (`dense`: their dequantized values): a batch bitwise its rows alone, and (`exact`)
    /// bitwise the f32 kernel's product over `dense`, or else within 1% of it.
    pub(crate) fn check_product(label: &str, (n, k): (usize, usize), x: &[f32], dense: &[f32], matmul: impl Fn(&[f32], usize) -> Vec<f32>, exact: bool) {
        let m = x.len() / k;
        let batched = matmul(x, m);
        for i in 0..m {
            let alone = matmul(&x[i * k..(i + 1) * k], 1);
            assert!(alone.iter().zip(&batched[i * n..(i + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits()), "{label}: row {i} differs in a batch");
        }
        let f32_path = crate::kernels::matmul_bt(x, dense, m, k, n);
        if exact {
            assert!(f32_path.iter().zip(&batched).all(|(a, b)| a.to_bits() == b.to_bits()), "{label} must equal the f32 path bitwise");
        } else {
            let (num, den) = f32_path.iter().zip(&batched).fold((0f64, 0f64), |(a, b), (e, g)| (a + ((e - g) as f64).powi(2), b + (*e as f64).powi(2)));
            assert!((num / den).sqrt() < 0.01, "{label}: relative error {}", (num / den).sqrt());
        }
    }

    #[test]
    fn four_bit_expansion_is_candles_dequantization() {
        for format in [QFormat::Q4_1, QFormat::Q4_0] {
            let (w, dense) = random_matrix(format, 3, 96, 5);
            let mut a = vec![0f32; 3 * 96];
            for j in 0..3 {
                dequantize_small(&w.small_row(j), &mut a[j * 96..(j + 1) * 96]);
            }
            assert!(a.iter().zip(&dense).all(|(x, z)| x.to_bits() == z.to_bits()), "{format:?}");
        }
    }

    /// Q5_0 and Q5_1 from candle's own quantizer: our expansion is its dequantization, and the
    /// product is the f32 path's bitwise, alone or batched.
    #[test]
    fn five_bit_formats_are_the_f32_path_bitwise() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        for (format, dtype) in [(QFormat::Q5_0, GgmlDType::Q5_0), (QFormat::Q5_1, GgmlDType::Q5_1)] {
            let (n, k, m) = (70, 320, 6);
            let vals = random_x(n, k, 12);
            let q = QTensor::quantize(&Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
            let dense: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let w = QMatrix::new(format, &q.data().unwrap(), n, k, false).unwrap();
            let mut ours = vec![0f32; n * k];
            for j in 0..n {
                dequantize_small(&w.small_row(j), &mut ours[j * k..(j + 1) * k]);
            }
            assert!(ours.iter().zip(&dense).all(|(a, b)| a.to_bits() == b.to_bits()), "{format:?}: dequantization");
            check(&w, &dense, m, true, &format!("{format:?}"));
        }
    }

    /// 16-bit float weights: rows read back as candle widens them, and products bitwise the
    /// f32 kernel's over the widened matrix (a k with a tail past the 16-chunks, one row and
    /// a batch), batch invariant; GPT-NeoX's row permutation moves whole rows.
    #[test]
    fn half_weights_are_the_f32_path_bitwise() {
        use candle_core::{DType, Device, Tensor};
        for (dtype, format) in [(DType::F16, QFormat::F16), (DType::BF16, QFormat::BF16)] {
            for (n, k, m) in [(70, 256, 6), (9, 37, 5)] {
                let t = Tensor::from_vec(random_x(n, k, 5), (n, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let dense: Vec<f32> = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let bytes: Vec<u8> = match dtype {
                    DType::F16 => t.flatten_all().unwrap().to_vec1::<f16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
                    _ => t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
                };
                let w = QMatrix::new(format, &bytes, n, k, true).unwrap();
                let mut row = vec![0f32; k];
                w.dequantize_row(3, &mut row);
                assert_eq!(row, dense[3 * k..4 * k], "{format:?}");
                check(&w, &dense, m, true, &format!("{format:?} {n}x{k}"));
                let p = w.permute_rows(|r| n - 1 - r).unwrap();
                p.dequantize_row(n - 1, &mut row);
                assert_eq!(row, dense[..k], "{format:?} permuted");
            }
        }
    }

    #[test]
    fn row_lookup_is_candles_dequantization() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let (n, k) = (5, 512);
            let q = QTensor::quantize(&Tensor::from_vec(random_x(n, k, 21), (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
            let dense: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for integer in [false, true] {
                let w = QMatrix::new(QMatrix::format_of(dtype).unwrap(), &q.data().unwrap(), n, k, integer).unwrap();
                let mut row = vec![0f32; k];
                for j in 0..n {
                    w.dequantize_row(j, &mut row);
                    assert!(row.iter().zip(&dense[j * k..(j + 1) * k]).all(|(a, b)| a.to_bits() == b.to_bits()), "{dtype:?} row {j}");
                }
            }
        }
    }

    #[test]
    fn kquants_are_the_f32_path_bitwise_and_batch_invariant() {
        use crate::kquants::KFormat;
        for format in [KFormat::Q4K, KFormat::Q5K, KFormat::Q6K] {
            let (n, k, m) = (70, 512, 6);
            let (data, dense) = crate::kquants::tests_support::random(format, n, k, 9);
            let w = QMatrix::new(QFormat::K(format), &data, n, k, false).unwrap();
            check(&w, &dense, m, true, &format!("{format:?}"));
        }
    }

    #[test]
    fn batch_invariant_and_close_to_the_dense_product() {
        for format in [QFormat::Q8_0, QFormat::Q4_1, QFormat::Q4_0] {
            let (w, dense) = random_matrix(format, 130, 576, 3);
            // Q4_x: the f32 path's numbers over the dequantized weights; Q8_0: only the 8-bit
            // activations differ (~1%).
            check(&w, &dense, 9, format != QFormat::Q8_0, &format!("{format:?}"));
        }
    }
}
