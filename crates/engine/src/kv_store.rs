//! The tensor side of the paged KV cache: one buffer per layer for keys and one for values,
//! `[num_blocks, block_size, kv_heads * head_dim]`. Attention reads it through block tables.

use glassbox_model::batch::{KvCache, KvView, SeqSpan};
use glassbox_model::{ModelError, Result};
use std::collections::HashMap;

pub struct KvStore {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    block_size: usize,
    /// Floats per token per layer (kv_heads * head_dim).
    row: usize,
}

impl KvStore {
    pub fn new(num_layers: usize, num_blocks: usize, block_size: usize, row: usize) -> Self {
        let size = num_blocks * block_size * row;
        // One zeroed allocation per buffer (not clones): the OS maps pages lazily, so a large
        // budget costs nothing until it is used.
        let zeroed = || (0..num_layers).map(|_| vec![0.0f32; size]).collect::<Vec<_>>();
        KvStore { k: zeroed(), v: zeroed(), block_size, row }
    }

    /// Bytes one block takes across all layers (keys and values).
    pub fn bytes_per_block(num_layers: usize, block_size: usize, row: usize) -> usize {
        2 * num_layers * block_size * row * std::mem::size_of::<f32>()
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

impl PagedKv<'_> {
    fn table(&self, key: u64) -> Result<&[u32]> {
        self.tables.get(&key).map(Vec::as_slice).ok_or_else(|| ModelError::BadConfig(format!("no block table for sequence {key}")))
    }
}

impl KvCache for PagedKv<'_> {
    fn write(&mut self, layer: usize, seq: &SeqSpan, k: &[f32], v: &[f32]) -> Result<()> {
        let (bs, row) = (self.store.block_size, self.store.row);
        let table = self.table(seq.key)?.to_vec();
        for i in 0..seq.len {
            let p = seq.pos + i;
            let b = *table.get(p / bs).ok_or_else(|| ModelError::BadConfig(format!("position {p} has no block")))? as usize;
            let o = (b * bs + p % bs) * row;
            self.store.k[layer][o..o + row].copy_from_slice(&k[i * row..(i + 1) * row]);
            self.store.v[layer][o..o + row].copy_from_slice(&v[i * row..(i + 1) * row]);
        }
        Ok(())
    }

    fn view(&self, layer: usize, seq: &SeqSpan) -> Result<KvView<'_>> {
        Ok(KvView {
            k: &self.store.k[layer],
            v: &self.store.v[layer],
            block_table: self.table(seq.key)?,
            block_size: self.store.block_size,
            row: self.store.row,
        })
    }
}
