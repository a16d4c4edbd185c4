//! KV block bookkeeping: which block holds which tokens, who uses it, what is cached.
//!
//! Architecture invariant: nothing here touches a tensor. A block is an index into the
//! storage in `kv_store`; this module decides which indices a sequence owns.
//!
//! Prefix caching as in vLLM v1: a full block is named by the hash of its tokens and its
//! parent's hash. Blocks nobody references stay cached in an LRU free queue until the space is
//! needed. The 64-bit hash only finds a candidate: a hit is taken only if the block's tokens,
//! salt and parent block are the ones asked for, so a crafted collision can never serve one
//! prompt another prompt's KV.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

pub type BlockId = u32;
pub type BlockHash = u64;

#[derive(Clone, Debug, Default)]
struct Block {
    refs: u32,
    /// What the block holds, once it is full and registered.
    cached_as: Option<CachedKey>,
    /// Position in the free queue, while free.
    free_stamp: Option<u64>,
}

/// Exactly what a cached block holds: checked on every hit.
#[derive(Clone, Debug, PartialEq)]
struct CachedKey {
    hash: BlockHash,
    parent: Option<BlockId>,
    salt: u64,
    tokens: Vec<u32>,
}

/// All blocks of the cache.
pub struct BlockPool {
    pub block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks by the time they were freed: the oldest is reused (and its cache entry
    /// evicted) first.
    free: BTreeMap<u64, BlockId>,
    next_stamp: u64,
    cached: HashMap<BlockHash, BlockId>,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let mut pool = BlockPool {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            free: BTreeMap::new(),
            next_stamp: 0,
            cached: HashMap::new(),
            prefix_queries: 0,
            prefix_hits: 0,
        };
        for b in 0..num_blocks as BlockId {
            pool.push_free(b);
        }
        pool
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Full blocks registered in the prefix cache.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks referenced by some sequence.
    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.free.len()
    }

    fn push_free(&mut self, b: BlockId) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.blocks[b as usize].free_stamp = Some(stamp);
        self.free.insert(stamp, b);
    }

    fn take_from_free(&mut self, b: BlockId) {
        if let Some(stamp) = self.blocks[b as usize].free_stamp.take() {
            self.free.remove(&stamp);
        }
    }

    /// `n` fresh blocks, evicting the least recently freed cached blocks; `None` if too few.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if self.free.len() < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, b) = self.free.pop_first()?;
            let block = &mut self.blocks[b as usize];
            block.free_stamp = None;
            if let Some(key) = block.cached_as.take() {
                if self.cached.get(&key.hash) == Some(&b) {
                    self.cached.remove(&key.hash);
                }
            }
            block.refs = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Release blocks; the tail of a sequence goes first so it is evicted first.
    pub fn free(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            let block = &mut self.blocks[b as usize];
            debug_assert!(block.refs > 0, "double free of block {b}");
            block.refs = block.refs.saturating_sub(1);
            if block.refs == 0 {
                self.push_free(b);
            }
        }
    }

    /// The longest run of cached full blocks for `tokens` (whose block hashes are `hashes`);
    /// each block found is referenced. A block counts only if it holds exactly these tokens,
    /// with this salt, after the block found before it.
    pub fn lookup_prefix(&mut self, hashes: &[BlockHash], tokens: &[u32], salt: u64) -> Vec<BlockId> {
        let mut hit: Vec<BlockId> = Vec::new();
        for (h, chunk) in hashes.iter().zip(tokens.chunks_exact(self.block_size)) {
            let Some(&b) = self.cached.get(h) else { break };
            let same = self.blocks[b as usize]
                .cached_as
                .as_ref()
                .is_some_and(|k| k.parent == hit.last().copied() && k.salt == salt && k.tokens == chunk);
            if !same {
                break;
            }
            self.take_from_free(b);
            self.blocks[b as usize].refs += 1;
            hit.push(b);
        }
        hit
    }

    /// Count an admitted sequence's lookup: full prompt blocks asked for, and found.
    pub fn record_lookup(&mut self, asked: usize, found: usize) {
        self.prefix_queries += asked as u64;
        self.prefix_hits += found as u64;
    }

    /// Record that block `b` now holds the full block `tokens` (named `hash`), after block
    /// `parent` of the same sequence.
    pub fn register(&mut self, b: BlockId, hash: BlockHash, parent: Option<BlockId>, tokens: &[u32], salt: u64) {
        let block = &mut self.blocks[b as usize];
        if block.cached_as.is_some() {
            return;
        }
        block.cached_as = Some(CachedKey { hash, parent, salt, tokens: tokens.to_vec() });
        self.cached.entry(hash).or_insert(b);
    }

    pub fn hit_rate(&self) -> f64 {
        if self.prefix_queries == 0 {
            0.0
        } else {
            self.prefix_hits as f64 / self.prefix_queries as f64
        }
    }
}

/// Hash of a full block: its tokens, its parent's hash, and a salt that separates requests
/// whose KV differs for the same tokens (steering, say).
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32], salt: u64) -> BlockHash {
    // Fixed keys: the same tokens hash alike for the life of the process (all a cache needs).
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    salt.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Hashes of every full block of `tokens`.
pub fn block_hashes(tokens: &[u32], block_size: usize, salt: u64) -> Vec<BlockHash> {
    let mut parent = None;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            let h = block_hash(parent, chunk, salt);
            parent = Some(h);
            h
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_survive_until_space_is_needed() {
        let mut pool = BlockPool::new(4, 2);
        let tokens = [1, 2, 3, 4, 5];
        let hashes = block_hashes(&tokens, 2, 0);
        assert_eq!(hashes.len(), 2);
        let a = pool.allocate(3).unwrap();
        pool.register(a[0], hashes[0], None, &tokens[0..2], 0);
        pool.register(a[1], hashes[1], Some(a[0]), &tokens[2..4], 0);
        pool.free(&a);
        assert_eq!(pool.num_free(), 4);
        // Same prefix: both full blocks come back.
        assert_eq!(pool.lookup_prefix(&hashes, &tokens, 0), vec![a[0], a[1]]);
        assert_eq!(pool.num_free(), 2);
        pool.free(&[a[0], a[1]]);
        // Allocating everything evicts the cache.
        let all = pool.allocate(4).unwrap();
        assert_eq!(all.len(), 4);
        pool.free(&all);
        assert!(pool.lookup_prefix(&hashes, &tokens, 0).is_empty());
        assert!(pool.allocate(5).is_none());
    }

    #[test]
    fn a_hash_collision_is_never_a_hit() {
        // Another prompt whose blocks (crafted, or by chance) hash like ours must not get our KV:
        // same hashes, other tokens, other salt, or another parent are all misses.
        let mut pool = BlockPool::new(4, 2);
        let tokens = [1, 2, 3, 4];
        let hashes = block_hashes(&tokens, 2, 0);
        let a = pool.allocate(2).unwrap();
        pool.register(a[0], hashes[0], None, &tokens[0..2], 0);
        pool.register(a[1], hashes[1], Some(a[0]), &tokens[2..4], 0);
        pool.free(&a);
        assert!(pool.lookup_prefix(&hashes, &[9, 9, 3, 4], 0).is_empty(), "other tokens under the same hash");
        assert!(pool.lookup_prefix(&hashes, &tokens, 7).is_empty(), "other salt under the same hash");
        assert_eq!(pool.lookup_prefix(&hashes, &[1, 2, 9, 9], 0), vec![a[0]], "second block differs");
        pool.free(&[a[0]]);
        // The second block alone, asked for as a first block (no parent): a miss.
        assert!(pool.lookup_prefix(&hashes[1..], &tokens[2..4], 0).is_empty());
        assert_eq!(pool.lookup_prefix(&hashes, &tokens, 0), vec![a[0], a[1]]);
    }

    #[test]
    fn salt_and_parent_change_the_hash() {
        assert_ne!(block_hashes(&[1, 2], 2, 0), block_hashes(&[1, 2], 2, 1));
        let a = block_hashes(&[1, 2, 3, 4], 2, 0);
        let b = block_hashes(&[9, 9, 3, 4], 2, 0);
        assert_ne!(a[1], b[1]);
    }
}
