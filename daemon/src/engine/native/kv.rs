//! The KV cache as a paged arena: one allocation made at load, cut in blocks
//! of [`BLOCK`] positions; a sequence holds a table of block numbers and
//! gives its blocks back when it ends (its state is dropped). Memory is
//! bounded by the configured batch × context and never allocated per token.
//!
//! Prefix reuse: a full block is named by a hash of all tokens up to its end
//! (the chain of its predecessors' hashes and its own tokens). When a
//! sequence fills a block it registers that name; a new sequence whose prompt
//! starts with the same tokens takes the registered blocks (reference
//! counted) instead of computing them again. A full block is never written
//! again, so sharing needs no copying. Blocks no sequence holds stay cached
//! until their memory is needed (least recently released first).
//!
//! A block holds every layer's keys and values for its positions, laid out
//! `[layer][key|value][kv head]`, then values `[position in block][head dim]`
//! and keys transposed, `[head dim][position in block]`: one head's block is
//! contiguous, and a score kernel computes all of a block's scores in one
//! vector with no horizontal sums (`ember_kernels::generic::qk_f32`).
//!
//! The values are f32, or IEEE half precision when the model is loaded with
//! `kv_cache = "f16"`: narrowed once when written (scalar, round to nearest
//! even, the same bits on every machine) and widened exactly into a scratch
//! slab when read, so the attention kernels stay f32. That halves the memory
//! and the bytes a step of long sequences reads, which is what limits a
//! batch on small models. With `kv_cache = "i8"` each head's keys or values
//! at a position are int8 with one f32 scale (`max |x| / 127`), quantized
//! once when written (`quantize_i8`, the same bytes on every machine) and
//! read as stored by integer kernels: scores against the query quantized
//! the same way (`qk_q8`), for which an int8 block's keys lie in groups of
//! 4 dimensions, `[head dim / 4][position in block][4]`, and the weighted
//! sum with the weights quantized to u8 per block (`pv_q8`), for which the
//! values lie in groups of 4 positions, `[position / 4][head dim][4]`. A
//! quarter of the f32 bytes plus the scales.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use ember_kernels::generic::{f32_to_f16, to_f16, KEY_GROUP};
use ember_kernels::pages::Pages;
use ember_kernels::{mem, Kernels};

use crate::engine::KvType;

/// Positions per block: what the score kernel takes at once.
pub const BLOCK: usize = ember_kernels::generic::KEY_BLOCK;

/// A slab as [`KvArena::read`] hands it to attention.
#[derive(Debug, Clone, Copy)]
pub enum SlabView<'a> {
    F32(&'a [f32]),
    /// Int8 values and each position's scale; keys in groups of
    /// [`KEY_GROUP`] dimensions (see the module docs).
    I8(&'a [i8], &'a [f32; BLOCK]),
}

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

/// Block bookkeeping, shared with the sequences so they can return theirs.
#[derive(Debug)]
pub struct BlockPool {
    state: Mutex<PoolState>,
    total: usize,
}

#[derive(Debug)]
struct PoolState {
    /// Blocks holding nothing.
    free: Vec<u32>,
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Registered full blocks by prefix hash, and each block's hash.
    by_hash: HashMap<u64, u32>,
    hash_of: Vec<Option<u64>>,
    /// Registered blocks no sequence holds, least recently released first.
    idle: VecDeque<u32>,
}

impl PoolState {
    /// A block to write: a free one, else the oldest idle cached one.
    fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.idle.pop_front()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.by_hash.remove(&h);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        *r -= 1;
        if *r == 0 {
            if self.hash_of[b as usize].is_some() {
                self.idle.push_back(b);
            } else {
                self.free.push(b);
            }
        }
    }
}

impl BlockPool {
    fn new(total: usize) -> Arc<BlockPool> {
        Arc::new(BlockPool {
            state: Mutex::new(PoolState {
                free: (0..total as u32).rev().collect(),
                refs: vec![0; total],
                by_hash: HashMap::new(),
                hash_of: vec![None; total],
                idle: VecDeque::new(),
            }),
            total,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks not held by any sequence (free or idle cached).
    #[cfg(test)]
    fn free_blocks(&self) -> usize {
        let st = self.lock();
        st.free.len() + st.idle.len()
    }
}

/// The name of a full block: its predecessor's name and its tokens.
fn chain_hash(prev: u64, tokens: &[u32]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    prev.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The cache memory itself; only the engine step (holding the work lock) touches it.
#[derive(Debug)]
pub struct KvArena {
    data: Store,
    shape: KvShape,
    /// One head's int8 keys before they are spread over the block's columns.
    row: Vec<i8>,
}

/// One head's keys (`value` false, `[head_dim][BLOCK]`) or values
/// (`[BLOCK][head_dim]`) in one block of one layer.
#[derive(Debug, Clone, Copy)]
pub struct Slab {
    pub block: u32,
    pub layer: usize,
    pub value: bool,
    pub head: usize,
}

/// The arena's values, as [`KvType`] says.
#[derive(Debug)]
enum Store {
    F32(Pages<f32>),
    /// f16 bit patterns.
    F16(Pages<u16>),
    /// Symmetric int8, one scale per position of each slab (a head's keys or
    /// values at one position): `scale[slab · BLOCK + position]`.
    I8 {
        q: Pages<i8>,
        scale: Pages<f32>,
    },
}

impl KvArena {
    /// An arena of `blocks` blocks storing `kind`, and the pool handing them out.
    pub fn new(shape: KvShape, blocks: usize, kind: KvType) -> (KvArena, Arc<BlockPool>) {
        let n = blocks * shape.block_floats();
        let data = match kind {
            KvType::F32 => Store::F32(Pages::zeroed(n)),
            KvType::F16 => Store::F16(Pages::zeroed(n)),
            KvType::I8 => Store::I8 {
                q: Pages::zeroed(n),
                scale: Pages::zeroed(n / shape.head_dim),
            },
        };
        assert!(
            kind != KvType::I8 || shape.head_dim.is_multiple_of(KEY_GROUP),
            "an int8 KV cache needs a head size in whole groups of {KEY_GROUP}"
        );
        let row = vec![0; shape.head_dim];
        (KvArena { data, shape, row }, BlockPool::new(blocks))
    }

    /// Whether the cache holds int8 (attention then scores in integers).
    pub fn is_int8(&self) -> bool {
        matches!(self.data, Store::I8 { .. })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Store::F32(v) => v.len() * 4,
            Store::F16(v) => v.len() * 2,
            Store::I8 { q, scale } => q.len() + scale.len() * 4,
        }
    }

    /// Values in one head's keys or values of a block: the scratch
    /// [`KvArena::read`] may need.
    pub fn slab_len(&self) -> usize {
        BLOCK * self.shape.head_dim
    }

    fn slab_at(&self, block: u32, layer: usize, value: bool, head: usize) -> usize {
        let s = &self.shape;
        block as usize * s.block_floats()
            + ((layer * 2 + value as usize) * s.kv_heads + head) * self.slab_len()
    }

    fn at(&self, s: Slab) -> usize {
        self.slab_at(s.block, s.layer, s.value, s.head)
    }

    /// The first `len` values of a slab as the attention kernels take them:
    /// f32 (the cache itself, or widened into `buf`, at least `len` long,
    /// from f16), or an int8 slab as stored, with its [`BLOCK`] per-position
    /// scales, which the kernels apply: to each position's score (keys) or
    /// weight (values). Int8 is not widened here: its kernels work in
    /// integers ([`Kernels::qk_q8`], [`Kernels::pv_q8`]) and take whole slabs.
    pub fn read<'a>(
        &'a self,
        k: &Kernels,
        s: Slab,
        len: usize,
        buf: &'a mut [f32],
    ) -> SlabView<'a> {
        let at = self.at(s);
        match &self.data {
            Store::F32(v) => SlabView::F32(&v[at..at + len]),
            Store::F16(v) => {
                (k.f16_to_f32)(&v[at..at + len], &mut buf[..len]);
                SlabView::F32(&buf[..len])
            }
            Store::I8 { q, scale } => {
                let sc = scale[at / self.shape.head_dim..][..BLOCK]
                    .try_into()
                    .expect("BLOCK scales");
                // Whole slabs: int8 blocks are laid out in groups of positions.
                SlabView::I8(&q[at..at + self.slab_len()], sc)
            }
        }
    }

    /// [`KvArena::read`] with an int8 slab's scales applied: what the cache
    /// holds for `s`, as f32 (attention applies the scales to scores and
    /// weights instead).
    #[cfg(test)]
    pub fn read_values(&self, k: &Kernels, s: Slab, len: usize) -> Vec<f32> {
        let mut buf = vec![0.0; len];
        let (mut v, sc) = match self.read(k, s, len, &mut buf) {
            SlabView::F32(v) => (v.to_vec(), None),
            // Keys in groups of KEY_GROUP dimensions: back to [dim][position].
            SlabView::I8(q, sc) if !s.value => (
                (0..len)
                    .map(|i| {
                        let (d, p) = (i / BLOCK, i % BLOCK);
                        q[(d / KEY_GROUP) * KEY_GROUP * BLOCK + p * KEY_GROUP + d % KEY_GROUP]
                            as f32
                    })
                    .collect(),
                Some(sc),
            ),
            // Values in groups of KEY_GROUP positions: back to [position][dim].
            SlabView::I8(q, sc) => {
                let hd = self.shape.head_dim;
                let at = |i: usize| {
                    let (p, d) = (i / hd, i % hd);
                    (p / KEY_GROUP) * KEY_GROUP * hd + d * KEY_GROUP + p % KEY_GROUP
                };
                ((0..len).map(|i| q[at(i)] as f32).collect(), Some(sc))
            }
        };
        if let Some(sc) = sc {
            if s.value {
                let hd = self.shape.head_dim;
                for (row, &sc) in v.chunks_mut(hd).zip(sc) {
                    row.iter_mut().for_each(|x| *x *= sc);
                }
            } else {
                for row in v.chunks_mut(BLOCK) {
                    row.iter_mut().zip(sc).for_each(|(x, &sc)| *x *= sc);
                }
            }
        }
        v
    }

    /// Hint that [`KvArena::read`] of these values comes a few blocks from
    /// now: the blocks are scattered, so the hardware prefetcher cannot
    /// guess them. Into L2 ([`mem::prefetch_l2`]), where a slab waits
    /// without holding L1's miss buffers.
    pub fn prefetch(&self, s: Slab, len: usize) {
        let at = self.at(s);
        match &self.data {
            Store::F32(v) => mem::prefetch_l2(&v[at..at + len]),
            Store::F16(v) => mem::prefetch_l2(&v[at..at + len]),
            Store::I8 { q, scale } => {
                mem::prefetch_l2(&q[at..at + len]);
                mem::prefetch_l2(&scale[at / self.shape.head_dim..][..BLOCK]);
            }
        }
    }

    /// Store one position's key or value for a head. An int8 cache
    /// quantizes the row with `k`'s [`quantize_i8`](Kernels::quantize_i8),
    /// whose bytes are the same on every ISA.
    #[allow(clippy::too_many_arguments)]
    pub fn put(
        &mut self,
        k: &Kernels,
        seq: &SeqBlocks,
        pos: usize,
        layer: usize,
        value: bool,
        head: usize,
        x: &[f32],
    ) {
        let hd = self.shape.head_dim;
        let at = self.slab_at(seq.table[pos / BLOCK], layer, value, head);
        let (p, slab) = (pos % BLOCK, at..at + BLOCK * hd);
        match &mut self.data {
            Store::F32(v) if value => v[slab][p * hd..][..hd].copy_from_slice(x),
            Store::F16(v) if value => f32_to_f16(x, &mut v[slab][p * hd..][..hd]),
            Store::F32(v) => {
                for (col, &x) in v[slab].chunks_exact_mut(BLOCK).zip(x) {
                    col[p] = x;
                }
            }
            Store::F16(v) => {
                for (col, &x) in v[slab].chunks_exact_mut(BLOCK).zip(x) {
                    col[p] = to_f16(x);
                }
            }
            Store::I8 { q, scale } if value => {
                // Values in groups of KEY_GROUP positions: [position / 4][dim][4].
                scale[at / hd + p] = (k.quantize_i8)(x, &mut self.row);
                const G: usize = KEY_GROUP;
                let group = &mut q[slab][(p / G) * G * hd..][..G * hd];
                for (dim, &v) in group.chunks_exact_mut(G).zip(&self.row) {
                    dim[p % G] = v;
                }
            }
            Store::I8 { q, scale } => {
                scale[at / hd + p] = (k.quantize_i8)(x, &mut self.row);
                const G: usize = KEY_GROUP;
                for (group, v) in q[slab]
                    .chunks_exact_mut(G * BLOCK)
                    .zip(self.row.chunks_exact(G))
                {
                    group[p * G..][..G].copy_from_slice(v);
                }
            }
        }
    }
}

/// A sequence's blocks and tokens; dropping it returns the blocks to the pool.
#[derive(Debug)]
pub struct SeqBlocks {
    pub table: Vec<u32>,
    /// Every token in the cache, in order (names the full blocks).
    tokens: Vec<u32>,
    /// Name of each full block registered or reused so far.
    hashes: Vec<u64>,
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
            tokens: Vec::with_capacity(max_len),
            hashes: Vec::with_capacity(max_len / BLOCK),
            pool: pool.clone(),
        }
    }

    /// Hold enough blocks for `len` positions.
    pub fn reserve(&mut self, len: usize) -> Result<(), CacheFull> {
        let need = len.div_ceil(BLOCK);
        if need <= self.table.len() {
            return Ok(());
        }
        let mut st = self.pool.lock();
        if st.free.len() + st.idle.len() < need - self.table.len() {
            return Err(CacheFull {
                total: self.pool.total,
            });
        }
        while self.table.len() < need {
            let b = st.take().expect("counted above");
            self.table.push(b);
        }
        Ok(())
    }

    /// Record tokens just written to the cache and name the blocks they fill.
    pub fn written(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
        let full = self.tokens.len() / BLOCK;
        if full <= self.hashes.len() {
            return;
        }
        let mut st = self.pool.lock();
        while self.hashes.len() < full {
            let i = self.hashes.len();
            let prev = i.checked_sub(1).map_or(0, |p| self.hashes[p]);
            let h = chain_hash(prev, &self.tokens[i * BLOCK..(i + 1) * BLOCK]);
            let b = self.table[i];
            if !st.by_hash.contains_key(&h) && st.hash_of[b as usize].is_none() {
                st.by_hash.insert(h, b);
                st.hash_of[b as usize] = Some(h);
            }
            self.hashes.push(h);
        }
    }

    /// On an empty sequence: take the cached blocks that hold a prefix of
    /// `prompt`, leaving at least one token to compute. Returns the number of
    /// positions now in the cache.
    pub fn reuse_prefix(&mut self, prompt: &[u32]) -> usize {
        assert!(self.table.is_empty(), "prefix reuse on a started sequence");
        let mut st = self.pool.lock();
        let mut prev = 0;
        while (self.table.len() + 1) * BLOCK < prompt.len() {
            let i = self.table.len();
            let h = chain_hash(prev, &prompt[i * BLOCK..(i + 1) * BLOCK]);
            let Some(&b) = st.by_hash.get(&h) else { break };
            if st.refs[b as usize] == 0 {
                st.idle.retain(|&x| x != b);
            }
            st.refs[b as usize] += 1;
            self.table.push(b);
            self.hashes.push(h);
            prev = h;
        }
        let n = self.table.len() * BLOCK;
        self.tokens.extend_from_slice(&prompt[..n]);
        n
    }
}

impl Drop for SeqBlocks {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        for b in self.table.drain(..) {
            st.release(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One head's whole slab of a block, as f32.
    fn slab(arena: &KvArena, block: u32, layer: usize, value: bool) -> Vec<f32> {
        let k = Kernels::generic();
        let s = Slab {
            block,
            layer,
            value,
            head: 0,
        };
        arena.read_values(&k, s, arena.slab_len())
    }

    #[test]
    fn blocks_are_reserved_and_returned() {
        let kt = *ember_kernels::kernels();
        for kind in [KvType::F32, KvType::F16] {
            let shape = KvShape {
                layers: 2,
                kv_heads: 1,
                head_dim: 4,
            };
            let (mut arena, pool) = KvArena::new(shape, 3, kind);
            let mut a = SeqBlocks::new(&pool, 64);
            a.reserve(BLOCK + 1).unwrap();
            assert_eq!(pool.free_blocks(), 1);
            let mut b = SeqBlocks::new(&pool, 64);
            assert!(b.reserve(2 * BLOCK).is_err(), "only one block left");
            b.reserve(BLOCK).unwrap();
            arena.put(&kt, &a, BLOCK, 1, true, 0, &[1.0, 2.0, 3.0, 4.0]);
            arena.put(&kt, &b, 0, 1, true, 0, &[5.0; 4]);
            assert_eq!(slab(&arena, a.table[1], 1, true)[..4], [1.0, 2.0, 3.0, 4.0]);
            assert_eq!(slab(&arena, b.table[0], 1, true)[..4], [5.0; 4]);
            assert_eq!(
                slab(&arena, a.table[1], 0, true)[..4],
                [0.0; 4],
                "other layer untouched"
            );
            // Keys lie transposed: dimension c of position p at c * BLOCK + p.
            arena.put(&kt, &a, BLOCK + 2, 0, false, 0, &[7.0, 8.0, 9.0, 10.0]);
            let keys = slab(&arena, a.table[1], 0, false);
            let col: Vec<f32> = (0..4).map(|c| keys[c * BLOCK + 2]).collect();
            assert_eq!(col, [7.0, 8.0, 9.0, 10.0]);
            assert_eq!(keys.iter().filter(|&&v| v != 0.0).count(), 4);
            drop(a);
            assert_eq!(pool.free_blocks(), 2);
            drop(b);
            assert_eq!(pool.free_blocks(), 3);
        }
    }

    #[test]
    fn an_i8_cache_is_a_quarter_the_size_and_keeps_each_row_to_half_a_step() {
        let kt = *ember_kernels::kernels();
        let shape = KvShape {
            layers: 2,
            kv_heads: 2,
            head_dim: 8,
        };
        let (a32, _) = KvArena::new(shape, 3, KvType::F32);
        let (mut a8, pool) = KvArena::new(shape, 3, KvType::I8);
        // int8 values, and one f32 scale per head_dim (8) of them.
        assert_eq!(a8.bytes(), a32.bytes() / 4 + a32.bytes() / 8);
        let mut s = SeqBlocks::new(&pool, 64);
        s.reserve(BLOCK + 3).unwrap();
        let row = |p: usize, f: f32| -> Vec<f32> {
            (0..8)
                .map(|d| ((p * 8 + d) as f32 * 0.77).sin() * f)
                .collect()
        };
        // Rows of very different sizes side by side in one block: each has
        // its own scale.
        let sizes = [1e-3, 1.0, 40.0, 0.0];
        for p in 0..BLOCK + 3 {
            let f = sizes[p % 4];
            a8.put(&kt, &s, p, 1, true, 1, &row(p, f));
            a8.put(&kt, &s, p, 1, false, 1, &row(p + 100, f));
        }
        let k = Kernels::generic();
        let read = |block: u32, value: bool| {
            let sl = Slab {
                block,
                layer: 1,
                value,
                head: 1,
            };
            a8.read_values(&k, sl, a8.slab_len())
        };
        for p in 0..BLOCK + 3 {
            let (b, i) = (s.table[p / BLOCK], p % BLOCK);
            let (vals, keys) = (read(b, true), read(b, false));
            for (value, want) in [
                (true, row(p, sizes[p % 4])),
                (false, row(p + 100, sizes[p % 4])),
            ] {
                let step = want.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                for (d, &w) in want.iter().enumerate() {
                    let got = if value {
                        vals[i * 8 + d]
                    } else {
                        keys[d * BLOCK + i]
                    };
                    assert!(
                        (got - w).abs() <= step * 0.5 * (1.0 + 1e-5),
                        "position {p} value {value} dim {d}: {got} vs {w}"
                    );
                }
            }
        }
        // The row's largest value is exact to its scale's rounding; a zero
        // row reads as zeros; the other head and layer are untouched.
        assert!(read(s.table[0], true)[3 * 8..4 * 8]
            .iter()
            .all(|&v| v == 0.0));
        let other = Slab {
            block: s.table[0],
            layer: 0,
            value: true,
            head: 1,
        };
        assert!(a8
            .read_values(&k, other, a8.slab_len())
            .iter()
            .all(|&v| v == 0.0));
        // Infinities saturate and a NaN is stored as 0: attention stays finite.
        a8.put(
            &kt,
            &s,
            0,
            0,
            true,
            0,
            &[f32::INFINITY, -1.0, f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0],
        );
        let sl = Slab {
            block: s.table[0],
            layer: 0,
            value: true,
            head: 0,
        };
        let v = a8.read_values(&k, sl, 8);
        assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
        assert_eq!(v[2], 0.0);
        assert!(v[0] > 1e30);
    }

    #[test]
    fn an_f16_cache_is_half_the_size_and_rounds_to_nearest_even() {
        let kt = *ember_kernels::kernels();
        let shape = KvShape {
            layers: 1,
            kv_heads: 1,
            head_dim: 2,
        };
        let (a32, _) = KvArena::new(shape, 2, KvType::F32);
        let (mut a16, pool) = KvArena::new(shape, 2, KvType::F16);
        assert_eq!(a16.bytes() * 2, a32.bytes());
        let mut s = SeqBlocks::new(&pool, 16);
        s.reserve(1).unwrap();
        let ulp = 2f32.powi(-10);
        // 1 + ulp/2 is a tie: to the even 1.0; 1 + 0.75 ulp rounds up.
        a16.put(&kt, &s, 0, 0, true, 0, &[1.0 + ulp / 2.0, 1.0 + 0.75 * ulp]);
        a16.put(&kt, &s, 0, 0, false, 0, &[-2.5, 1e6]);
        assert_eq!(slab(&a16, s.table[0], 0, true)[..2], [1.0, 1.0 + ulp]);
        let keys = slab(&a16, s.table[0], 0, false);
        assert_eq!([keys[0], keys[BLOCK]], [-2.5, 65504.0], "saturated");
    }

    #[test]
    fn full_blocks_are_shared_by_prefix_and_evicted_last() {
        let shape = KvShape {
            layers: 1,
            kv_heads: 1,
            head_dim: 2,
        };
        let (_arena, pool) = KvArena::new(shape, 4, KvType::F32);
        let prompt: Vec<u32> = (0..40).collect();
        let mut a = SeqBlocks::new(&pool, 64);
        a.reserve(40).unwrap();
        a.written(&prompt[..20]);
        a.written(&prompt[20..]);
        // Two full blocks named; a prompt sharing 35 tokens reuses both.
        let mut b = SeqBlocks::new(&pool, 64);
        let mut other = prompt[..35].to_vec();
        other.push(99);
        assert_eq!(b.reuse_prefix(&other), 32);
        assert_eq!(&b.table[..], &a.table[..2]);
        // A prompt of exactly one block keeps its last token to compute.
        let mut c = SeqBlocks::new(&pool, 64);
        assert_eq!(c.reuse_prefix(&prompt[..16]), 0);
        // A different first block shares nothing.
        let mut d = SeqBlocks::new(&pool, 64);
        let mut changed = prompt.clone();
        changed[3] = 1000;
        assert_eq!(d.reuse_prefix(&changed), 0);
        drop((a, b, c, d));
        assert_eq!(pool.free_blocks(), 4);
        // Cached blocks survive their sequences until their memory is needed.
        let mut e = SeqBlocks::new(&pool, 64);
        assert_eq!(e.reuse_prefix(&prompt), 32);
        drop(e);
        let mut f = SeqBlocks::new(&pool, 64);
        f.reserve(64).unwrap(); // takes the free blocks, then evicts the cached ones
        drop(f);
        let mut g = SeqBlocks::new(&pool, 64);
        assert_eq!(g.reuse_prefix(&prompt), 0, "evicted");
    }
}
