//! Int8 matrix × vector (and small batches of vectors) with the quantization
//! correction fused, producing f32.
//!
//! Weights are packed once at load: per-row symmetric i8 with its scale, in
//! the [`Layout`] the kernel table reads fastest, and each row's sum
//! precomputed so the activation zero point costs one multiply per row:
//!
//! `out[r] = x_scale · w_scale[r] · (Σ x[c]·w[r][c] − x_zp · Σ w[r][c]) + bias[r]`
//!
//! The integer part goes through a dispatched micro-kernel, exact on every
//! ISA: [`Kernels::tile_u8i8`] (4 rows × up to 4 activation vectors, on rows
//! padded to 64 bytes) or [`Kernels::block_u8i8`] (64 rows × up to 4
//! activations, on column-interleaved blocks), or, for prefill-sized
//! batches where the table has it, [`Kernels::block16_u8i8`] (AMX tiles, 16
//! or 32 activations per weight tile). Each weight row is read from
//! memory once per call whatever the batch; the correction is the same scalar
//! code everywhere, so every ISA and both layouts give bit-identical results.
//! The crate has no thread pool: output rows are split over the caller's
//! threads, either by hand ([`gemm_rows`]) or through the [`Parallel`] hook
//! ([`gemm_par`]).

use std::ops::Range;

use crate::dispatch::{
    Acc16, Acts16, Block16Fn, Block64, Blocks, Dequant, Kernels, Layout, Rows4, BLOCK_GROUP,
    BLOCK_ROWS, MAX_TILES16, TILE16_ACTS, TILE_ACTS, TILE_ROWS,
};
use crate::pages::Pages;

const ROW_ALIGN: usize = 64;

/// How the source of [`PackedI8::pack`] lies in memory: the order to read it in.
#[derive(Debug, Clone, Copy)]
enum Source {
    RowMajor,
    Transposed,
}

/// A weight matrix (`rows × cols`, output-major) packed for the kernels.
#[derive(Debug, Clone)]
pub struct PackedI8 {
    layout: Layout,
    rows: usize,
    cols: usize,
    /// [`Layout::Rows`]: bytes per row; [`Layout::Blocks`]: bytes per block.
    stride: usize,
    /// Huge-page backed when large: a decode step streams all of it.
    data: Pages<i8>,
    /// Padded like the rows: reads of a whole tile or block stay in bounds.
    row_sums: Vec<i32>,
    scales: Vec<f32>,
    /// No weight is -128: the block kernels may take the row sums and
    /// their sign-adjusted path ([`Block64::sums`]).
    narrow: bool,
}

impl PackedI8 {
    /// Pack already-quantized rows (`q` is `rows × cols`, row-major) with
    /// their scales, in the layout of the process-wide kernel table.
    pub fn from_quantized(q: &[i8], rows: usize, cols: usize, scales: &[f32]) -> PackedI8 {
        PackedI8::with_layout(crate::kernels().layout, q, rows, cols, scales)
    }

    /// [`PackedI8::from_quantized`] from the transpose: `q_t` is `cols × rows`
    /// row-major, as ONNX stores a MatMul's `[K, N]` weights. Saves the
    /// caller a transposed copy of the matrix at load.
    pub fn from_quantized_t(q_t: &[i8], rows: usize, cols: usize, scales: &[f32]) -> PackedI8 {
        assert_eq!(q_t.len(), rows * cols, "weights are not {cols}×{rows}");
        PackedI8::pack(
            crate::kernels().layout,
            Source::Transposed,
            rows,
            cols,
            scales,
            |r, c| q_t[c * rows + r],
        )
    }

    /// [`PackedI8::from_quantized`] in a given layout (any table computes on
    /// either; the one it prefers is [`Kernels::layout`]).
    pub fn with_layout(
        layout: Layout,
        q: &[i8],
        rows: usize,
        cols: usize,
        scales: &[f32],
    ) -> PackedI8 {
        assert_eq!(q.len(), rows * cols, "weights are not {rows}×{cols}");
        PackedI8::pack(layout, Source::RowMajor, rows, cols, scales, |r, c| {
            q[r * cols + c]
        })
    }

    /// Pack the `rows × cols` weights `at(row, col)`, read in `order`.
    fn pack(
        layout: Layout,
        order: Source,
        rows: usize,
        cols: usize,
        scales: &[f32],
        at: impl Fn(usize, usize) -> i8,
    ) -> PackedI8 {
        assert!(
            cols > 0 && cols <= crate::generic::MAX_DOT_LEN,
            "row length {cols} out of range"
        );
        assert_eq!(scales.len(), rows, "one scale per row");
        let (stride, padded) = match layout {
            Layout::Rows => (cols.div_ceil(ROW_ALIGN) * ROW_ALIGN, rows + TILE_ROWS - 1),
            Layout::Blocks => (
                cols.div_ceil(4) * BLOCK_GROUP,
                rows.div_ceil(BLOCK_ROWS) * BLOCK_ROWS,
            ),
        };
        let mut data = match layout {
            Layout::Rows => Pages::zeroed(padded * stride),
            // The matrix kernels read 64 columns at a time: the last block's
            // groups up to the next multiple of 64 columns must exist (they
            // meet zero activations).
            Layout::Blocks => {
                let slack = (cols.next_multiple_of(64) / 4 - cols.div_ceil(4)) * BLOCK_GROUP;
                Pages::zeroed(padded / BLOCK_ROWS * stride + slack)
            }
        };
        let mut row_sums = vec![0i32; padded];
        let mut padded_scales = vec![0f32; padded];
        padded_scales[..rows].copy_from_slice(scales);
        let mut narrow = true;
        let mut put = |r: usize, c: usize| {
            let v = at(r, c);
            row_sums[r] += v as i32;
            narrow &= v != i8::MIN;
            let i = match layout {
                Layout::Rows => r * stride + c,
                Layout::Blocks => {
                    r / BLOCK_ROWS * stride + (c / 4) * BLOCK_GROUP + (r % BLOCK_ROWS) * 4 + c % 4
                }
            };
            data[i] = v;
        };
        // Walk the source in its own order: a row-major source row by row, a
        // transposed one column by column (reading it row by row touched a
        // new cache line per byte and was most of the packing time at load).
        match order {
            Source::RowMajor => (0..rows).for_each(|r| (0..cols).for_each(|c| put(r, c))),
            Source::Transposed => (0..cols).for_each(|c| (0..rows).for_each(|r| put(r, c))),
        }
        PackedI8 {
            layout,
            rows,
            cols,
            stride,
            data,
            row_sums,
            scales: padded_scales,
            narrow,
        }
    }

    /// Quantize f32 weights per row (symmetric) and pack them.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> PackedI8 {
        PackedI8::quantize_as(crate::kernels().layout, w, rows, cols)
    }

    /// [`PackedI8::quantize`] in a given layout.
    pub fn quantize_as(layout: Layout, w: &[f32], rows: usize, cols: usize) -> PackedI8 {
        let mut q = vec![0i8; w.len()];
        let mut scales = vec![0f32; rows];
        crate::quant::quantize_rows_i8(w, cols, &mut q, &mut scales);
        PackedI8::with_layout(layout, &q, rows, cols, &scales)
    }

    /// The layout the weights are packed in.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input length.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Weight bytes a full product streams (`rows × cols`).
    pub fn weight_bytes(&self) -> usize {
        self.rows * self.cols
    }

    /// The packed weight bytes as they lie in memory (padding included): what
    /// a product streams, for measuring how fast a plain loop reads them.
    pub fn packed_bytes(&self) -> &[i8] {
        &self.data
    }

    /// Bytes held, padding included.
    pub fn memory_bytes(&self) -> usize {
        self.data.len() + 4 * self.row_sums.len() + 4 * self.scales.len()
    }

    /// Rows a kernel call computes (the unit of splitting work).
    fn tile_rows(&self) -> usize {
        match self.layout {
            Layout::Rows => TILE_ROWS,
            Layout::Blocks => BLOCK_ROWS,
        }
    }

    /// Ask for the sums, scales and bias of the 64-row block holding row `r`
    /// (if any) into L2 ahead of its dequantization.
    fn prefetch_meta(&self, r: usize, bias: Option<&[f32]>) {
        let first = r / BLOCK_ROWS * BLOCK_ROWS;
        if first >= self.rows {
            return;
        }
        let end = (first + BLOCK_ROWS).min(self.rows);
        crate::mem::prefetch_l2(&self.row_sums[first..end]);
        crate::mem::prefetch_l2(&self.scales[first..end]);
        if let Some(b) = bias {
            crate::mem::prefetch_l2(&b[first..end]);
        }
    }

    /// The 4-row block starting at row `r` (< `rows`), [`Layout::Rows`].
    fn rows4(&self, r: usize) -> Rows4<'_> {
        let mut sums = [0; TILE_ROWS];
        sums.copy_from_slice(&self.row_sums[r..r + TILE_ROWS]);
        Rows4 {
            data: &self.data[r * self.stride..],
            stride: self.stride,
            sums,
        }
    }

    /// The block holding row `r`, [`Layout::Blocks`], and the blocks after
    /// it (which a kernel may prefetch while it computes this one).
    fn block64(&self, r: usize) -> Block64<'_> {
        let at = r / BLOCK_ROWS * self.stride;
        let first = r / BLOCK_ROWS * BLOCK_ROWS;
        Block64 {
            data: &self.data[at..],
            sums: self
                .narrow
                .then(|| self.row_sums[first..first + BLOCK_ROWS].try_into().unwrap()),
        }
    }
}

/// A quantized activation vector: u8 values with their scale and zero point
/// (as produced by [`crate::quant::dynamic_quantize_u8`]).
#[derive(Debug, Clone, Copy)]
pub struct QVec<'a> {
    /// Quantized values, `cols` long.
    pub q: &'a [u8],
    /// Scale.
    pub scale: f32,
    /// Zero point.
    pub zero_point: u8,
}

fn check_operands(w: &PackedI8, xs: &[QVec], bias: Option<&[f32]>) {
    for x in xs {
        assert_eq!(
            x.q.len(),
            w.cols,
            "activation length differs from the weights' columns"
        );
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), w.rows, "one bias per row");
    }
}

/// Whether the matrix kernel ([`Kernels::block16_u8i8`], where the table has
/// one) beats passes of the 4-activation block kernel. Measured with `cargo
/// bench --bench gemv` on a Xeon with AMX: at 2–4 activations AMX is slower
/// (one block-kernel pass does them all), at 8 it is 1.6× faster on 576
/// columns but 0.8× on 256 (copying and correcting cost more than 4 tile
/// steps save), from 16 on it wins on every shape (1.2–2.4×). On a later
/// Xeon, with the correction dispatched, 8 activations on 256×4096 took
/// 23–25 µs through AMX against 28 through VNNI, but the demo GPT-2's
/// batch of 8 decoded no faster end to end, so the rule stayed.
fn use_block16(xs: usize, cols: usize) -> bool {
    xs > TILE_ACTS && (cols >= 512 || xs >= TILE16_ACTS)
}

/// Blocks per matrix-kernel call: 32 KiB of sums per group, in L1.
const BLOCK16_CHUNK: usize = 8;

/// [`compute16`]'s per-thread buffers, reused from call to call.
struct Scratch16 {
    /// The activations, copied into 16 rows padded to 64 columns.
    acts: Vec<u8>,
    /// The sums the kernel calls return: 64 KiB, made once (zeroing it on
    /// every call cost more than some small products; the kernel overwrites
    /// what it returns).
    sums: Vec<Acc16>,
}

thread_local! {
    static SCRATCH16: std::cell::RefCell<Scratch16> = const {
        std::cell::RefCell::new(Scratch16 { acts: Vec::new(), sums: Vec::new() })
    };
}

/// The shared core: every (activation, row) result of `rows`, handed to `put`
/// as `(activation, first row, values of consecutive rows)`.
fn compute(
    k: &Kernels,
    w: &PackedI8,
    xs: &[QVec],
    bias: Option<&[f32]>,
    rows: Range<usize>,
    mut put: impl FnMut(usize, usize, &[f32]),
) {
    if let (Some(f), Layout::Blocks) = (k.block16_u8i8, w.layout) {
        if use_block16(xs.len(), w.cols) {
            return compute16(k, f, w, xs, bias, rows, put);
        }
    }
    let tile = w.tile_rows();
    let mut start = rows.start;
    while start < rows.end {
        // The tile (or block) holding `start`, clipped to the range.
        let n_rows = (rows.end - start).min(tile - start % tile);
        if let Layout::Blocks = w.layout {
            // The sums and scales [`correct`] reads after the kernel are
            // ~1/70 of the weights' bytes, a stream the hardware prefetcher
            // does not follow from block to block: ask for the next block's
            // during this one (once, whatever the number of groups).
            if start == rows.start {
                w.prefetch_meta(start, bias);
            }
            w.prefetch_meta(start - start % BLOCK_ROWS + BLOCK_ROWS, bias);
        }
        for (g, group) in xs.chunks(TILE_ACTS).enumerate() {
            let mut qs: [&[u8]; TILE_ACTS] = [&[]; TILE_ACTS];
            for (q, x) in qs.iter_mut().zip(group) {
                *q = x.q;
            }
            let qs = &qs[..group.len()];
            match w.layout {
                Layout::Rows => {
                    let acc = (k.tile_u8i8)(qs, w.rows4(start));
                    for (j, x) in group.iter().enumerate() {
                        let mut v = [0f32; TILE_ROWS];
                        let v = &mut v[..n_rows];
                        correct(k, w, x, bias, start, &acc[j][..n_rows], v);
                        put(g * TILE_ACTS + j, start, v);
                    }
                }
                Layout::Blocks => {
                    let acc = (k.block_u8i8)(qs, w.block64(start));
                    let first = start % BLOCK_ROWS;
                    for (j, x) in group.iter().enumerate() {
                        let mut v = [0f32; BLOCK_ROWS];
                        let v = &mut v[..n_rows];
                        correct(k, w, x, bias, start, &acc[j][first..first + n_rows], v);
                        put(g * TILE_ACTS + j, start, v);
                    }
                }
            }
        }
        start += n_rows;
    }
}

/// [`compute`] through the matrix kernel: the activations copied into rows
/// padded with zeros to 64 columns, then for each run of up to
/// [`BLOCK16_CHUNK`] blocks (a few hundred KiB, which stay in L2) every group
/// of 16 activations, so weights come from memory once per call.
fn compute16(
    k: &Kernels,
    f: Block16Fn,
    w: &PackedI8,
    xs: &[QVec],
    bias: Option<&[f32]>,
    rows: Range<usize>,
    mut put: impl FnMut(usize, usize, &[f32]),
) {
    if rows.is_empty() {
        return;
    }
    let wide = w.cols.next_multiple_of(64);
    let tile = TILE16_ACTS * wide;
    let first_block = rows.start / BLOCK_ROWS;
    let end_block = rows.end.div_ceil(BLOCK_ROWS);
    let groups = xs.len().div_ceil(TILE16_ACTS);
    SCRATCH16.with_borrow_mut(|scratch| {
        let Scratch16 {
            acts: buf,
            sums: out,
        } = scratch;
        if out.is_empty() {
            out.resize(BLOCK16_CHUNK * MAX_TILES16, [[0; BLOCK_ROWS]; TILE16_ACTS]);
        }
        // Zero padding past each row's `cols` bytes, and whole zero rows
        // after the last activation.
        buf.clear();
        buf.resize(groups * tile, 0);
        for (t, x) in xs.iter().enumerate() {
            buf[t * wide..t * wide + w.cols].copy_from_slice(x.q);
        }
        let mut b = first_block;
        while b < end_block {
            let count = (end_block - b).min(BLOCK16_CHUNK);
            let blocks = Blocks {
                data: &w.data[b * w.stride..],
                stride: w.stride,
                count,
            };
            // Groups two at a time (each weight tile then serves 32
            // activations), the last alone if their number is odd.
            let mut g = 0;
            while g < groups {
                let tiles = (groups - g).min(MAX_TILES16);
                let acts = Acts16 {
                    data: &buf[g * tile..(g + tiles) * tile],
                    stride: wide,
                    n: w.cols,
                    tiles,
                };
                let out = &mut out[..count * tiles];
                f(acts, blocks, out);
                for (i, acc) in out.iter().enumerate() {
                    let (block, group) = (b + i / tiles, g + i % tiles);
                    let base = block * BLOCK_ROWS;
                    let (r0, r1) = (base.max(rows.start), (base + BLOCK_ROWS).min(rows.end));
                    let first = group * TILE16_ACTS;
                    let last = (first + TILE16_ACTS).min(xs.len());
                    for (j, x) in xs[first..last].iter().enumerate() {
                        let mut v = [0f32; BLOCK_ROWS];
                        let v = &mut v[..r1 - r0];
                        correct(k, w, x, bias, r0, &acc[j][r0 - base..r1 - base], v);
                        put(first + j, r0, v);
                    }
                }
                g += tiles;
            }
            b += count;
        }
    });
}

/// The quantization correction of `acc` (rows from `first`) into `out`,
/// through the table's [`Kernels::dequant_i32`]: the same lane-wise code for
/// every ISA and layout, so results agree bit for bit.
#[inline]
fn correct(
    k: &Kernels,
    w: &PackedI8,
    x: &QVec,
    bias: Option<&[f32]>,
    first: usize,
    acc: &[i32],
    out: &mut [f32],
) {
    let n = out.len();
    let d = Dequant {
        row_sums: &w.row_sums[first..first + n],
        row_scales: &w.scales[first..first + n],
        bias: bias.map(|b| &b[first..first + n]),
        zero_point: x.zero_point as i32,
        scale: x.scale,
    };
    (k.dequant_i32)(acc, d, out)
}

/// Output rows `rows` of `w · xs[i] (+ bias)` for every activation vector:
/// `out` is `xs.len() × rows.len()`, one activation's rows after another.
/// For callers that split rows over their own threads.
pub fn gemm_rows(
    k: &Kernels,
    w: &PackedI8,
    xs: &[QVec],
    bias: Option<&[f32]>,
    rows: Range<usize>,
    out: &mut [f32],
) {
    check_operands(w, xs, bias);
    assert!(rows.end <= w.rows, "row range past the matrix");
    let len = rows.len();
    assert_eq!(
        out.len(),
        xs.len() * len,
        "output length differs from batch × row range"
    );
    let first = rows.start;
    compute(k, w, xs, bias, rows, |i, r, v| {
        let at = i * len + r - first;
        out[at..at + v.len()].copy_from_slice(v)
    });
}

/// Output rows `rows` of `w · x (+ bias)` into `out` (`rows.len()` long).
pub fn gemv_rows(
    k: &Kernels,
    w: &PackedI8,
    x: QVec,
    bias: Option<&[f32]>,
    rows: Range<usize>,
    out: &mut [f32],
) {
    gemm_rows(k, w, &[x], bias, rows, out)
}

/// `out = w · x (+ bias)`, all rows.
pub fn gemv(k: &Kernels, w: &PackedI8, x: QVec, bias: Option<&[f32]>, out: &mut [f32]) {
    gemv_rows(k, w, x, bias, 0..w.rows, out)
}

/// A small batch (the decode shape of continuous batching): `out[i] = w · xs[i] (+ bias)`,
/// `out` being `xs.len() × rows`. Each weight row is read once for the whole batch.
pub fn gemm(k: &Kernels, w: &PackedI8, xs: &[QVec], bias: Option<&[f32]>, out: &mut [f32]) {
    gemm_rows(k, w, xs, bias, 0..w.rows, out)
}

/// The caller's thread pool, as the GEMM sees it.
pub trait Parallel: Sync {
    /// How many tasks are worth making.
    fn threads(&self) -> usize;
    /// Run `task(i)` for every `i` in `0..n`, concurrently, returning when all
    /// have finished.
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync));
}

/// Everything on the calling thread.
#[derive(Debug, Clone, Copy)]
pub struct Serial;

impl Parallel for Serial {
    fn threads(&self) -> usize {
        1
    }
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(task)
    }
}

/// Fresh scoped threads per call: simple, but spawning costs tens of
/// microseconds, so an engine keeps a pool of its own instead.
#[derive(Debug, Clone, Copy)]
pub struct Scoped(pub usize);

impl Parallel for Scoped {
    fn threads(&self) -> usize {
        self.0.max(1)
    }
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        std::thread::scope(|s| {
            for i in 1..n {
                s.spawn(move || task(i));
            }
            if n > 0 {
                task(0);
            }
        })
    }
}

/// An output as shared by the tasks of [`gemm_par_many`], each writing its own rows.
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint elements (see `gemm_par_many`); the pointer is
// only used while `gemm_par_many` holds the unique borrow of the output.
unsafe impl Sync for SharedOut {}

/// [`gemm`] with output rows split over `pool`'s threads, in blocks of whole
/// tiles; the result equals [`gemm`]'s bit for bit.
pub fn gemm_par(
    k: &Kernels,
    w: &PackedI8,
    xs: &[QVec],
    bias: Option<&[f32]>,
    out: &mut [f32],
    pool: &dyn Parallel,
) {
    gemm_par_many(k, xs, &mut [Product { w, bias, out }], pool)
}

/// One matrix of [`gemm_par_many`]: `out = w · xs[i] (+ bias)`, `out` being
/// `xs.len() × w.rows()`.
#[derive(Debug)]
pub struct Product<'a> {
    pub w: &'a PackedI8,
    pub bias: Option<&'a [f32]>,
    pub out: &'a mut [f32],
}

/// Most matrices one [`gemm_par_many`] call takes.
pub const MAX_PRODUCTS: usize = 4;

/// Several products of the same activations (a layer's q, k and v; gate and
/// up) as one job for `pool`: their tiles are laid end to end and cut into
/// one contiguous run per thread. One dispatch and one wait instead of one
/// per matrix, and the split is even over the sum: a layer's 9 + 3 + 3
/// tiles of q, k and v go 8 + 7 over two threads, where one matrix at a
/// time goes 5 + 4, 2 + 1 and 2 + 1. Each output equals [`gemm`]'s bit for
/// bit.
pub fn gemm_par_many(k: &Kernels, xs: &[QVec], products: &mut [Product<'_>], pool: &dyn Parallel) {
    assert!(
        (1..=MAX_PRODUCTS).contains(&products.len()),
        "1 to {MAX_PRODUCTS} products"
    );
    // Each matrix with its bias, first tile and output.
    type Part<'a> = (&'a PackedI8, Option<&'a [f32]>, usize, SharedOut);
    let mut parts: heapless::Vec<Part<'_>, MAX_PRODUCTS> = heapless::Vec::new();
    let mut tiles = 0;
    for p in products.iter_mut() {
        check_operands(p.w, xs, p.bias);
        assert_eq!(
            p.out.len(),
            xs.len() * p.w.rows,
            "output is not batch × rows"
        );
        let _ = parts.push((p.w, p.bias, tiles, SharedOut(p.out.as_mut_ptr())));
        tiles += p.w.rows.div_ceil(p.w.tile_rows());
    }
    let per = tiles.div_ceil(pool.threads().clamp(1, tiles.max(1)));
    let runs = tiles.div_ceil(per.max(1));
    let parts = &parts;
    pool.run(runs, &|t| {
        let run = t * per..((t + 1) * per).min(tiles);
        for &(w, bias, first, ref shared) in parts {
            let (rows, tile) = (w.rows, w.tile_rows());
            let own = first..first + rows.div_ceil(tile);
            let (a, b) = (run.start.max(own.start), run.end.min(own.end));
            if a >= b {
                continue;
            }
            let range = (a - first) * tile..((b - first) * tile).min(rows);
            compute(k, w, xs, bias, range, |i, r, v| {
                assert!(i < xs.len() && r + v.len() <= rows);
                // SAFETY: i < xs.len() and r + v.len() ≤ rows, so the elements
                // are inside this product's output (length xs.len() · rows,
                // checked above); task t only writes rows of its own run of
                // tiles, runs are disjoint, so no element is written twice or
                // concurrently; the outputs stay borrowed until `run` returns.
                unsafe {
                    std::ptr::copy_nonoverlapping(v.as_ptr(), shared.0.add(i * rows + r), v.len())
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dynamic_quantize_u8;
    use proptest::prelude::*;

    fn isas() -> Vec<Kernels> {
        Kernels::all_available()
    }

    /// Each activation vector quantized to u8: bytes, scale, zero point.
    fn quantized(xs: impl IntoIterator<Item = Vec<f32>>) -> Vec<(Vec<u8>, f32, u8)> {
        xs.into_iter()
            .map(|x| {
                let mut q = vec![0u8; x.len()];
                let (s, z) = dynamic_quantize_u8(&x, &mut q);
                (q, s, z)
            })
            .collect()
    }

    /// [`quantized`]'s vectors as the kernels take them.
    fn qvecs(acts: &[(Vec<u8>, f32, u8)]) -> Vec<QVec<'_>> {
        acts.iter()
            .map(|(q, s, z)| QVec {
                q,
                scale: *s,
                zero_point: *z,
            })
            .collect()
    }

    const LAYOUTS: [Layout; 2] = [Layout::Rows, Layout::Blocks];

    fn case() -> impl Strategy<Value = (usize, usize, Vec<f32>, Vec<f32>, Vec<f32>)> {
        // Up to 139 rows: several blocks and a partial one.
        (1usize..140, 1usize..200).prop_flat_map(|(rows, cols)| {
            (
                Just(rows),
                Just(cols),
                proptest::collection::vec(-1f32..1.0, rows * cols),
                proptest::collection::vec(-3f32..3.0, cols),
                proptest::collection::vec(-1f32..1.0, rows),
            )
        })
    }

    proptest! {
        /// Packing from the transpose gives the same bytes, sums and scales.
        #[test]
        fn packing_the_transpose_is_the_same((rows, cols) in (1usize..140, 1usize..200), seed: u64) {
            let q: Vec<i8> = (0..rows * cols)
                .map(|i| ((i as u64).wrapping_mul(seed | 1) >> 7) as i8)
                .collect();
            let scales: Vec<f32> = (0..rows).map(|r| 0.01 + r as f32).collect();
            let mut q_t = vec![0i8; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    q_t[c * rows + r] = q[r * cols + c];
                }
            }
            let a = PackedI8::from_quantized(&q, rows, cols, &scales);
            let b = PackedI8::from_quantized_t(&q_t, rows, cols, &scales);
            prop_assert_eq!((a.stride, &a.data, &a.row_sums, &a.scales), (b.stride, &b.data, &b.row_sums, &b.scales));
        }

        /// Every ISA gives the generic result bit for bit, and the result is the
        /// dequantized product up to quantization error.
        ///
        /// The activation's `scale` stays live across every ISA's kernel calls:
        /// on armv7 this test caught the NEON kernels overwriting the
        /// callee-saved registers `d8`–`d15` (see `arm.rs`), which held it.
        #[test]
        fn gemv_is_isa_independent_and_close_to_float((rows, cols, w, x, bias) in case()) {
            let pw = PackedI8::quantize_as(Layout::Rows, &w, rows, cols);
            let mut q = vec![0u8; cols];
            let (scale, zp) = dynamic_quantize_u8(&x, &mut q);
            let qx = QVec { q: &q, scale, zero_point: zp };
            let mut want = vec![0f32; rows];
            gemv(&Kernels::generic(), &pw, qx, Some(&bias), &mut want);
            for layout in LAYOUTS {
                let pl = PackedI8::quantize_as(layout, &w, rows, cols);
                for k in isas() {
                    let mut got = vec![0f32; rows];
                    gemv(&k, &pl, qx, Some(&bias), &mut got);
                    prop_assert_eq!(&got, &want, "{} {:?}", k.isa.name(), layout);
                }
            }
            for r in 0..rows {
                let exact: f32 = (0..cols).map(|c| w[r * cols + c] * x[c]).sum::<f32>() + bias[r];
                let tol = cols as f32 * (scale * 1.0 + 3.0 * pw.scales[r]) * 0.5 + 1e-4;
                prop_assert!((want[r] - exact).abs() <= tol, "row {}: {} vs {}", r, want[r], exact);
            }
        }

        /// The batch kernel (1–16 vectors, so full and partial groups of four)
        /// equals one GEMV per activation vector, bit for bit, and so does the
        /// row split over threads.
        #[test]
        fn gemm_equals_gemv_per_row((rows, cols, w, x, bias) in case(), batch in 1usize..40, blocks: bool) {
            let layout = if blocks { Layout::Blocks } else { Layout::Rows };
            let pw = PackedI8::quantize_as(layout, &w, rows, cols);
            let acts = quantized((0..batch).map(|i| {
                x.iter().map(|v| v * (i as f32 + 1.0) - i as f32 * 0.1).collect()
            }));
            let qs = qvecs(&acts);
            for k in isas() {
                let mut out = vec![0f32; batch * rows];
                gemm(&k, &pw, &qs, Some(&bias), &mut out);
                for (i, qx) in qs.iter().enumerate() {
                    let mut one = vec![0f32; rows];
                    gemv(&k, &pw, *qx, Some(&bias), &mut one);
                    prop_assert_eq!(&out[i * rows..(i + 1) * rows], &one[..]);
                }
                let mut par = vec![f32::NAN; batch * rows];
                gemm_par(&k, &pw, &qs, Some(&bias), &mut par, &Scoped(3));
                prop_assert_eq!(&par, &out);
            }
        }
    }

    proptest! {
        /// Matrices of any heights in one job give each one's [`gemm`] bit
        /// for bit, wherever the threads' runs of tiles start and end.
        #[test]
        fn gemm_par_many_equals_gemm_each(
            heights in proptest::collection::vec(1usize..140, 1..=MAX_PRODUCTS),
            cols in 1usize..200,
            batch in 1usize..7,
            threads in 1usize..5,
            blocks: bool,
            seed: u64,
        ) {
            let layout = if blocks { Layout::Blocks } else { Layout::Rows };
            let value = |i: usize| (((i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 2001) as f32 / 1000.0 - 1.0;
            let ws: Vec<PackedI8> = heights.iter().enumerate().map(|(m, &rows)| {
                let w: Vec<f32> = (0..rows * cols).map(|i| value(i + 7919 * m)).collect();
                PackedI8::quantize_as(layout, &w, rows, cols)
            }).collect();
            let biases: Vec<Vec<f32>> = heights.iter().map(|&rows| (0..rows).map(|r| value(r + 31) * 3.0).collect()).collect();
            let acts = quantized((0..batch).map(|b| {
                (0..cols).map(|c| value(c * 13 + b + 1) * 4.0).collect()
            }));
            let qs = qvecs(&acts);
            for k in isas() {
                let mut outs: Vec<Vec<f32>> = heights.iter().map(|&rows| vec![f32::NAN; batch * rows]).collect();
                let mut products: Vec<Product> = ws.iter().zip(&biases).zip(outs.iter_mut()).enumerate()
                    .map(|(m, ((w, b), out))| Product { w, bias: (m % 2 == 0).then_some(&b[..]), out })
                    .collect();
                gemm_par_many(&k, &qs, &mut products, &Scoped(threads));
                for (m, (w, b)) in ws.iter().zip(&biases).enumerate() {
                    let mut one = vec![0f32; batch * w.rows()];
                    gemm(&k, w, &qs, (m % 2 == 0).then_some(&b[..]), &mut one);
                    prop_assert_eq!(&outs[m], &one);
                }
            }
        }
    }

    /// The matrix kernel's path (wide rows, 5+ activations; 16+ at any
    /// width) against the generic table, bit for bit, with widths that are
    /// and are not multiples of 64 and batches ending in a partial group.
    #[test]
    fn the_matrix_kernel_path_equals_the_reference() {
        let generic = Kernels::generic();
        for cols in [64usize, 200, 512, 600, 1000] {
            let rows = 130;
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 251) as f32 / 125.0 - 1.0)
                .collect();
            let bias: Vec<f32> = (0..rows).map(|r| r as f32 * 0.01).collect();
            let pw = PackedI8::quantize_as(Layout::Blocks, &w, rows, cols);
            for batch in [5usize, 8, 16, 17, 33] {
                let acts = quantized((0..batch).map(|b| {
                    (0..cols)
                        .map(|i| ((i * 31 + b * 17) % 97) as f32 / 20.0 - 2.0)
                        .collect()
                }));
                let qs = qvecs(&acts);
                let mut want = vec![0f32; batch * rows];
                gemm(&generic, &pw, &qs, Some(&bias), &mut want);
                for k in isas() {
                    let mut got = vec![f32::NAN; batch * rows];
                    gemm(&k, &pw, &qs, Some(&bias), &mut got);
                    assert_eq!(got, want, "{} cols {cols} batch {batch}", k.isa.name());
                    let mut part = vec![f32::NAN; batch * 70];
                    gemm_rows(&k, &pw, &qs, Some(&bias), 30..100, &mut part);
                    for i in 0..batch {
                        assert_eq!(
                            part[i * 70..(i + 1) * 70],
                            want[i * rows + 30..i * rows + 100]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_split_over_threads_equal_the_whole() {
        let (rows, cols) = (37, 300);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 17 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut q = vec![0u8; cols];
        let (scale, zero_point) = dynamic_quantize_u8(&x, &mut q);
        let qx = QVec {
            q: &q,
            scale,
            zero_point,
        };
        let k = crate::kernels();
        for layout in LAYOUTS {
            let pw = PackedI8::quantize_as(layout, &w, rows, cols);
            let mut whole = vec![0f32; rows];
            gemv(k, &pw, qx, None, &mut whole);
            let mut split = vec![0f32; rows];
            // Both parts start and end inside a tile (and inside one block).
            let (a, b) = split.split_at_mut(21);
            std::thread::scope(|s| {
                s.spawn(|| gemv_rows(k, &pw, qx, None, 0..21, a));
                s.spawn(|| gemv_rows(k, &pw, qx, None, 21..rows, b));
            });
            assert_eq!(split, whole, "{layout:?}");
        }
    }

    #[test]
    #[should_panic(expected = "activation length differs")]
    fn wrong_activation_length_is_refused() {
        let pw = PackedI8::quantize(&[0.5; 8], 2, 4);
        let q = [1u8; 3];
        gemv(
            &Kernels::generic(),
            &pw,
            QVec {
                q: &q,
                scale: 1.0,
                zero_point: 0,
            },
            None,
            &mut [0.0; 2],
        );
    }
}
