//! LSTM language models: an embedding, stacked ONNX `LSTM` layers (gates
//! i, o, f, c; sigmoid/tanh; no peepholes, no clipping) and an output head.
//!
//! Why this shape: a decode step of an LSTM is two matrix-vector products
//! per layer (input and recurrent weights) followed by the cell's
//! element-wise update. The products run over weights packed by *unit
//! group*: the four gates of 16 hidden units sit next to each other, so one
//! task computes those 64 gate values and updates its 16 units' cell and
//! hidden state at once, and a step splits over threads by unit groups with
//! one barrier. The weights stay fp32, as the file holds them (exporters do
//! not quantize `LSTM`); only the head is int8 when the file's is.
//!
//! A prompt's input products run for all its tokens at once (the weights
//! are read once per chunk); only the recurrent product is step by step.

use std::sync::Mutex;

use ember_kernels::gemv::{PackedI8, Parallel, Serial};
use ember_kernels::Kernels;

use super::graph::{attr, Graph, Linear, Unrecognized, Values};
use super::ops::{
    add, head_logits, run_linear, split_parts, Embedding, QRows, MAX_PARTS, MAX_ROWS, PAR_MIN_MACS,
};
use super::pool::SpinPool;
use super::{check_tokens, run_chunks, RnnState, Row, Sequence};
use crate::engine::{Backend, BatchItem, EngineError, Footprint, Inner, Logits, SeqState};
use crate::model::{Family, LstmIo};
use tract_onnx::pb;

/// Hidden units per group: the width of the float kernels' accumulators.
const UNITS: usize = 16;

/// Gate values of one unit group: i, o, f, c for [`UNITS`] units.
const GATES: usize = 4 * UNITS;

/// One gate matrix (`W` or `R`, ONNX `[4·hidden, cols]`, gates i, o, f, c)
/// packed by unit group for [`Kernels::panel_f32`]: group `q` is a
/// `[cols][GATES]` panel whose row `k` holds input `k`'s weights into the
/// four gates of the group's [`UNITS`] units, so a product streams it once,
/// contiguously, into 64 accumulators per sequence.
#[derive(Debug)]
struct Panels {
    data: Vec<f32>,
    cols: usize,
}

impl Panels {
    fn pack(m: &[f32], hidden: usize, cols: usize) -> Panels {
        assert_eq!(m.len(), 4 * hidden * cols);
        let mut data = Vec::with_capacity(m.len());
        for q in 0..hidden / UNITS {
            for c in 0..cols {
                for gate in 0..4 {
                    for u in 0..UNITS {
                        data.push(m[(gate * hidden + q * UNITS + u) * cols + c]);
                    }
                }
            }
        }
        Panels { data, cols }
    }

    /// `out[b] += W · xs[b]` for unit group `q`'s four gates (1–4 rows,
    /// `GATES` values each).
    fn add_product(&self, k: &Kernels, q: usize, xs: &[&[f32]], out: &mut [f32]) {
        let panel = self.cols * GATES;
        (k.panel_f32)(xs, &self.data[q * panel..(q + 1) * panel], out);
    }

    fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// One LSTM layer's weights, as the file holds them or quantized at load.
#[derive(Debug)]
enum Layer {
    F32(F32Layer),
    I8(I8Layer),
}

#[derive(Debug)]
struct F32Layer {
    /// The input product's weights, or its every value.
    input: Input,
    /// Recurrent weights, `cols` = hidden.
    r: Panels,
    /// `Wb + Rb`, by unit group (`[groups][GATES]`).
    bias: Vec<f32>,
}

/// How an fp32 layer gets its input product `bias + W·x`.
#[derive(Debug)]
enum Input {
    /// Input weights, `cols` = the layer's input width.
    Weights(Panels),
    /// First layer only, when small enough ([`FOLD_MAX_BYTES`]): `bias + W·x`
    /// for every token's embedding `x`, `[vocab][groups][GATES]`. Neither
    /// `W` nor the embedding is kept.
    ByToken(Vec<f32>),
}

/// Largest table of first-layer input products kept ([`Input::ByToken`]).
///
/// The first layer's input is an embedding row, so its input product takes
/// one of `vocab` values: computed once at load with the same kernel (bit for
/// bit what a step would compute), a step reads the token's row of the table
/// (`4·hidden` floats) instead of the whole `W` (kjv-lstm: 4 KiB instead of
/// 1 MiB of the 5.2 MiB a step read). The cost is `vocab × 4·hidden` floats
/// (kjv-lstm: 16 MiB, less the embedding and `W` it replaces, 2 MiB), so
/// only small vocabularies get it.
const FOLD_MAX_BYTES: usize = 32 << 20;

impl F32Layer {
    /// Replace the input weights by [`Input::ByToken`], computed from the
    /// embedding (the layer's input).
    fn fold(&mut self, k: &Kernels, embed: &Embedding) {
        let Input::Weights(w) = &self.input else {
            return;
        };
        let g4 = self.bias.len();
        let mut x = vec![0f32; embed.cols()];
        let mut table = vec![0f32; embed.rows() * g4];
        for (v, gates) in table.chunks_mut(g4).enumerate() {
            embed.read(v, &mut x, false);
            for (q, o) in gates.chunks_mut(GATES).enumerate() {
                o.copy_from_slice(&self.bias[q * GATES..(q + 1) * GATES]);
                w.add_product(k, q, &[&x], o);
            }
        }
        self.input = Input::ByToken(table);
    }
}

/// A layer quantized at load (`quantize_fp32`): per-row int8 weights in
/// ONNX gate order, read by the int8 GEMM; activations (the input rows and
/// each sequence's hidden state) quantized per sequence and step.
#[derive(Debug)]
struct I8Layer {
    /// Input weights with `Wb + Rb` as the bias.
    w: Linear,
    r: Linear,
}

impl Layer {
    fn bytes(&self) -> usize {
        match self {
            Layer::F32(l) => {
                let input = match &l.input {
                    Input::Weights(w) => w.bytes(),
                    Input::ByToken(t) => 4 * t.len(),
                };
                input + l.r.bytes() + 4 * l.bias.len()
            }
            Layer::I8(l) => l.w.bytes() + l.r.bytes(),
        }
    }

    /// Weight bytes one step reads.
    fn streamed(&self) -> usize {
        match self {
            Layer::F32(l) => match &l.input {
                Input::Weights(w) => w.bytes() + l.r.bytes(),
                // The token's row of the table: as many floats as the bias.
                Input::ByToken(_) => l.r.bytes() + 4 * l.bias.len(),
            },
            Layer::I8(l) => l.w.w.weight_bytes() + l.r.w.weight_bytes(),
        }
    }
}

/// A chunk's sequences: their runs of rows and the steps they take.
#[derive(Debug, Clone, Copy)]
struct Steps<'a> {
    rows: &'a [Row],
    runs: &'a [Run],
    /// Rows.
    n: usize,
    /// Sequences.
    ns: usize,
    /// Longest run.
    steps: usize,
}

/// An LSTM language model read from its ONNX graph.
#[derive(Debug)]
pub struct Lstm {
    hidden: usize,
    vocab: usize,
    /// The token embedding, unless the first layer folded it away.
    embed: Option<Embedding>,
    /// Its width (the first layer's input).
    embed_cols: usize,
    layers: Vec<Layer>,
    head: Linear,
}

/// One sequence's part of a step: its state (`[layers][h, c][hidden]`),
/// tokens and logits.
pub(crate) struct RnnJob<'a> {
    pub state: &'a mut [f32],
    pub tokens: &'a [u32],
    pub all: bool,
    pub out: &'a mut Vec<f32>,
}

impl Sequence for RnnJob<'_> {
    fn past(&self) -> usize {
        0
    }
    fn tokens(&self) -> &[u32] {
        self.tokens
    }
    fn all(&self) -> bool {
        self.all
    }
    fn out(&mut self) -> &mut Vec<f32> {
        self.out
    }
}

/// Scratch for one chunk, sized at load.
#[derive(Debug)]
pub struct LstmWork {
    /// Layer input rows, `MAX_ROWS × widest input`.
    x: Vec<f32>,
    /// Layer output rows, `MAX_ROWS × hidden`.
    y: Vec<f32>,
    /// Gate values, `[groups][MAX_ROWS][GATES]`.
    gates: Vec<f32>,
    /// Each chunk sequence's hidden state, `MAX_ROWS × hidden`.
    h: Vec<f32>,
    /// New hidden and cell states, `[groups][MAX_ROWS][UNITS]`.
    h_new: Vec<f32>,
    c: Vec<f32>,
    /// Recurrent products of the int8 layers, `MAX_ROWS × 4·hidden`.
    rec: Vec<f32>,
    logits: Vec<f32>,
    qr: QRows,
}

/// The consecutive rows of one sequence within a chunk.
#[derive(Debug, Clone, Copy)]
struct Run {
    job: usize,
    first: usize,
    len: usize,
}

impl Lstm {
    /// Recognise embedding → LSTM × layers → head; any deviation is a reason
    /// to stay on tract.
    pub fn recognize(g: &Graph, io: &LstmIo, quantize_fp32: bool) -> Result<Lstm, Unrecognized> {
        Lstm::recognize_folding(g, io, quantize_fp32, true)
    }

    /// [`Lstm::recognize`], folding the first layer's input product into a
    /// table by token where it may.
    fn recognize_folding(
        g: &Graph,
        io: &LstmIo,
        quantize_fp32: bool,
        fold: bool,
    ) -> Result<Lstm, Unrecognized> {
        g.check_ops(&["LSTM"], "LSTM")?;
        let lstms: Vec<&pb::NodeProto> = g.nodes().iter().filter(|n| n.op_type == "LSTM").collect();
        if lstms.len() != io.layers {
            return Err(format!(
                "{} LSTM nodes for a state of {} layers",
                lstms.len(),
                io.layers
            ));
        }
        let hidden = io.hidden;
        if hidden == 0 || !hidden.is_multiple_of(UNITS) {
            return Err(format!("hidden size {hidden} is not a multiple of {UNITS}"));
        }
        let gather = g.gather_of(&io.input_ids)?;
        let embed = Embedding::from_gather(g, gather)?;
        let mut layers = vec![];
        let mut input = embed.cols();
        let mut prev = gather.output[0].as_str();
        for (i, n) in lstms.iter().enumerate() {
            check_attrs(n, hidden).map_err(|e| format!("LSTM layer {i}: {e}"))?;
            let x = n.input.first().map_or("", |s| s.as_str());
            if !flows_from(g, x, prev) {
                return Err(format!("LSTM layer {i} does not read the previous layer"));
            }
            let arg = |j: usize| n.input.get(j).filter(|s| !s.is_empty());
            if arg(4).is_some() || arg(7).is_some() {
                return Err(format!("LSTM layer {i} has sequence lengths or peepholes"));
            }
            for (j, whole) in [(5, &io.h0), (6, &io.c0)] {
                let Some(s) = arg(j) else {
                    return Err(format!("LSTM layer {i} has no initial state"));
                };
                if !state_slice(g, s, whole, i, io.layers)? {
                    return Err(format!(
                        "LSTM layer {i} does not start from layer {i} of '{whole}'"
                    ));
                }
            }
            let mat = |j: usize, shape: &[usize]| -> Result<Vec<f32>, Unrecognized> {
                let name = arg(j).ok_or("LSTM without weights")?;
                match g.konst(name)? {
                    (s, Values::F32(v)) if s == shape => Ok(v),
                    (s, _) => Err(format!(
                        "LSTM layer {i}: '{name}' is {s:?}, not fp32 {shape:?}"
                    )),
                }
            };
            let w = mat(1, &[1, 4 * hidden, input])?;
            let r = mat(2, &[1, 4 * hidden, hidden])?;
            let b = match arg(3) {
                Some(_) => mat(3, &[1, 8 * hidden])?,
                None => vec![0.0; 8 * hidden],
            };
            // ONNX adds both biases; one sum, in gate order.
            let bias: Vec<f32> = (0..4 * hidden).map(|j| b[j] + b[4 * hidden + j]).collect();
            layers.push(if quantize_fp32 {
                Layer::I8(I8Layer {
                    w: Linear {
                        w: PackedI8::quantize(&w, 4 * hidden, input),
                        bias: Some(bias),
                        from_int8: false,
                    },
                    r: Linear {
                        w: PackedI8::quantize(&r, 4 * hidden, hidden),
                        bias: None,
                        from_int8: false,
                    },
                })
            } else {
                Layer::F32(F32Layer {
                    input: Input::Weights(Panels::pack(&w, hidden, input)),
                    r: Panels::pack(&r, hidden, hidden),
                    // The panels' order: a one-column matrix.
                    bias: Panels::pack(&bias, hidden, 1).data,
                })
            });
            for (j, whole) in [(1, &io.hn), (2, &io.cn)] {
                let out = n.output.get(j).map_or("", |s| s.as_str());
                if !final_state(g, out, whole, i, io.layers) {
                    return Err(format!(
                        "LSTM layer {i}'s final state is not layer {i} of '{whole}'"
                    ));
                }
            }
            prev = n.output.first().map_or("", |s| s.as_str());
            input = hidden;
        }
        let mut linears = g.linears(quantize_fp32)?;
        if linears.len() != 1 {
            return Err(format!(
                "expected one linear layer (the head), found {}",
                linears.len()
            ));
        }
        let head = linears.pop().expect("counted");
        if !flows_from(g, &head.input, prev) || head.output != io.logits {
            return Err("the head does not map the last layer's output to the logits".into());
        }
        let head = head.linear;
        let vocab = head.w.rows();
        if head.w.cols() != hidden || embed.rows() != vocab {
            return Err("the output projection is not hidden → vocabulary".into());
        }
        let embed_cols = embed.cols();
        let mut embed = Some(embed);
        if let (Some(Layer::F32(first)), Some(e)) = (layers.first_mut(), &embed) {
            if fold && vocab * 4 * hidden * 4 <= FOLD_MAX_BYTES {
                first.fold(ember_kernels::kernels(), e);
                embed = None;
            }
        }
        Ok(Lstm {
            hidden,
            vocab,
            embed,
            embed_cols,
            layers,
            head,
        })
    }

    /// Floats of one sequence's state: h and c for every layer.
    pub fn state_len(&self) -> usize {
        self.layers.len() * 2 * self.hidden
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self.layers.iter().map(Layer::bytes).sum();
        self.embed.as_ref().map_or(0, Embedding::bytes) + layers + self.head.bytes()
    }

    /// Weight bytes a decode step reads.
    pub fn streamed_bytes(&self) -> usize {
        let layers: usize = self.layers.iter().map(Layer::streamed).sum();
        layers + self.head.w.weight_bytes()
    }

    pub fn new_work(&self) -> LstmWork {
        let (h, groups) = (self.hidden, self.hidden / UNITS);
        let wide = self.embed_cols.max(h);
        LstmWork {
            x: vec![0.0; MAX_ROWS * wide],
            y: vec![0.0; MAX_ROWS * h],
            gates: vec![0.0; groups * MAX_ROWS * GATES],
            h: vec![0.0; MAX_ROWS * h],
            h_new: vec![0.0; groups * MAX_ROWS * UNITS],
            c: vec![0.0; groups * MAX_ROWS * UNITS],
            rec: vec![0.0; MAX_ROWS * 4 * h],
            logits: vec![0.0; MAX_ROWS * self.vocab],
            qr: QRows::new(wide),
        }
    }

    /// Run one chunk of rows (each sequence's rows consecutive and in order)
    /// through the network, advancing the sequences' states and writing the
    /// logits rows ask for into their jobs' outputs.
    pub fn chunk(
        &self,
        k: &Kernels,
        w: &mut LstmWork,
        rows: &[Row],
        jobs: &mut [RnnJob<'_>],
        par: &dyn Parallel,
    ) {
        let (hd, n) = (self.hidden, rows.len());
        let mut runs: heapless::Vec<Run, MAX_ROWS> = heapless::Vec::new();
        for (r, row) in rows.iter().enumerate() {
            match runs.last_mut() {
                Some(last) if last.job == row.job => last.len += 1,
                _ => {
                    let _ = runs.push(Run {
                        job: row.job,
                        first: r,
                        len: 1,
                    });
                }
            }
        }
        let steps = runs.iter().map(|s| s.len).max().unwrap_or(0);
        let ns = runs.len();
        let cols = self.embed_cols;
        // A folded first layer reads its input product by token instead.
        if let Some(e) = &self.embed {
            for (r, row) in rows.iter().enumerate() {
                e.read(
                    row.token as usize,
                    &mut w.x[r * cols..(r + 1) * cols],
                    false,
                );
            }
        }
        let mut input = cols;
        let steps = Steps {
            rows,
            runs: &runs,
            n,
            ns,
            steps,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let par: &dyn Parallel = if 4 * hd * input * n >= PAR_MIN_MACS {
                par
            } else {
                &Serial
            };
            match layer {
                Layer::F32(layer) => self.layer_f32(k, layer, l, input, &steps, w, jobs, par),
                Layer::I8(layer) => self.layer_i8(k, layer, l, input, &steps, w, jobs, par),
            }
            w.x[..n * hd].copy_from_slice(&w.y[..n * hd]);
            input = hd;
        }
        let y = &w.y[..n * hd];
        head_logits(k, &self.head, y, rows, jobs, &mut w.qr, &mut w.logits, par);
    }

    /// One int8 layer over the chunk: the input product of every row as one
    /// GEMM, then per step one GEMM of the recurrent weights over the
    /// chunk's sequences (each hidden state quantized on its own).
    #[allow(clippy::too_many_arguments)]
    fn layer_i8(
        &self,
        k: &Kernels,
        layer: &I8Layer,
        l: usize,
        input: usize,
        st: &Steps<'_>,
        w: &mut LstmWork,
        jobs: &mut [RnnJob<'_>],
        par: &dyn Parallel,
    ) {
        let hd = self.hidden;
        let Steps {
            rows,
            runs,
            n,
            steps,
            ..
        } = *st;
        let (h_at, c_at, g4) = (l * 2 * hd, l * 2 * hd + hd, 4 * hd);
        for (s, run) in runs.iter().enumerate() {
            let st = &jobs[run.job].state;
            w.h[s * hd..(s + 1) * hd].copy_from_slice(&st[h_at..h_at + hd]);
            w.c[s * hd..(s + 1) * hd].copy_from_slice(&st[c_at..c_at + hd]);
        }
        let gates = &mut w.gates[..n * g4];
        let x = &w.x[..n * input];
        run_linear(k, &layer.w, x, |r| rows[r].job, &mut w.qr, gates, par);
        for t in 0..steps {
            // The sequences still running at step t, side by side.
            let mut act: heapless::Vec<(usize, usize), MAX_ROWS> = heapless::Vec::new();
            for (s, run) in runs.iter().enumerate().filter(|(_, r)| r.len > t) {
                let _ = act.push((s, run.first + t));
            }
            let na = act.len();
            for (a, &(s, _)) in act.iter().enumerate() {
                w.h_new[a * hd..(a + 1) * hd].copy_from_slice(&w.h[s * hd..(s + 1) * hd]);
            }
            let rec = &mut w.rec[..na * g4];
            run_linear(k, &layer.r, &w.h_new[..na * hd], |a| a, &mut w.qr, rec, par);
            for (a, &(s, r)) in act.iter().enumerate() {
                let g = &mut gates[r * g4..(r + 1) * g4];
                add(g, &rec[a * g4..(a + 1) * g4]);
                let hs = &mut w.h[s * hd..(s + 1) * hd];
                (k.lstm_cell_f32)(g, &mut w.c[s * hd..(s + 1) * hd], hs);
                w.y[r * hd..(r + 1) * hd].copy_from_slice(hs);
            }
        }
        for (s, run) in runs.iter().enumerate() {
            let st = &mut jobs[run.job].state;
            st[h_at..h_at + hd].copy_from_slice(&w.h[s * hd..(s + 1) * hd]);
            st[c_at..c_at + hd].copy_from_slice(&w.c[s * hd..(s + 1) * hd]);
        }
    }

    /// One fp32 layer over the chunk: input products of every row, then the
    /// recurrence step by step, split over threads by unit group.
    #[allow(clippy::too_many_arguments)]
    fn layer_f32(
        &self,
        k: &Kernels,
        layer: &F32Layer,
        l: usize,
        input: usize,
        st: &Steps<'_>,
        w: &mut LstmWork,
        jobs: &mut [RnnJob<'_>],
        par: &dyn Parallel,
    ) {
        let (hd, groups) = (self.hidden, self.hidden / UNITS);
        let Steps {
            runs, n, ns, steps, ..
        } = *st;
        let parts = par.threads().clamp(1, groups.min(MAX_PARTS));
        let per = groups.div_ceil(parts);
        let parts = groups.div_ceil(per);
        // This layer's state of each sequence in the chunk.
        let (h_at, c_at) = (l * 2 * hd, l * 2 * hd + hd);
        for (s, run) in runs.iter().enumerate() {
            let st = &jobs[run.job].state;
            w.h[s * hd..(s + 1) * hd].copy_from_slice(&st[h_at..h_at + hd]);
            for q in 0..groups {
                let at = (q * ns + s) * UNITS;
                w.c[at..at + UNITS].copy_from_slice(&st[c_at + q * UNITS..c_at + (q + 1) * UNITS]);
            }
        }
        // Input products of every row: gates = bias + W·x, read by token
        // from the folded table when there is one.
        match &layer.input {
            Input::ByToken(table) => {
                let g4 = 4 * hd;
                for (r, row) in st.rows.iter().enumerate() {
                    let by_q = table[row.token as usize * g4..][..g4].chunks(GATES);
                    for (q, from) in by_q.enumerate() {
                        w.gates[(q * n + r) * GATES..][..GATES].copy_from_slice(from);
                    }
                }
            }
            Input::Weights(wi) => {
                let x = &w.x[..n * input];
                let gates = split_parts(&mut w.gates[..groups * n * GATES], per * n * GATES);
                par.run(parts, &|p| {
                    let mut g = gates[p].lock().unwrap_or_else(|e| e.into_inner());
                    for (gq, q) in g.chunks_mut(n * GATES).zip(p * per..) {
                        let bias = &layer.bias[q * GATES..(q + 1) * GATES];
                        for (r0, out) in (0..n).step_by(4).zip(gq.chunks_mut(4 * GATES)) {
                            let b = out.len() / GATES;
                            let xs: [&[f32]; 4] = std::array::from_fn(|i| {
                                let r = r0 + i.min(b - 1);
                                &x[r * input..(r + 1) * input]
                            });
                            for o in out.chunks_mut(GATES) {
                                o.copy_from_slice(bias);
                            }
                            wi.add_product(k, q, &xs[..b], out);
                        }
                    }
                });
            }
        }
        // The recurrence, one step of every sequence at a time.
        for t in 0..steps {
            {
                let h = &w.h[..ns * hd];
                let gates = split_parts(&mut w.gates[..groups * n * GATES], per * n * GATES);
                let cs = split_parts(&mut w.c[..groups * ns * UNITS], per * ns * UNITS);
                let hs = split_parts(&mut w.h_new[..groups * ns * UNITS], per * ns * UNITS);
                let runs = &runs;
                par.run(parts, &|p| {
                    let mut g = gates[p].lock().unwrap_or_else(|e| e.into_inner());
                    let mut c = cs[p].lock().unwrap_or_else(|e| e.into_inner());
                    let mut hn = hs[p].lock().unwrap_or_else(|e| e.into_inner());
                    let per_q = g.chunks_mut(n * GATES);
                    let per_q = per_q.zip(c.chunks_mut(ns * UNITS));
                    for (((gq, cq), hq), q) in per_q.zip(hn.chunks_mut(ns * UNITS)).zip(p * per..) {
                        let mut active = runs.iter().enumerate().filter(|(_, r)| r.len > t);
                        loop {
                            // Up to 4 sequences through the panel at once.
                            let mut four: heapless::Vec<usize, 4> = heapless::Vec::new();
                            let mut buf = [0f32; 4 * GATES];
                            for (s, run) in active.by_ref() {
                                let (r, i) = (run.first + t, four.len());
                                buf[i * GATES..(i + 1) * GATES]
                                    .copy_from_slice(&gq[r * GATES..(r + 1) * GATES]);
                                let _ = four.push(s);
                                if four.is_full() {
                                    break;
                                }
                            }
                            if four.is_empty() {
                                break;
                            }
                            let b = four.len();
                            let xs: [&[f32]; 4] = std::array::from_fn(|i| {
                                let s = four[i.min(b - 1)];
                                &h[s * hd..(s + 1) * hd]
                            });
                            let buf = &mut buf[..b * GATES];
                            layer.r.add_product(k, q, &xs[..b], buf);
                            for (&s, g) in four.iter().zip(buf.chunks(GATES)) {
                                let u = s * UNITS..(s + 1) * UNITS;
                                (k.lstm_cell_f32)(g, &mut cq[u.clone()], &mut hq[u]);
                            }
                        }
                    }
                });
            }
            for (s, run) in runs.iter().enumerate().filter(|(_, r)| r.len > t) {
                let r = run.first + t;
                for q in 0..groups {
                    let from = &w.h_new[(q * ns + s) * UNITS..(q * ns + s + 1) * UNITS];
                    w.h[s * hd + q * UNITS..s * hd + (q + 1) * UNITS].copy_from_slice(from);
                    w.y[r * hd + q * UNITS..r * hd + (q + 1) * UNITS].copy_from_slice(from);
                }
            }
        }
        for (s, run) in runs.iter().enumerate() {
            let st = &mut jobs[run.job].state;
            st[h_at..h_at + hd].copy_from_slice(&w.h[s * hd..(s + 1) * hd]);
            for q in 0..groups {
                let at = (q * ns + s) * UNITS;
                st[c_at + q * UNITS..c_at + (q + 1) * UNITS].copy_from_slice(&w.c[at..at + UNITS]);
            }
        }
    }
}

/// The attributes this engine computes: forward, sigmoid/tanh/tanh, no clip,
/// no coupled input-forget gate, sequence-first layout.
fn check_attrs(n: &pb::NodeProto, hidden: usize) -> Result<(), Unrecognized> {
    if attr::<String>(n, "direction").is_some_and(|d| d != "forward") {
        return Err("not a forward LSTM".into());
    }
    if attr::<i64>(n, "hidden_size").is_some_and(|h| h as usize != hidden) {
        return Err(format!("hidden_size differs from the state's {hidden}"));
    }
    if attr::<i64>(n, "input_forget").unwrap_or(0) != 0
        || attr::<i64>(n, "layout").unwrap_or(0) != 0
    {
        return Err("coupled input-forget gate or batch-first layout".into());
    }
    if n.attribute.iter().any(|a| a.name == "clip") {
        return Err("cell clipping".into());
    }
    if let Some(a) = n.attribute.iter().find(|a| a.name == "activations") {
        let names: Vec<&[u8]> = a.strings.iter().map(|s| s.as_slice()).collect();
        if names != [&b"Sigmoid"[..], b"Tanh", b"Tanh"] {
            return Err("activations other than sigmoid and tanh".into());
        }
    }
    Ok(())
}

/// Whether `to` is `from` through layout-only operators (the Transposes,
/// Squeezes and dequantization between an LSTM's output and its reader).
fn flows_from(g: &Graph, to: &str, from: &str) -> bool {
    let mut cur = to;
    for _ in 0..8 {
        if cur == from {
            return true;
        }
        match g.producer(cur) {
            Some(n)
                if matches!(
                    n.op_type.as_str(),
                    "Transpose"
                        | "Squeeze"
                        | "Unsqueeze"
                        | "Reshape"
                        | "Identity"
                        | "DequantizeLinear"
                ) =>
            {
                cur = &n.input[0]
            }
            _ => return false,
        }
    }
    false
}

/// Whether `name`, an LSTM's initial state, is layer `i` of the graph input
/// `whole` (`[layers, batch, hidden]`): a `Slice` of `i..i + 1` on axis 0, or
/// `whole` itself for one layer.
fn state_slice(
    g: &Graph,
    name: &str,
    whole: &str,
    i: usize,
    layers: usize,
) -> Result<bool, Unrecognized> {
    if name == whole {
        return Ok(layers == 1);
    }
    let Some(n) = g.producer_op(name, "Slice") else {
        return Ok(false);
    };
    if n.input[0] != whole {
        return Ok(false);
    }
    let arg = |j: usize| {
        n.input
            .get(j)
            .filter(|s| !s.is_empty())
            .and_then(|s| g.ints(s))
    };
    let (starts, ends) = (arg(1), arg(2));
    let axes = match n.input.get(3).filter(|s| !s.is_empty()) {
        Some(_) => arg(3),
        None => Some(vec![0]),
    };
    let steps_ok = match n.input.get(4).filter(|s| !s.is_empty()) {
        Some(_) => arg(4) == Some(vec![1]),
        None => true,
    };
    let ends_ok = |e: &[i64]| e == [i as i64 + 1] || (i + 1 == layers && e[0] >= layers as i64);
    Ok(steps_ok
        && starts == Some(vec![i as i64])
        && ends.as_deref().is_some_and(ends_ok)
        && (axes == Some(vec![0]) || axes == Some(vec![-3])))
}

/// Whether the LSTM output `out` (`Y_h` or `Y_c`) lands as layer `i` of the
/// graph output `whole`: input `i` of the `Concat` writing it, or `whole`
/// itself for one layer.
fn final_state(g: &Graph, out: &str, whole: &str, i: usize, layers: usize) -> bool {
    if out == whole {
        return layers == 1;
    }
    g.producer_op(whole, "Concat").is_some_and(|c| {
        c.input.len() == layers
            && c.input.get(i).is_some_and(|x| x == out)
            && attr::<i64>(c, "axis").unwrap_or(-1) == 0
    })
}

/// The native backend of an LSTM model.
#[derive(Debug)]
pub struct LstmBackend {
    family: Family,
    net: Lstm,
    work: Mutex<LstmWork>,
    threads: Option<SpinPool>,
    kernels: &'static Kernels,
}

impl LstmBackend {
    pub fn new(family: Family, net: Lstm, threads: Option<SpinPool>) -> LstmBackend {
        LstmBackend {
            family,
            work: Mutex::new(net.new_work()),
            net,
            threads,
            kernels: ember_kernels::kernels(),
        }
    }

    pub fn weight_bytes(&self) -> usize {
        self.net.weight_bytes()
    }

    fn par(&self) -> &dyn Parallel {
        super::pool::or_serial(&self.threads)
    }

    fn run(&self, jobs: &mut [RnnJob<'_>]) {
        let mut work = self.work.lock().unwrap_or_else(|e| e.into_inner());
        run_chunks(jobs, self.net.vocab, |rows, jobs| {
            self.net
                .chunk(self.kernels, &mut work, rows, jobs, self.par())
        });
    }
}

fn rnn(state: &mut SeqState) -> Result<&mut RnnState, EngineError> {
    match &mut state.inner {
        Inner::Rnn(s) => Ok(s),
        _ => Err(EngineError::Run("sequence state of another backend".into())),
    }
}

impl Backend for LstmBackend {
    fn name(&self) -> &'static str {
        "native"
    }

    fn family(&self) -> &Family {
        &self.family
    }

    fn vocab_size(&self) -> usize {
        self.net.vocab
    }

    fn footprint(&self) -> Option<Footprint> {
        Some(Footprint {
            weight_bytes: self.net.weight_bytes(),
            bytes_per_token: self.net.streamed_bytes(),
            kv_bytes: 0,
        })
    }

    fn new_state(&self) -> Result<SeqState, EngineError> {
        Ok(SeqState {
            len: 0,
            inner: Inner::Rnn(RnnState {
                hc: vec![0.0; self.net.state_len()],
            }),
        })
    }

    fn forward(
        &self,
        state: &mut SeqState,
        tokens: &[u32],
        which: Logits,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        check_tokens(tokens, self.net.vocab)?;
        let st = rnn(state)?;
        self.run(&mut [RnnJob {
            state: &mut st.hc,
            tokens,
            all: which == Logits::All,
            out,
        }]);
        state.len += tokens.len();
        Ok(())
    }

    /// The whole batch goes through each layer together: the weights are
    /// read once per step for all sequences.
    fn forward_batch(&self, items: &mut [BatchItem<'_>]) {
        let vocab = self.net.vocab;
        let mut jobs: heapless::Vec<RnnJob<'_>, 256> = heapless::Vec::new();
        let mut rest = vec![];
        for it in items.iter_mut() {
            it.result = check_tokens(it.tokens, vocab).and_then(|_| rnn(it.state).map(|_| ()));
            if it.result.is_ok() {
                it.state.len += it.tokens.len();
                let st = rnn(it.state).expect("checked");
                let job = RnnJob {
                    state: &mut st.hc,
                    tokens: it.tokens,
                    all: false,
                    out: &mut *it.logits,
                };
                if let Err(job) = jobs.push(job) {
                    rest.push(job);
                }
            }
        }
        self.run(&mut jobs);
        self.run(&mut rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::attribute_proto::AttributeType;

    fn lstm(attrs: Vec<pb::AttributeProto>) -> pb::NodeProto {
        pb::NodeProto {
            op_type: "LSTM".into(),
            attribute: attrs,
            ..Default::default()
        }
    }

    fn string(name: &str, v: &str) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: AttributeType::String as i32,
            s: v.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    fn int(name: &str, v: i64) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: AttributeType::Int as i32,
            i: v,
            ..Default::default()
        }
    }

    /// The folded first layer gives the unfolded one's logits bit for bit,
    /// over a prefill (rows in fours and a remainder) and decode steps.
    #[test]
    fn folding_the_first_layer_changes_no_bit() {
        use crate::model::{self, ModelDir};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/kjv-lstm");
        let dir = ModelDir::open(&root).unwrap();
        let proto = model::read_proto(&dir).unwrap();
        let family = model::detect_family(&dir, &proto).unwrap();
        let Family::Lstm(io) = &family else {
            panic!("kjv-lstm is an LSTM")
        };
        let g = Graph::new(&proto, &dir.root);
        let folded = Lstm::recognize(&g, io, false).unwrap();
        let plain = Lstm::recognize_folding(&g, io, false, false).unwrap();
        let Some(Layer::F32(first)) = folded.layers.first() else {
            panic!("an fp32 first layer")
        };
        assert!(
            matches!(first.input, Input::ByToken(_)),
            "kjv-lstm's first layer is folded"
        );
        assert!(folded.embed.is_none(), "and its embedding dropped");
        assert!(folded.streamed_bytes() < plain.streamed_bytes());
        let logits = |net: Lstm| {
            let b = LstmBackend::new(family.clone(), net, None);
            let mut st = b.new_state().unwrap();
            let mut all = vec![];
            for part in [&[3u32, 1, 4, 1, 5, 9, 2][..], &[6], &[4095]] {
                let mut out = vec![];
                b.forward(&mut st, part, Logits::All, &mut out).unwrap();
                all.extend(out);
            }
            all
        };
        let (a, b) = (logits(folded), logits(plain));
        assert!(a == b, "folded logits differ");
    }

    /// What the cell computes is what the attributes say, or the layer is refused.
    #[test]
    fn only_plain_forward_lstms_are_taken() {
        assert!(check_attrs(&lstm(vec![]), 16).is_ok());
        let plain = vec![string("direction", "forward"), int("hidden_size", 16)];
        assert!(check_attrs(&lstm(plain), 16).is_ok());
        for (attrs, why) in [
            (vec![string("direction", "bidirectional")], "forward"),
            (vec![string("direction", "reverse")], "forward"),
            (vec![int("hidden_size", 32)], "hidden_size"),
            (vec![int("input_forget", 1)], "input-forget"),
            (vec![int("layout", 1)], "layout"),
            (
                vec![pb::AttributeProto {
                    name: "clip".into(),
                    r#type: AttributeType::Float as i32,
                    f: 3.0,
                    ..Default::default()
                }],
                "clipping",
            ),
            (
                vec![pb::AttributeProto {
                    name: "activations".into(),
                    r#type: AttributeType::Strings as i32,
                    strings: vec![b"Relu".to_vec(), b"Tanh".to_vec(), b"Tanh".to_vec()],
                    ..Default::default()
                }],
                "activations",
            ),
        ] {
            let e = check_attrs(&lstm(attrs), 16).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
