//! The pieces every native model is made of: embeddings, norms, int8 linear
//! layers over a block of token rows, and attention over the paged KV cache.
//! All work in caller-provided buffers (no allocation per token).

use std::sync::Mutex;

use ember_kernels::gemv::{self, PackedI8, Parallel, QVec};
use ember_kernels::Kernels;

use super::graph::{Graph, Linear, Unrecognized, Values};
use super::kv::{KvArena, SeqBlocks, Slab, SlabView, BLOCK};
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

/// [`product`] for layers reading the same activations (q, k and v; gate
/// and up): split over the pool as one job (see [`gemv::gemm_par_many`]).
pub fn products<const N: usize>(
    k: &Kernels,
    xs: &[QVec],
    layers: [(&Linear, &mut [f32]); N],
    par: &dyn Parallel,
) {
    let macs: usize = layers
        .iter()
        .map(|(lin, _)| lin.w.rows() * lin.w.cols() * xs.len())
        .sum();
    if par.threads() > 1 && macs >= PAR_MIN_MACS {
        let mut jobs = layers.map(|(lin, out)| gemv::Product {
            w: &lin.w,
            bias: lin.bias.as_deref(),
            out: &mut out[..xs.len() * lin.w.rows()],
        });
        gemv::gemm_par_many(k, xs, &mut jobs, par)
    } else {
        for (lin, out) in layers {
            product(k, lin, xs, out, par)
        }
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
    /// Attention scratch for each of [`ATT_PARTS`] tasks: the scores of up
    /// to [`GROUP_MAX`] heads of a group (`context` long each), then a
    /// block's slab widened from a 16-bit cache.
    pub scores: Vec<f32>,
    pub logits: Vec<f32>,
    pub qr: QRows,
}

impl Work {
    /// Buffers for rows of `hidden` values, projections up to `wide` values
    /// (also the widest input a linear layer takes), `vocab` logits, and
    /// attention over `context` positions by query heads in groups of
    /// `group` sharing a KV head.
    pub fn new(
        arena: KvArena,
        hidden: usize,
        wide: usize,
        vocab: usize,
        context: usize,
        group: usize,
    ) -> Work {
        let part = group.clamp(1, GROUP_MAX) * context + arena.slab_len();
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
    pub fn apply_layer(&self, k: &Kernels, x: &[f32], out: &mut [f32]) {
        let c = self.gamma.len();
        out[..x.len()].copy_from_slice(x);
        for row in out[..x.len()].chunks_mut(c) {
            (k.layer_norm_f32)(row, &self.gamma, &self.beta, self.eps)
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

/// Most query heads [`attend_group`] takes at once (a larger group goes in
/// several calls).
pub const GROUP_MAX: usize = 16;

/// Bytes of the quantized queries of one [`attend_group`] call on an int8
/// cache (on the stack): [`GROUP_MAX`] heads of up to 256.
pub const Q8_MAX: usize = GROUP_MAX * 256;

/// Whether attention on an int8 cache takes this head size: whole groups
/// for the integer score kernel, and a group's queries within [`Q8_MAX`].
pub fn int8_attention_fits(head_dim: usize) -> bool {
    head_dim.is_multiple_of(ember_kernels::generic::KEY_GROUP) && head_dim * GROUP_MAX <= Q8_MAX
}

/// How many blocks ahead [`attend_group`] prefetches KV slabs. One block's
/// arithmetic for a group (~0.2 µs) is shorter than a 4 KiB slab takes to
/// arrive from memory; on the Zen 4 EPYC the SmolLM-135M-shaped model
/// decoded 64 + 128 positions at 129 tok/s (mean of 4 interleaved runs)
/// prefetching 1 block ahead into L1, and at 138 and 141 with 2 and 4
/// ahead into L2; at 960 positions, 78 against 89–102.
const AHEAD: usize = 4;

/// Causal attention of consecutive query heads that share KV head `kvh`,
/// for one query row at position `pos` over positions `0..=pos` of its
/// sequence: `q` and `out` hold the heads' `head_dim` values one after
/// another (at most [`GROUP_MAX`] heads). Each block of keys and values is
/// read (and widened from a 16-bit cache) once for all of them, then stays
/// in L1 for the group's other heads. `scores` is scratch of the heads'
/// count times at least `pos + 1`, `buf` of [`KvArena::slab_len`]. Every
/// head's arithmetic is the same as alone.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    k: &Kernels,
    arena: &KvArena,
    seq: &SeqBlocks,
    layer: usize,
    h: Heads,
    kvh: usize,
    q: &[f32],
    pos: usize,
    scores: &mut [f32],
    buf: &mut [f32],
    out: &mut [f32],
) {
    let hd = h.head_dim;
    let g = q.len() / hd;
    assert!(
        (1..=GROUP_MAX).contains(&g) && q.len() == g * hd && out.len() == q.len(),
        "1 to GROUP_MAX heads of head_dim values"
    );
    let n = pos + 1;
    let row = scores.len() / g;
    assert!(row >= n, "scores shorter than the context");
    let slab = arena.slab_len();
    let blocks = &seq.table[..n.div_ceil(BLOCK)];
    // An int8 cache scores in integers: each head's query quantized as the
    // keys are, its scale folded into the score scale.
    // (A heapless vector: zeroing the whole stack array per call cost more.)
    let mut q8: heapless::Vec<i8, Q8_MAX> = heapless::Vec::new();
    let mut q8_scale = [0f32; GROUP_MAX];
    if arena.is_int8() {
        q8.resize(q.len(), 0).expect("int8_attention_fits at load");
        for ((qh, q8h), s) in q
            .chunks_exact(hd)
            .zip(q8.chunks_exact_mut(hd))
            .zip(&mut q8_scale)
        {
            *s = (k.quantize_i8)(qh, q8h) * h.scale;
        }
    }
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
    // The slab AHEAD blocks on is prefetched while a block is computed: the
    // keys', then (from the last AHEAD key blocks) the values'. The first
    // AHEAD key slabs are not (asking for them before the loop measured no
    // different at 64 + 128 positions).
    for (b, &block) in blocks.iter().enumerate() {
        let m = (n - b * BLOCK).min(BLOCK);
        match blocks.get(b + AHEAD) {
            Some(&next) => arena.prefetch(keys(next), slab),
            None => {
                if let Some(&v) = blocks.get(b + AHEAD - blocks.len()) {
                    arena.prefetch(values(v), slab)
                }
            }
        }
        let view = arena.read(k, keys(block), slab, buf);
        for (i, (qh, s)) in q
            .chunks_exact(hd)
            .zip(scores.chunks_exact_mut(row))
            .enumerate()
        {
            let s = &mut s[b * BLOCK..b * BLOCK + m];
            match view {
                SlabView::F32(keys) => (k.qk_f32)(qh, keys, h.scale, s),
                SlabView::I8(keys, ks) => {
                    (k.qk_q8)(&q8[i * hd..(i + 1) * hd], keys, ks, q8_scale[i], s)
                }
            }
        }
    }
    let mut inv = [0f32; GROUP_MAX];
    for (i, s) in inv.iter_mut().zip(scores.chunks_exact_mut(row)) {
        *i = 1.0 / (k.softmax_f32)(&mut s[..n]);
    }
    out.fill(0.0);
    for (b, &block) in blocks.iter().enumerate() {
        let m = (n - b * BLOCK).min(BLOCK);
        if let Some(&next) = blocks.get(b + AHEAD) {
            let m = (n - (b + AHEAD) * BLOCK).min(BLOCK);
            arena.prefetch(values(next), m * hd);
        }
        let view = arena.read(k, values(block), m * hd, buf);
        for ((o, s), &inv) in out
            .chunks_exact_mut(hd)
            .zip(scores.chunks_exact(row))
            .zip(&inv)
        {
            let p = &s[b * BLOCK..b * BLOCK + m];
            match view {
                SlabView::F32(vals) => (k.pv_f32)(p, inv, vals, o),
                // An int8 cache's values: each position's scale, on its weight.
                SlabView::I8(vals, vs) => {
                    let mut w = [0f32; BLOCK];
                    for ((w, &p), &v) in w.iter_mut().zip(p).zip(vs) {
                        *w = p * v;
                    }
                    (k.pv_q8)(&w[..m], inv, vals, o)
                }
            }
        }
    }
}

/// Store one row's keys and values (`kv_heads × head_dim` each, head after
/// head) in its sequence's cache at position `pos` of `layer`.
#[allow(clippy::too_many_arguments)]
pub fn store_kv(
    k: &Kernels,
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
        arena.put(k, seq, pos, layer, false, head, &keys[at..at + hd]);
        arena.put(k, seq, pos, layer, true, head, &vals[at..at + hd]);
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
/// `out[r * heads · head_dim..]`. The work is cut in units of consecutive
/// query heads sharing a KV head ([`attend_group`]), a whole group each
/// unless there would be too few units for the pool's threads; the units
/// are split over the threads in contiguous runs, each with its own slice
/// of `scores` (`ATT_PARTS` parts).
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
    let products: usize = rows.iter().map(|r| r.pos + 1).sum::<usize>() * h.heads * h.head_dim;
    let threads = if products >= ATT_PAR_MIN {
        par.threads().max(1)
    } else {
        1
    };
    let hd = h.head_dim;
    let group = h.heads / h.kv_heads;
    // Units per group: enough for two per thread where the rows and groups
    // alone are fewer, and at most GROUP_MAX heads each.
    let groups = rows.len() * h.kv_heads;
    let wanted = if threads > 1 {
        (2 * threads).div_ceil(groups)
    } else {
        1
    };
    let cuts = wanted.max(group.div_ceil(GROUP_MAX)).clamp(1, group);
    let per_unit = group.div_ceil(cuts);
    let cuts = group.div_ceil(per_unit);
    let units = groups * cuts;
    // Unit u: its first head (over the whole chunk, row-major) and count.
    let unit = |u: usize| {
        let (rg, c) = (u / cuts, u % cuts);
        let first = rg * group + c * per_unit;
        (first, per_unit.min(group - c * per_unit))
    };
    let parts = threads.clamp(1, ATT_PARTS.min(units));
    let per = units.div_ceil(parts);
    let mut outs: heapless::Vec<Mutex<&mut [f32]>, MAX_PARTS> = heapless::Vec::new();
    let mut rest = &mut out[..rows.len() * h.heads * hd];
    for p in 0..units.div_ceil(per) {
        let last = ((p + 1) * per).min(units) - 1;
        let (first, _) = unit(p * per);
        let (l0, ln) = unit(last);
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut((l0 + ln - first) * hd);
        rest = tail;
        outs.push(Mutex::new(mine))
            .expect("at most ATT_PARTS parts");
    }
    let part = scores.len() / ATT_PARTS;
    let scratch = split_parts(scores, part);
    let slab = arena.slab_len();
    par.run(outs.len(), &|p| {
        let mut o = outs[p].lock().unwrap_or_else(|e| e.into_inner());
        let mut s = scratch[p].lock().unwrap_or_else(|e| e.into_inner());
        let (s, buf) = s.split_at_mut(part - slab);
        let base = unit(p * per).0;
        for u in p * per..((p + 1) * per).min(units) {
            let (first, count) = unit(u);
            let (r, head) = (first / h.heads, first % h.heads);
            let row = &rows[r];
            let qh = &q[r * stride + head * hd..][..count * hd];
            let oh = &mut o[(first - base) * hd..][..count * hd];
            attend_group(
                k,
                arena,
                jobs[row.job].blocks,
                layer,
                h,
                head / group,
                qh,
                row.pos,
                s,
                buf,
                oh,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::native::kv::KvShape;
    use crate::engine::KvType;

    /// Runs tasks one after another but claims `n` threads, so
    /// [`attend_rows`] cuts its work as it would for a pool.
    struct Claims(usize);

    impl Parallel for Claims {
        fn threads(&self) -> usize {
            self.0
        }
        fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
            (0..n).rev().for_each(task)
        }
    }

    /// Grouped-query attention cut into units for threads (whole groups,
    /// groups split in two, groups above GROUP_MAX) gives every head the
    /// bits it gets alone on one thread.
    #[test]
    fn attention_units_change_nothing() {
        let k = ember_kernels::kernels();
        let shapes = [(9, 3, 1), (4, 2, 1), (6, 1, 2), (40, 2, 1), (4, 4, 3)];
        for ((heads, kv_heads, rows), kind) in shapes
            .into_iter()
            .flat_map(|s| [(s, KvType::F32), (s, KvType::I8)])
        {
            // Long enough for ATT_PAR_MIN products, so the work is cut.
            let (hd, len) = (16, 64 * BLOCK + 5);
            assert!(len * heads * hd >= ATT_PAR_MIN);
            let shape = KvShape {
                layers: 1,
                kv_heads,
                head_dim: hd,
            };
            let h = Heads {
                heads,
                kv_heads,
                head_dim: hd,
                scale: 0.3,
            };
            let (mut arena, pool) = KvArena::new(shape, 65 * rows, kind);
            let value = |i: usize| ((i * 7919) % 263) as f32 / 131.0 - 1.0;
            let mut seqs = vec![];
            for s in 0..rows {
                let mut b = SeqBlocks::new(&pool, len);
                b.reserve(len).unwrap();
                for pos in 0..len {
                    let at = (s * len + pos) * 2 * kv_heads * hd;
                    let kv: Vec<f32> = (at..at + 2 * kv_heads * hd).map(value).collect();
                    let (keys, vals) = kv.split_at(kv_heads * hd);
                    store_kv(k, &mut arena, &b, pos, 0, h, keys, vals);
                }
                seqs.push(b);
            }
            let mut outs: Vec<Vec<f32>> = vec![vec![]; rows];
            let jobs: Vec<Job<'_>> = seqs
                .iter()
                .zip(&mut outs)
                .map(|(b, out)| Job {
                    blocks: b,
                    past: len - 1,
                    tokens: &[0],
                    all: false,
                    out,
                })
                .collect();
            let rs: Vec<Row> = (0..rows)
                .map(|r| Row {
                    job: r,
                    pos: len - 1 - r,
                    token: 0,
                    t: 0,
                    want: true,
                })
                .collect();
            let q: Vec<f32> = (0..rows * heads * hd).map(|i| value(i + 5)).collect();
            let group = heads / kv_heads;
            let part = group.min(GROUP_MAX) * len + arena.slab_len();
            let run = |threads: usize| {
                let mut scores = vec![0.0; ATT_PARTS * part];
                let mut out = vec![0.0; rows * heads * hd];
                attend_rows(
                    k,
                    &arena,
                    &rs,
                    &jobs,
                    0,
                    h,
                    &q,
                    heads * hd,
                    &mut scores,
                    &mut out,
                    &Claims(threads),
                );
                out
            };
            let one = run(1);
            assert!(one.iter().all(|v| v.is_finite()) && one.iter().any(|&v| v != 0.0));
            for threads in [2, 3, 8] {
                assert!(
                    run(threads) == one,
                    "{heads} heads, {kv_heads} KV heads, {rows} rows, {threads} threads"
                );
            }
            // Each head against the plain one-head formula (an int8 cache
            // holds values within half a step of these).
            let tolerance = if kind == KvType::F32 { 1e-4 } else { 2e-2 };
            for (r, row) in rs.iter().enumerate() {
                for head in 0..heads {
                    let qh = &q[(r * heads + head) * hd..][..hd];
                    let kvh = head / group;
                    let n = row.pos + 1;
                    let at = |pos: usize| (r * len + pos) * 2 * kv_heads * hd;
                    let scores: Vec<f32> = (0..n)
                        .map(|p| {
                            let key = (at(p) + kvh * hd..at(p) + (kvh + 1) * hd).map(value);
                            qh.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * h.scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f32::MIN, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    for d in 0..hd {
                        let want: f32 = (0..n)
                            .map(|p| e[p] / sum * value(at(p) + (kv_heads + kvh) * hd + d))
                            .sum();
                        let got = one[(r * heads + head) * hd + d];
                        assert!(
                            (got - want).abs() < tolerance,
                            "{kind:?} head {head} dim {d}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
