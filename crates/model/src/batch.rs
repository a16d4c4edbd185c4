//! The flat, ragged batch of one forward pass, and the KV cache interface attention reads through.

use crate::error::{ModelError, Result};
pub use crate::attention::{KvRows, KvView};
use std::collections::HashMap;
use std::ops::Range;

/// One sequence's slice of the step: rows `start..start+len` of the flat batch, holding the
/// tokens at absolute positions `pos..pos+len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSpan {
    /// Identifies the sequence to the KV cache and to hook handlers.
    pub key: u64,
    pub start: usize,
    pub len: usize,
    pub pos: usize,
}

impl SeqSpan {
    /// Context length after this step: every position this step's rows attend to.
    pub fn ctx_len(&self) -> usize {
        self.pos + self.len
    }
}

/// Which rows of a sequence need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    None,
    Last,
    All,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchLayout {
    pub seqs: Vec<SeqSpan>,
    /// Absolute position of every row.
    pub positions: Vec<u32>,
    /// Rows whose logits are computed, in order (a subset of `0..n_tokens`).
    pub logit_rows: Vec<usize>,
}

impl BatchLayout {
    /// Append a sequence of `len` tokens starting at absolute position `pos`.
    pub fn push(&mut self, key: u64, len: usize, pos: usize, logits: LogitRows) {
        let start = self.positions.len();
        self.seqs.push(SeqSpan { key, start, len, pos });
        self.positions.extend((pos..pos + len).map(|p| p as u32));
        match logits {
            LogitRows::None => {}
            LogitRows::Last if len > 0 => self.logit_rows.push(start + len - 1),
            LogitRows::Last => {}
            LogitRows::All => self.logit_rows.extend(start..start + len),
        }
    }

    pub fn single(len: usize, pos: usize, logits: LogitRows) -> Self {
        let mut b = BatchLayout::default();
        b.push(0, len, pos, logits);
        b
    }

    pub fn n_tokens(&self) -> usize {
        self.positions.len()
    }

    /// For sequence `i`: where its rows start in the logits tensor, and which batch rows they are.
    pub fn logit_range(&self, i: usize) -> (usize, Range<usize>) {
        let seq = &self.seqs[i];
        let first = self.logit_rows.partition_point(|&r| r < seq.start);
        let end = self.logit_rows.partition_point(|&r| r < seq.start + seq.len);
        let rows = if first < end { self.logit_rows[first]..self.logit_rows[end - 1] + 1 } else { 0..0 };
        (first, rows)
    }
}

/// `len` rows of `width` values, `stride` apart from the start of `data`: a column range of a
/// wider row-major buffer (k within a fused q/k/v projection's rows), read without a copy.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    data: &'a [f32],
    stride: usize,
    width: usize,
    len: usize,
}

impl<'a> Rows<'a> {
    /// Columns `cols` of every row of `buf` (rows of `stride` values).
    pub fn columns(buf: &'a [f32], stride: usize, cols: Range<usize>) -> Rows<'a> {
        assert!(cols.start <= cols.end && cols.end <= stride, "columns {cols:?} outside rows of {stride}");
        let len = buf.len() / stride.max(1);
        Rows { data: &buf[cols.start.min(buf.len())..], stride, width: cols.len(), len }
    }

    /// Rows of `width` values one after another.
    pub fn contiguous(buf: &'a [f32], width: usize) -> Rows<'a> {
        Rows::columns(buf, width, 0..width)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn row(&self, i: usize) -> &'a [f32] {
        assert!(i < self.len, "row {i} of {}", self.len);
        &self.data[i * self.stride..i * self.stride + self.width]
    }

    /// Rows `start..start + len`.
    pub fn slice(&self, start: usize, len: usize) -> Rows<'a> {
        assert!(start + len <= self.len, "rows {start}..{} of {}", start + len, self.len);
        Rows { data: &self.data[(start * self.stride).min(self.data.len())..], stride: self.stride, width: self.width, len }
    }
}

/// Where attention keeps keys and values. Implementations: [`ContiguousKvCache`] here, the
/// paged cache in the engine.
pub trait KvCache {
    /// Store one step's keys and values (`seq.len` rows of `kv_heads * head_dim`) at `seq.pos..`.
    fn write(&mut self, layer: usize, seq: &SeqSpan, k: Rows, v: Rows) -> Result<()>;
    /// The keys and values of positions `0..seq.ctx_len()`.
    fn view(&self, layer: usize, seq: &SeqSpan) -> Result<KvView<'_>>;
}

/// A growable per-sequence cache (one block as long as the sequence): for single-sequence use
/// and tests.
#[derive(Default)]
pub struct ContiguousKvCache {
    /// (key, layer) -> (k rows, v rows)
    data: HashMap<(u64, usize), (Vec<f32>, Vec<f32>)>,
}

/// The single "block" of a contiguous sequence.
const WHOLE: [u32; 1] = [0];

impl ContiguousKvCache {
    pub fn remove(&mut self, key: u64) {
        self.data.retain(|(k, _), _| *k != key);
    }
}

impl KvCache for ContiguousKvCache {
    fn write(&mut self, layer: usize, seq: &SeqSpan, k: Rows, v: Rows) -> Result<()> {
        let width = k.width();
        let entry = self.data.entry((seq.key, layer)).or_default();
        if entry.0.len() < seq.pos * width {
            return Err(ModelError::BadConfig(format!("kv cache gap: writing position {} after {}", seq.pos, entry.0.len() / width.max(1))));
        }
        entry.0.truncate(seq.pos * width);
        entry.1.truncate(seq.pos * width);
        for i in 0..k.len().min(v.len()) {
            entry.0.extend_from_slice(k.row(i));
            entry.1.extend_from_slice(v.row(i));
        }
        Ok(())
    }

    fn view(&self, layer: usize, seq: &SeqSpan) -> Result<KvView<'_>> {
        let (k, v) = self
            .data
            .get(&(seq.key, layer))
            .ok_or_else(|| ModelError::BadConfig(format!("kv cache has no sequence {}", seq.key)))?;
        let row = k.len() / seq.ctx_len().max(1);
        Ok(KvView { k: KvRows::F32(k), v: KvRows::F32(v), block_table: &WHOLE, block_size: usize::MAX, row })
    }
}
