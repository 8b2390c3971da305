//! The KV cache as a paged arena: one allocation made at load, cut in blocks
//! of [`BLOCK`] positions; a sequence holds a table of block numbers and
//! gives its blocks back when it ends (its state is dropped). Memory is
//! bounded by the configured batch × context and never allocated per token.
//!
//! A block holds every layer's keys and values for its positions, laid out
//! `[layer][key|value][kv head][position in block][head dim]`, so one head's
//! keys for a block are contiguous (what the attention loop reads).

use std::sync::{Arc, Mutex};

/// Positions per block.
pub const BLOCK: usize = 16;

/// What one block holds.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Floats in one block.
    pub fn block_floats(&self) -> usize {
        self.layers * 2 * self.kv_heads * BLOCK * self.head_dim
    }
}

/// The free blocks, shared with the sequences so they can return theirs.
#[derive(Debug)]
pub struct BlockPool {
    free: Mutex<Vec<u32>>,
    total: usize,
}

impl BlockPool {
    fn new(total: usize) -> Arc<BlockPool> {
        Arc::new(BlockPool {
            free: Mutex::new((0..total as u32).rev().collect()),
            total,
        })
    }

    /// Blocks not held by any sequence.
    #[cfg(test)]
    fn free_blocks(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The cache memory itself; only the engine step (holding the work lock) touches it.
#[derive(Debug)]
pub struct KvArena {
    data: Vec<f32>,
    shape: KvShape,
}

impl KvArena {
    /// An arena of `blocks` blocks and the pool handing them out.
    pub fn new(shape: KvShape, blocks: usize) -> (KvArena, Arc<BlockPool>) {
        (
            KvArena {
                data: vec![0f32; blocks * shape.block_floats()],
                shape,
            },
            BlockPool::new(blocks),
        )
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    fn slab_at(&self, block: u32, layer: usize, value: bool, head: usize) -> usize {
        let s = &self.shape;
        let slab = BLOCK * s.head_dim;
        block as usize * s.block_floats()
            + ((layer * 2 + value as usize) * s.kv_heads + head) * slab
    }

    /// One head's keys (`value` false) or values of a block: `[BLOCK][head_dim]`.
    pub fn slab(&self, block: u32, layer: usize, value: bool, head: usize) -> &[f32] {
        let at = self.slab_at(block, layer, value, head);
        &self.data[at..at + BLOCK * self.shape.head_dim]
    }

    /// Store one position's key or value for a head.
    pub fn put(
        &mut self,
        seq: &SeqBlocks,
        pos: usize,
        layer: usize,
        value: bool,
        head: usize,
        x: &[f32],
    ) {
        let hd = self.shape.head_dim;
        let at = self.slab_at(seq.table[pos / BLOCK], layer, value, head) + (pos % BLOCK) * hd;
        self.data[at..at + hd].copy_from_slice(x);
    }
}

/// A sequence's blocks; dropping it returns them to the pool.
#[derive(Debug)]
pub struct SeqBlocks {
    pub table: Vec<u32>,
    pool: Arc<BlockPool>,
}

/// No block left: more sequences or longer ones than the arena was sized for.
#[derive(Debug, thiserror::Error)]
#[error("the KV cache is full ({total} blocks of {BLOCK} positions in use); raise max_batch or lower max_context")]
pub struct CacheFull {
    total: usize,
}

impl SeqBlocks {
    /// An empty table with room for `max_len` positions (allocated once).
    pub fn new(pool: &Arc<BlockPool>, max_len: usize) -> SeqBlocks {
        SeqBlocks {
            table: Vec::with_capacity(max_len.div_ceil(BLOCK)),
            pool: pool.clone(),
        }
    }

    /// Hold enough blocks for `len` positions.
    pub fn reserve(&mut self, len: usize) -> Result<(), CacheFull> {
        let need = len.div_ceil(BLOCK);
        if need <= self.table.len() {
            return Ok(());
        }
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < need - self.table.len() {
            return Err(CacheFull {
                total: self.pool.total,
            });
        }
        while self.table.len() < need {
            self.table.push(free.pop().expect("counted above"));
        }
        Ok(())
    }
}

impl Drop for SeqBlocks {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        free.extend(self.table.drain(..));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_reserved_and_returned() {
        let shape = KvShape {
            layers: 2,
            kv_heads: 1,
            head_dim: 4,
        };
        let (mut arena, pool) = KvArena::new(shape, 3);
        let mut a = SeqBlocks::new(&pool, 64);
        a.reserve(BLOCK + 1).unwrap();
        assert_eq!(pool.free_blocks(), 1);
        let mut b = SeqBlocks::new(&pool, 64);
        assert!(b.reserve(2 * BLOCK).is_err(), "only one block left");
        b.reserve(BLOCK).unwrap();
        arena.put(&a, BLOCK, 1, true, 0, &[1.0, 2.0, 3.0, 4.0]);
        arena.put(&b, 0, 1, true, 0, &[5.0; 4]);
        assert_eq!(
            &arena.slab(a.table[1], 1, true, 0)[..4],
            &[1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(&arena.slab(b.table[0], 1, true, 0)[..4], &[5.0; 4]);
        assert_eq!(
            arena.slab(a.table[1], 0, true, 0)[..4],
            [0.0; 4],
            "other layer untouched"
        );
        drop(a);
        assert_eq!(pool.free_blocks(), 2);
        drop(b);
        assert_eq!(pool.free_blocks(), 3);
    }
}
