//! The pieces every native model is made of: embeddings, norms, int8 linear
//! layers over a block of token rows, and attention over the paged KV cache.
//! All work in caller-provided buffers (no allocation per token).

use std::sync::Mutex;

use ember_kernels::gemv::{self, PackedI8, Parallel, QVec};
use ember_kernels::Kernels;

use super::graph::{Graph, Linear, Unrecognized, Values};
use super::kv::{KvArena, SeqBlocks, Slab, BLOCK};
use super::{Job, Row, Sequence};
use tract_onnx::pb;

/// Token rows a step computes at once (longer prompts go in chunks).
pub const MAX_ROWS: usize = 64;

/// Below this many multiply-adds a product stays on one thread (waking the
/// others costs more than it saves).
pub const PAR_MIN_MACS: usize = 1 << 16;

/// An embedding table, kept as the file stores it and dequantized a row at a time.
#[derive(Debug)]
pub enum Embedding {
    F32 {
        data: Vec<f32>,
        cols: usize,
    },
    U8 {
        data: Vec<u8>,
        cols: usize,
        scale: f32,
        zero_point: u8,
    },
    I8 {
        data: Vec<i8>,
        cols: usize,
        scale: f32,
    },
}

impl Embedding {
    /// The table read by `Gather(table, indices)`, through a following
    /// `DequantizeLinear` when the table is quantized.
    pub fn from_gather(g: &Graph, gather: &pb::NodeProto) -> Result<Embedding, Unrecognized> {
        let (shape, vals) = g.konst(&gather.input[0])?;
        let [_, cols] = shape[..] else {
            return Err(format!("embedding '{}' is not a matrix", gather.input[0]));
        };
        let dq = || {
            g.consumer_op(&gather.output[0], "DequantizeLinear")
                .ok_or_else(|| {
                    format!(
                        "quantized embedding '{}' without DequantizeLinear",
                        gather.input[0]
                    )
                })
        };
        Ok(match vals {
            Values::F32(data) => Embedding::F32 { data, cols },
            Values::U8(data) => {
                let dq = dq()?;
                let zp = match dq.input.get(2).filter(|z| !z.is_empty()) {
                    Some(z) => match g.konst(z)?.1 {
                        Values::U8(v) if v.len() == 1 => v[0],
                        _ => return Err("embedding zero point is not one u8".into()),
                    },
                    None => 0,
                };
                Embedding::U8 {
                    data,
                    cols,
                    scale: g.scalar(&dq.input[1])?,
                    zero_point: zp,
                }
            }
            Values::I8(data) => {
                let dq = dq()?;
                if dq.input.get(2).is_some_and(|z| !z.is_empty()) {
                    match g.konst(&dq.input[2])?.1 {
                        Values::I8(v) if v.iter().all(|&z| z == 0) => {}
                        _ => return Err("embedding zero point is not 0".into()),
                    }
                }
                Embedding::I8 {
                    data,
                    cols,
                    scale: g.scalar(&dq.input[1])?,
                }
            }
        })
    }

    pub fn rows(&self) -> usize {
        match self {
            Embedding::F32 { data, cols } => data.len() / cols,
            Embedding::U8 { data, cols, .. } => data.len() / cols,
            Embedding::I8 { data, cols, .. } => data.len() / cols,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Embedding::F32 { cols, .. }
            | Embedding::U8 { cols, .. }
            | Embedding::I8 { cols, .. } => *cols,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Embedding::F32 { data, .. } => data.len() * 4,
            Embedding::U8 { data, .. } => data.len(),
            Embedding::I8 { data, .. } => data.len(),
        }
    }

    /// `out += row i` (`add`) or `out = row i`.
    pub fn read(&self, i: usize, out: &mut [f32], add: bool) {
        let c = self.cols();
        let put = |o: &mut f32, v: f32| {
            if add {
                *o += v
            } else {
                *o = v
            }
        };
        match self {
            Embedding::F32 { data, .. } => {
                for (o, &v) in out.iter_mut().zip(&data[i * c..(i + 1) * c]) {
                    put(o, v)
                }
            }
            Embedding::U8 {
                data,
                scale,
                zero_point,
                ..
            } => {
                for (o, &v) in out.iter_mut().zip(&data[i * c..(i + 1) * c]) {
                    put(o, (v as i32 - *zero_point as i32) as f32 * scale)
                }
            }
            Embedding::I8 { data, scale, .. } => {
                for (o, &v) in out.iter_mut().zip(&data[i * c..(i + 1) * c]) {
                    put(o, v as f32 * scale)
                }
            }
        }
    }
}

/// u8 quantization of activation rows into the scratch, ready for
/// [`run_linear`]. One scale per *group* of rows: the rows of one sequence in
/// a chunk share it, as onnxruntime's `DynamicQuantizeLinear` quantizes the
/// whole `[tokens, width]` tensor of one call with one scale. So a prompt of
/// up to [`MAX_ROWS`] tokens and every decode step quantize exactly as
/// onnxruntime does, and sequences batched together never affect each other.
pub struct QRows {
    q: Vec<u8>,
    scale: Vec<f32>,
    zp: Vec<u8>,
}

impl std::fmt::Debug for QRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QRows")
            .field("bytes", &self.q.len())
            .finish()
    }
}

impl QRows {
    pub fn new(max_cols: usize) -> QRows {
        QRows {
            q: vec![0; MAX_ROWS * max_cols],
            scale: vec![0.0; MAX_ROWS],
            zp: vec![0; MAX_ROWS],
        }
    }

    /// Quantize `src` (`n × cols`, n ≤ MAX_ROWS); `group[r]` names row r's
    /// group (equal values are contiguous). Returns the activation vectors.
    pub fn quantize(
        &mut self,
        k: &Kernels,
        src: &[f32],
        cols: usize,
        group: impl Fn(usize) -> usize,
    ) -> heapless::Vec<QVec<'_>, MAX_ROWS> {
        self.quantize_where(k, src, cols, group, |_| true)
    }

    /// [`QRows::quantize`] of the rows `keep` selects only, each with the
    /// parameters of its whole group: the logits of a prompt's last token,
    /// quantized as onnxruntime quantizes the head's input for all of them.
    pub fn quantize_where(
        &mut self,
        k: &Kernels,
        src: &[f32],
        cols: usize,
        group: impl Fn(usize) -> usize,
        keep: impl Fn(usize) -> bool,
    ) -> heapless::Vec<QVec<'_>, MAX_ROWS> {
        let n = src.len() / cols;
        assert!(n <= MAX_ROWS && n * cols == src.len());
        let (mut start, mut m) = (0, 0);
        while start < n {
            let mut end = start + 1;
            while end < n && group(end) == group(start) {
                end += 1;
            }
            let (s, z) = (k.dynamic_params)(&src[start * cols..end * cols]);
            for r in (start..end).filter(|&r| keep(r)) {
                let q = &mut self.q[m * cols..(m + 1) * cols];
                (k.quantize_u8)(&src[r * cols..(r + 1) * cols], s, z, q);
                self.scale[m] = s;
                self.zp[m] = z;
                m += 1;
            }
            start = end;
        }
        let mut v = heapless::Vec::new();
        for r in 0..m {
            let _ = v.push(QVec {
                q: &self.q[r * cols..(r + 1) * cols],
                scale: self.scale[r],
                zero_point: self.zp[r],
            });
        }
        v
    }
}

/// `out[i] = lin · src[i] (+ bias)` for the rows of `src`, quantized by group (see [`QRows`]).
pub fn run_linear(
    k: &Kernels,
    lin: &Linear,
    src: &[f32],
    group: impl Fn(usize) -> usize,
    qr: &mut QRows,
    out: &mut [f32],
    par: &dyn Parallel,
) {
    let xs = qr.quantize(k, src, lin.w.cols(), group);
    product(k, lin, &xs, out, par)
}

/// `out[i] = lin · xs[i] (+ bias)` on activations already quantized, so
/// layers reading the same tensor (q, k, v; gate, up) quantize it once.
pub fn product(k: &Kernels, lin: &Linear, xs: &[QVec], out: &mut [f32], par: &dyn Parallel) {
    let w: &PackedI8 = &lin.w;
    let out = &mut out[..xs.len() * w.rows()];
    if par.threads() > 1 && w.rows() * w.cols() * xs.len() >= PAR_MIN_MACS {
        gemv::gemm_par(k, w, xs, lin.bias.as_deref(), out, par)
    } else {
        gemv::gemm(k, w, xs, lin.bias.as_deref(), out)
    }
}

/// Scratch for one step, sized at load (every family uses the same buffers
/// for its own purposes).
#[derive(Debug)]
pub struct Work {
    pub arena: KvArena,
    /// The residual stream, `MAX_ROWS × hidden`.
    pub x: Vec<f32>,
    /// Normalized rows, `MAX_ROWS × hidden`.
    pub h: Vec<f32>,
    /// Projections wider than the hidden size, `MAX_ROWS × wide`.
    pub big: Vec<f32>,
    pub tmp: Vec<f32>,
    /// Attention output, `MAX_ROWS × hidden`.
    pub att: Vec<f32>,
    /// Attention scratch for each of [`ATT_PARTS`] tasks: one head's scores
    /// (`context` long), then a block's slab widened from a 16-bit cache.
    pub scores: Vec<f32>,
    pub logits: Vec<f32>,
    pub qr: QRows,
}

impl Work {
    /// Buffers for rows of `hidden` values, projections up to `wide` values
    /// (also the widest input a linear layer takes), `vocab` logits.
    pub fn new(arena: KvArena, hidden: usize, wide: usize, vocab: usize, context: usize) -> Work {
        let part = context + arena.slab_len();
        Work {
            scores: vec![0.0; ATT_PARTS * part],
            arena,
            x: vec![0.0; MAX_ROWS * hidden],
            h: vec![0.0; MAX_ROWS * hidden],
            big: vec![0.0; MAX_ROWS * wide],
            tmp: vec![0.0; MAX_ROWS * hidden],
            att: vec![0.0; MAX_ROWS * hidden],
            logits: vec![0.0; MAX_ROWS * vocab],
            qr: QRows::new(hidden.max(wide)),
        }
    }
}

/// `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// The output head on the final-normed rows `x` (one per row of `rows`),
/// for the rows that want logits, copied into their jobs' outputs (decoder
/// and recurrent jobs alike). The head's input is quantized per group with
/// the parameters of all its rows, as the graph quantizes the whole tensor
/// before the last position is taken, so a prompt's last logits equal
/// onnxruntime's.
#[allow(clippy::too_many_arguments)]
pub fn head_logits<J: Sequence>(
    k: &Kernels,
    head: &Linear,
    x: &[f32],
    rows: &[Row],
    jobs: &mut [J],
    qr: &mut QRows,
    logits: &mut [f32],
    par: &dyn Parallel,
) {
    let xs = qr.quantize_where(k, x, head.w.cols(), |r| rows[r].job, |r| rows[r].want);
    if xs.is_empty() {
        return;
    }
    product(k, head, &xs, logits, par);
    let vocab = head.w.rows();
    for (m, row) in rows.iter().filter(|r| r.want).enumerate() {
        let job = &mut jobs[row.job];
        let at = if job.all() { row.t * vocab } else { 0 };
        job.out()[at..at + vocab].copy_from_slice(&logits[m * vocab..(m + 1) * vocab]);
    }
}

/// Layer norm with scale and shift.
#[derive(Debug)]
pub struct Norm {
    pub gamma: Vec<f32>,
    /// Zeros when the file has none.
    pub beta: Vec<f32>,
    pub eps: f32,
}

impl Norm {
    /// `LayerNormalization(x, gamma, beta)` over the last axis.
    pub fn layer_norm(g: &Graph, n: &pb::NodeProto) -> Result<Norm, Unrecognized> {
        if super::graph::attr::<i64>(n, "axis").unwrap_or(-1) != -1 {
            return Err(format!(
                "LayerNormalization '{}' not over the last axis",
                n.name
            ));
        }
        let gamma = g.f32s(&n.input[1])?;
        let beta = match n.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => g.f32s(b)?,
            None => vec![0.0; gamma.len()],
        };
        if beta.len() != gamma.len() {
            return Err(format!(
                "LayerNormalization '{}': scale and bias differ in length",
                n.name
            ));
        }
        Ok(Norm {
            gamma,
            beta,
            eps: super::graph::attr::<f32>(n, "epsilon").unwrap_or(1e-5),
        })
    }

    /// Layer-normalize each row of `x` (`cols = gamma.len()`) into `out`.
    pub fn apply_layer(&self, x: &[f32], out: &mut [f32]) {
        let c = self.gamma.len();
        out[..x.len()].copy_from_slice(x);
        for row in out[..x.len()].chunks_mut(c) {
            ember_kernels::nn::layer_norm(row, &self.gamma, &self.beta, self.eps)
        }
    }
}

/// Attention geometry.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Causal attention of one head of one query row at position `pos` over
/// positions `0..=pos` of its sequence: `q` and `out` are the head's
/// `head_dim` values; `scores` is scratch of at least `pos + 1`, `buf` of
/// [`KvArena::slab_len`] (where a 16-bit cache's blocks are widened).
#[allow(clippy::too_many_arguments)]
pub fn attend_head(
    k: &Kernels,
    arena: &KvArena,
    seq: &SeqBlocks,
    layer: usize,
    h: Heads,
    head: usize,
    q: &[f32],
    pos: usize,
    scores: &mut [f32],
    buf: &mut [f32],
    out: &mut [f32],
) {
    let hd = h.head_dim;
    let kvh = head / (h.heads / h.kv_heads);
    let n = pos + 1;
    let slab = arena.slab_len();
    let scores = &mut scores[..n];
    let blocks = &seq.table[..n.div_ceil(BLOCK)];
    let keys = |block| Slab {
        block,
        layer,
        value: false,
        head: kvh,
    };
    let values = |block| Slab {
        value: true,
        ..keys(block)
    };
    // Each block's successor is prefetched while it is computed.
    for (b, &block) in blocks.iter().enumerate() {
        let m = (n - b * BLOCK).min(BLOCK);
        match blocks.get(b + 1) {
            Some(&next) => arena.prefetch(keys(next), slab),
            None => arena.prefetch(values(blocks[0]), slab),
        }
        let keys = arena.read(k, keys(block), slab, buf);
        (k.qk_f32)(q, keys, h.scale, &mut scores[b * BLOCK..b * BLOCK + m]);
    }
    let inv = 1.0 / (k.softmax_f32)(scores);
    out.fill(0.0);
    for (b, &block) in blocks.iter().enumerate() {
        let m = (n - b * BLOCK).min(BLOCK);
        if let Some(&next) = blocks.get(b + 1) {
            let m = (n - (b + 1) * BLOCK).min(BLOCK);
            arena.prefetch(values(next), m * hd);
        }
        let vals = arena.read(k, values(block), m * hd, buf);
        (k.pv_f32)(&scores[b * BLOCK..b * BLOCK + m], inv, vals, out);
    }
}

/// Store one row's keys and values (`kv_heads × head_dim` each, head after
/// head) in its sequence's cache at position `pos` of `layer`.
pub fn store_kv(
    arena: &mut KvArena,
    seq: &SeqBlocks,
    pos: usize,
    layer: usize,
    h: Heads,
    keys: &[f32],
    vals: &[f32],
) {
    let hd = h.head_dim;
    for head in 0..h.kv_heads {
        let at = head * hd;
        arena.put(seq, pos, layer, false, head, &keys[at..at + hd]);
        arena.put(seq, pos, layer, true, head, &vals[at..at + hd]);
    }
}

/// Most tasks attention is split into; `Work::scores` holds a scratch row
/// for each.
pub const ATT_PARTS: usize = 8;

/// Attention below this many query·key products stays on the calling thread
/// (a pool dispatch costs about as much as ~64K of them).
const ATT_PAR_MIN: usize = 1 << 16;

/// Causal attention for every row of a chunk over its own sequence: row
/// `r`'s query is `q[r * stride..]` (`heads × head_dim` values), its output
/// `out[r * heads · head_dim..]`. The (row, head) pairs are split over the
/// pool's threads in contiguous runs, each with its own slice of `scores`
/// (`ATT_PARTS` rows of the context).
#[allow(clippy::too_many_arguments)]
pub fn attend_rows(
    k: &Kernels,
    arena: &KvArena,
    rows: &[Row],
    jobs: &[Job<'_>],
    layer: usize,
    h: Heads,
    q: &[f32],
    stride: usize,
    scores: &mut [f32],
    out: &mut [f32],
    par: &dyn Parallel,
) {
    let (hd, units) = (h.head_dim, rows.len() * h.heads);
    let products: usize = rows.iter().map(|r| r.pos + 1).sum::<usize>() * h.heads * hd;
    let parts = if products >= ATT_PAR_MIN {
        par.threads().clamp(1, ATT_PARTS.min(units))
    } else {
        1
    };
    let per = units.div_ceil(parts).max(1);
    let outs = split_parts(&mut out[..units * hd], per * hd);
    let part = scores.len() / ATT_PARTS;
    let scratch = split_parts(scores, part);
    let context = part - arena.slab_len();
    par.run(outs.len(), &|p| {
        let mut o = outs[p].lock().unwrap_or_else(|e| e.into_inner());
        let mut s = scratch[p].lock().unwrap_or_else(|e| e.into_inner());
        let (s, buf) = s.split_at_mut(context);
        for (u, o) in (p * per..).zip(o.chunks_mut(hd)) {
            let (r, head) = (u / h.heads, u % h.heads);
            let row = &rows[r];
            let qh = &q[r * stride + head * hd..][..hd];
            attend_head(
                k,
                arena,
                jobs[row.job].blocks,
                layer,
                h,
                head,
                qh,
                row.pos,
                s,
                buf,
                o,
            );
        }
    });
}

/// Most parts a buffer is split into for the pool.
pub const MAX_PARTS: usize = 64;

/// `buf` in chunks of `size` (the last shorter), each behind a mutex so
/// pool tasks can take their own.
pub fn split_parts(buf: &mut [f32], size: usize) -> heapless::Vec<Mutex<&mut [f32]>, MAX_PARTS> {
    let mut v = heapless::Vec::new();
    for c in buf.chunks_mut(size.max(1)) {
        v.push(Mutex::new(c)).expect("at most MAX_PARTS parts");
    }
    v
}
