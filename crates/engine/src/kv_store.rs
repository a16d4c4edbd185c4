//! The tensor side of the paged KV cache: one buffer per layer for keys and one for values,
//! `[num_blocks, block_size, kv_heads * head_dim]`, in f32 or f16 (`KvDtype`). Attention
//! reads it through block tables.

use glassbox_model::batch::{KvCache, KvRows, KvView, Rows, SeqSpan};
use glassbox_model::{ModelError, Result};
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The KV cache's element type. `f16` halves the cache (twice the tokens in the same memory)
/// and what attention reads per step; keys and values are rounded to f16 when stored (as
/// llama.cpp's default cache does), so attention's numbers move by that rounding. `f32`
/// keeps them exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(KvDtype::F32),
            "f16" | "float16" | "half" => Ok(KvDtype::F16),
            _ => Err(format!("unknown KV cache dtype `{s}`: use f32 or f16")),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        })
    }
}

/// One layer's keys or values. f16 is held as its bits, so a large budget is one zeroed
/// allocation the OS maps lazily, as for f32.
enum Buf {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

impl Buf {
    fn zeroed(dtype: KvDtype, size: usize) -> Buf {
        match dtype {
            KvDtype::F32 => Buf::F32(vec![0.0; size]),
            KvDtype::F16 => Buf::F16(vec![0; size]),
        }
    }

    fn store(&mut self, at: usize, rows: &[f32]) {
        match self {
            Buf::F32(b) => b[at..at + rows.len()].copy_from_slice(rows),
            // Round to nearest even, as `f16::from_f32`.
            Buf::F16(b) => b[at..at + rows.len()].reinterpret_cast_mut::<f16>().convert_from_f32_slice(rows),
        }
    }

    fn rows(&self) -> KvRows<'_> {
        match self {
            Buf::F32(b) => KvRows::F32(b),
            Buf::F16(b) => KvRows::F16(b.reinterpret_cast::<f16>()),
        }
    }
}

pub struct KvStore {
    k: Vec<Buf>,
    v: Vec<Buf>,
    block_size: usize,
    /// Elements per token per layer (kv_heads * head_dim).
    row: usize,
}

impl KvStore {
    pub fn new(num_layers: usize, num_blocks: usize, block_size: usize, row: usize, dtype: KvDtype) -> Self {
        let size = num_blocks * block_size * row;
        // One zeroed allocation per buffer (not clones): the OS maps pages lazily, so a large
        // budget costs nothing until it is used.
        let zeroed = || (0..num_layers).map(|_| Buf::zeroed(dtype, size)).collect::<Vec<_>>();
        KvStore { k: zeroed(), v: zeroed(), block_size, row }
    }

    /// Bytes one block takes across all layers (keys and values).
    pub fn bytes_per_block(num_layers: usize, block_size: usize, row: usize, dtype: KvDtype) -> usize {
        2 * num_layers * block_size * row * dtype.bytes()
    }

    /// This step's view: the store plus every scheduled sequence's block table.
    pub fn with_tables<'a>(&'a mut self, tables: &'a HashMap<u64, Vec<u32>>) -> PagedKv<'a> {
        PagedKv { store: self, tables }
    }
}

pub struct PagedKv<'a> {
    store: &'a mut KvStore,
    tables: &'a HashMap<u64, Vec<u32>>,
}

impl<'a> PagedKv<'a> {
    /// Sequence `key`'s block table, borrowed from the tables (not from the store, which
    /// `write` changes meanwhile).
    fn table(&self, key: u64) -> Result<&'a [u32]> {
        let tables: &'a HashMap<u64, Vec<u32>> = self.tables;
        tables.get(&key).map(Vec::as_slice).ok_or_else(|| ModelError::BadConfig(format!("no block table for sequence {key}")))
    }
}

impl KvCache for PagedKv<'_> {
    fn write(&mut self, layer: usize, seq: &SeqSpan, k: Rows, v: Rows) -> Result<()> {
        let (bs, row) = (self.store.block_size, self.store.row);
        if k.width() != row || v.width() != row || k.len() < seq.len || v.len() < seq.len {
            return Err(ModelError::BadConfig(format!("kv rows of {} and {} values for a cache of {row}", k.width(), v.width())));
        }
        let table = self.table(seq.key)?;
        for i in 0..seq.len {
            let p = seq.pos + i;
            let b = *table.get(p / bs).ok_or_else(|| ModelError::BadConfig(format!("position {p} has no block")))? as usize;
            let o = (b * bs + p % bs) * row;
            self.store.k[layer].store(o, k.row(i));
            self.store.v[layer].store(o, v.row(i));
        }
        Ok(())
    }

    fn view(&self, layer: usize, seq: &SeqSpan) -> Result<KvView<'_>> {
        Ok(KvView {
            k: self.store.k[layer].rows(),
            v: self.store.v[layer].rows(),
            block_table: self.table(seq.key)?,
            block_size: self.store.block_size,
            row: self.store.row,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f16 storage rounds to nearest even and reads back what it stored; f32 is exact.
    #[test]
    fn rows_round_trip() {
        let rows = [1.0f32, 1.0 + 1e-4, -65504.0, 1.3337, 0.0, 1e-8];
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut b = Buf::zeroed(dtype, 16);
            b.store(5, &rows);
            let mut out = [0f32; 6];
            let got: Vec<f32> = match b.rows() {
                KvRows::F32(v) => v[5..11].to_vec(),
                KvRows::F16(v) => {
                    v[5..11].convert_to_f32_slice(&mut out);
                    out.to_vec()
                }
            };
            let want: Vec<f32> = rows.iter().map(|&x| if dtype == KvDtype::F16 { f16::from_f32(x).to_f32() } else { x }).collect();
            assert_eq!(got, want, "{dtype}");
        }
        assert_eq!("F16".parse::<KvDtype>(), Ok(KvDtype::F16));
        assert!("bf16".parse::<KvDtype>().is_err());
    }
}
