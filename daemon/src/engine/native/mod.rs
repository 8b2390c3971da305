//! The native engine: the model's weights read out of the same ONNX file,
//! packed once for `ember-kernels`, and a hand-written forward pass per
//! family over a paged KV cache.
//!
//! Why not tract: tract runs any graph but decodes int8 models slower than
//! onnxruntime (it re-derives quantization parameters per call and threads
//! poorly at batch 1). Here a decode step is a handful of int8 GEMVs (one
//! small GEMM for the whole batch, so weights are read once per step), with
//! no allocation per token.
//!
//! Safety net: a graph is only run natively when it is recognised
//! structurally *and* its logits agree with tract's on a probe sequence at
//! load (one 13-token prefill); otherwise the model stays on tract, which
//! remains the reference.

mod gpt2;
mod graph;
mod kv;
mod llama;
mod lstm;
mod ops;
mod pool;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ember_kernels::gemv::Parallel;
use ember_kernels::{mem, Kernels};
use tract_onnx::pb;

use super::{Backend, BatchItem, EngineError, LoadOptions, Logits, SeqState};
use crate::model::{Family, ModelDir};
use kv::{BlockPool, KvArena, SeqBlocks};
use ops::MAX_ROWS;

pub use graph::Unrecognized;

/// One sequence's part of a step, validated and with its KV blocks reserved.
pub(crate) struct Job<'a> {
    blocks: &'a SeqBlocks,
    /// Positions already in the cache.
    past: usize,
    tokens: &'a [u32],
    /// Logits for every position (else the last only).
    all: bool,
    out: &'a mut Vec<f32>,
}

/// One token row of a chunk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    job: usize,
    pos: usize,
    token: u32,
    /// Index in its job's tokens.
    t: usize,
    /// Its logits are wanted.
    want: bool,
}

impl Sequence for Job<'_> {
    fn past(&self) -> usize {
        self.past
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

/// What the chunking loop needs of one sequence's part of a step.
pub(crate) trait Sequence {
    /// Positions already computed.
    fn past(&self) -> usize;
    fn tokens(&self) -> &[u32];
    /// Logits for every position (else the last only).
    fn all(&self) -> bool;
    fn out(&mut self) -> &mut Vec<f32>;
}

/// Size each job's output, then cut the jobs' tokens into chunks of at most
/// [`MAX_ROWS`] rows, in order (a sequence's rows stay consecutive), and
/// run `chunk` on each.
fn run_chunks<J: Sequence>(jobs: &mut [J], vocab: usize, mut chunk: impl FnMut(&[Row], &mut [J])) {
    for j in jobs.iter_mut() {
        let n = if j.all() { j.tokens().len() } else { 1 };
        let out = j.out();
        out.clear();
        out.resize(n * vocab, 0.0);
    }
    let mut rows: heapless::Vec<Row, MAX_ROWS> = heapless::Vec::new();
    let (mut j, mut t) = (0, 0);
    while j < jobs.len() {
        rows.clear();
        while !rows.is_full() && j < jobs.len() {
            let job = &jobs[j];
            let _ = rows.push(Row {
                job: j,
                pos: job.past() + t,
                token: job.tokens()[t],
                t,
                want: job.all() || t + 1 == job.tokens().len(),
            });
            t += 1;
            if t == job.tokens().len() {
                (j, t) = (j + 1, 0);
            }
        }
        chunk(&rows, jobs);
    }
}

/// Refuse an empty feed or a token outside the vocabulary.
fn check_tokens(tokens: &[u32], vocab: usize) -> Result<(), EngineError> {
    if tokens.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(&bad) => Err(EngineError::BadToken(bad, vocab)),
        None => Ok(()),
    }
}

/// The native sequence state: its KV blocks (returned to the arena on drop).
#[derive(Debug)]
pub struct NativeState {
    blocks: SeqBlocks,
}

/// A recurrent sequence's state on the native engine: each layer's hidden
/// and cell vectors.
#[derive(Debug)]
pub struct RnnState {
    hc: Vec<f32>,
}

/// A native backend of either kind, with what the load log reports.
#[derive(Debug)]
pub struct Loaded {
    pub backend: Box<dyn Backend>,
    /// Bytes of packed weights.
    pub weight_bytes: usize,
    /// Bytes of the KV arena (0 for recurrent models).
    pub kv_bytes: usize,
    /// Whether the file's projections were int8 (false: some quantized at
    /// load, or run in float).
    pub from_int8: bool,
}

/// Read a recognised graph's weights for the native engine; `Err` says why
/// it is not one.
pub fn load(
    dir: &ModelDir,
    proto: &pb::ModelProto,
    family: &Family,
    opts: &LoadOptions,
) -> Result<Loaded, Unrecognized> {
    match family {
        Family::Decoder(io) => {
            let n = NativeBackend::load(dir, proto, io, opts)?;
            Ok(Loaded {
                weight_bytes: n.weight_bytes,
                kv_bytes: n.kv_bytes,
                from_int8: n.net.all_int8(),
                backend: Box::new(n),
            })
        }
        Family::Lstm(io) => {
            let g = graph::Graph::new(proto, &dir.root);
            let net = lstm::Lstm::recognize(&g, io, opts.quantize_fp32)?;
            let n = lstm::LstmBackend::new(family.clone(), net, spin_pool(opts)?);
            Ok(Loaded {
                weight_bytes: n.weight_bytes(),
                kv_bytes: 0,
                from_int8: false,
                backend: Box::new(n),
            })
        }
    }
}

/// The tensor the output head reads (the last linear layer's input), found
/// without reading weights: where the load-time probe cuts tract's graph.
pub fn head_input(dir: &ModelDir, proto: &pb::ModelProto) -> Option<String> {
    graph::Graph::new(proto, &dir.root).last_linear_input()
}

/// The worker pool for `--threads` above 1.
fn spin_pool(opts: &LoadOptions) -> Result<Option<pool::SpinPool>, Unrecognized> {
    let threads = opts.threads.max(opts.batch_threads);
    if threads <= 1 {
        return Ok(None);
    }
    pool::SpinPool::new(threads, "ember-native")
        .map(Some)
        .map_err(|e| format!("cannot start threads: {e}"))
}

#[derive(Debug)]
enum Net {
    Gpt2(gpt2::Gpt2),
    Llama(llama::Llama),
}

/// Call the same method on whichever family the net is.
macro_rules! each_net {
    ($net:expr, $m:ident => $e:expr) => {
        match $net {
            Net::Gpt2($m) => $e,
            Net::Llama($m) => $e,
        }
    };
}

impl Net {
    /// The decoder families in turn; the reasons of all when none fits.
    fn recognize(
        g: &graph::Graph,
        io: &crate::model::DecoderIo,
        context: Option<usize>,
        quantize_fp32: bool,
    ) -> Result<Net, Unrecognized> {
        let not_gpt2 = match gpt2::Gpt2::recognize(g, io, quantize_fp32) {
            Ok(m) => return Ok(Net::Gpt2(m)),
            Err(e) => e,
        };
        match llama::Llama::recognize(g, io, context, quantize_fp32) {
            Ok(m) => Ok(Net::Llama(m)),
            Err(not_llama) => Err(format!("not GPT-2: {not_gpt2}; not Llama: {not_llama}")),
        }
    }

    fn vocab(&self) -> usize {
        each_net!(self, m => m.vocab())
    }

    fn kv_shape(&self) -> kv::KvShape {
        each_net!(self, m => m.kv_shape())
    }

    fn max_positions(&self) -> usize {
        each_net!(self, m => m.max_positions())
    }

    fn weight_bytes(&self) -> usize {
        each_net!(self, m => m.weight_bytes())
    }

    fn all_int8(&self) -> bool {
        each_net!(self, m => m.all_int8())
    }

    fn streamed_bytes(&self) -> usize {
        each_net!(self, m => m.streamed_bytes())
    }

    fn packed(&self) -> Vec<&[i8]> {
        each_net!(self, m => m.packed())
    }

    fn new_work(&self, arena: KvArena, context: usize) -> ops::Work {
        each_net!(self, m => m.new_work(arena, context))
    }

    fn chunk(
        &self,
        k: &Kernels,
        w: &mut ops::Work,
        rows: &[Row],
        jobs: &mut [Job<'_>],
        par: &dyn Parallel,
    ) {
        each_net!(self, m => m.chunk(k, w, rows, jobs, par))
    }
}

/// The native backend of one model.
#[derive(Debug)]
pub struct NativeBackend {
    family: Family,
    net: Net,
    work: Mutex<ops::Work>,
    pool: Arc<BlockPool>,
    context: usize,
    threads: Option<pool::SpinPool>,
    kernels: &'static Kernels,
    weight_bytes: usize,
    kv_bytes: usize,
}

impl NativeBackend {
    /// Read the weights of a recognised graph; `Err` says why it is not one.
    pub fn load(
        dir: &ModelDir,
        proto: &pb::ModelProto,
        io: &crate::model::DecoderIo,
        opts: &LoadOptions,
    ) -> Result<NativeBackend, Unrecognized> {
        let g = graph::Graph::new(proto, &dir.root);
        let net = Net::recognize(&g, io, dir.context_length(), opts.quantize_fp32)?;
        let (shape, max_pos) = (net.kv_shape(), net.max_positions());
        let context = dir.context_length().unwrap_or(max_pos).min(max_pos);
        let seqs = opts.max_seqs.max(1);
        let blocks = seqs * context.div_ceil(kv::BLOCK);
        if opts.kv_cache == crate::engine::KvType::I8 && !ops::int8_attention_fits(shape.head_dim) {
            return Err(format!(
                "an int8 KV cache needs a head size of at most {} in whole groups of {}; this model's is {}",
                ops::Q8_MAX / ops::GROUP_MAX,
                ember_kernels::generic::KEY_GROUP,
                shape.head_dim
            ));
        }
        let (arena, pool) = KvArena::new(shape, blocks, opts.kv_cache);
        let kv_bytes = arena.bytes();
        let weight_bytes = net.weight_bytes();
        let work = net.new_work(arena, context);
        let threads = spin_pool(opts)?;
        Ok(NativeBackend {
            family: Family::Decoder(io.clone()),
            net,
            work: Mutex::new(work),
            pool,
            context,
            threads,
            kernels: ember_kernels::kernels(),
            weight_bytes,
            kv_bytes,
        })
    }

    fn par(&self) -> &dyn Parallel {
        pool::or_serial(&self.threads)
    }

    /// Check an item and reserve its blocks.
    fn prepare(&self, state: &mut SeqState, tokens: &[u32]) -> Result<(), EngineError> {
        check_tokens(tokens, self.vocab_size())?;
        let end = state.len + tokens.len();
        if end > self.context {
            return Err(EngineError::Run(format!(
                "sequence of {end} tokens exceeds the context of {}",
                self.context
            )));
        }
        let st = native(state)?;
        st.blocks
            .reserve(end)
            .map_err(|e| EngineError::Run(e.to_string()))
    }

    /// Run validated jobs: rows in chunks of at most [`MAX_ROWS`].
    fn run(&self, jobs: &mut [Job<'_>]) {
        let mut work = self.work.lock().unwrap_or_else(|e| e.into_inner());
        run_chunks(jobs, self.vocab_size(), |rows, jobs| {
            self.net
                .chunk(self.kernels, &mut work, rows, jobs, self.par())
        });
    }
}

/// The reference's logits on a probe sequence (13 tokens, one prefill),
/// recorded so the reference can be dropped before the native engine packs
/// its weights: the two never hold the weights at once. The reference may
/// stop short of the logits ([`tract::Build::ReferenceUntil`](super::tract::Build));
/// [`Probe::map`] then takes what it recorded the rest of the way.
///
/// One call, not a prefill and then a decode step: each call of tract's
/// reference implementation converts every quantized weight to float, which
/// is most of the probe's time and of a big model's load (the 135M bench
/// model: 1.2 s of 2.7 s on a Zen 4 core, twice that before). The native
/// engine runs the same single prefill, so both quantize the same rows
/// together (a file's `DynamicQuantizeLinear` takes one scale per call);
/// its cache and decode path, the same code for every model of a family,
/// are checked against onnxruntime's goldens by the tests instead.
#[derive(Debug)]
pub struct Probe {
    vocab: usize,
    tokens: Vec<u32>,
    /// Logits of every position.
    logits: Vec<f32>,
}

/// Tokens in the probe.
const PROBE_TOKENS: usize = 13;

impl Probe {
    /// Run the probe on `reference`.
    pub fn record(reference: &dyn Backend) -> Result<Probe, String> {
        let vocab = reference.vocab_size();
        let tokens: Vec<u32> = (0..PROBE_TOKENS as u32)
            .map(|i| (i * 7919 + 13) % vocab as u32)
            .collect();
        let mut state = reference.new_state().map_err(|e| e.to_string())?;
        let mut logits = vec![];
        reference
            .forward(&mut state, &tokens, Logits::All, &mut logits)
            .map_err(|e| format!("tract cannot run the probe: {e}"))?;
        Ok(Probe {
            vocab,
            tokens,
            logits,
        })
    }

    /// Replace the recorded values (one row per token) by `f(values, rows)`.
    pub fn map(
        mut self,
        f: impl FnOnce(&[f32], usize) -> Result<Vec<f32>, String>,
    ) -> Result<Probe, String> {
        self.logits = f(&self.logits, self.tokens.len())?;
        Ok(self)
    }

    /// Compare `native` with the recorded logits. Returns the largest logit
    /// difference relative to the largest logit magnitude, or why they
    /// disagree.
    pub fn check(&self, native: &dyn Backend) -> Result<f32, String> {
        let vocab = self.vocab;
        if native.vocab_size() != vocab {
            return Err(format!(
                "vocabulary {} vs tract's {vocab}",
                native.vocab_size()
            ));
        }
        let mut state = native.new_state().map_err(|e| e.to_string())?;
        let (mut la, lb) = (vec![], &self.logits);
        native
            .forward(&mut state, &self.tokens, Logits::All, &mut la)
            .map_err(|e| e.to_string())?;
        if la.len() != lb.len() || la.len() != vocab * self.tokens.len() {
            return Err(format!(
                "{} logits for {} positions, tract's {}",
                la.len(),
                self.tokens.len(),
                lb.len()
            ));
        }
        let scale = lb.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let diff = la
            .iter()
            .zip(lb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let worst = diff / scale;
        let argmax = crate::sample::argmax;
        if argmax(&la[la.len() - vocab..]) != argmax(&lb[lb.len() - vocab..]) {
            return Err("the most likely next token differs from tract's".into());
        }
        if worst > PROBE_TOLERANCE {
            return Err(format!(
                "logits differ from tract's by {:.1}% of their range (tolerance {:.0}%)",
                worst * 100.0,
                PROBE_TOLERANCE * 100.0
            ));
        }
        Ok(worst)
    }
}

/// Largest logit difference from tract accepted at load, relative to the
/// largest logit magnitude. Float rounding in another order can flip an
/// activation's u8 code by one, which moves logits by a fraction of a
/// quantum, and more so through many layers. Measured against tract's
/// reference implementation (the one-prefill probe, 2026-12-05): 0 on
/// kjv-gpt2, 2e-7 on the tiny Llama fixture, 0.3 % on kjv-lstm (fp32 or
/// quantized at load), 1.5 % on the fp32 GPT-2 fixture quantized at load,
/// 2.1 % on the 30-layer SmolLM-shaped Llama; a wrong reading of the graph
/// moves them by tens of percent.
pub const PROBE_TOLERANCE: f32 = 0.05;

fn native(state: &mut SeqState) -> Result<&mut NativeState, EngineError> {
    match &mut state.inner {
        super::Inner::Native(s) => Ok(s),
        _ => Err(EngineError::Run("sequence state of another backend".into())),
    }
}

impl Backend for NativeBackend {
    fn name(&self) -> &'static str {
        "native"
    }

    fn family(&self) -> &Family {
        &self.family
    }

    fn vocab_size(&self) -> usize {
        self.net.vocab()
    }

    fn footprint(&self) -> Option<super::Footprint> {
        Some(super::Footprint {
            weight_bytes: self.weight_bytes,
            bytes_per_token: self.net.streamed_bytes(),
            kv_bytes: self.kv_bytes,
        })
    }

    fn weight_read_rate(&self) -> Option<f64> {
        let parts = self.net.packed();
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let par = self.par();
        let threads = par.threads().max(1);
        // Each thread reads a contiguous share of about total / threads
        // bytes, in the order a step streams them.
        let mut at = 0;
        let owner: Vec<usize> = parts
            .iter()
            .map(|p| {
                let t = at * threads / total.max(1);
                at += p.len();
                t
            })
            .collect();
        let sink = AtomicU64::new(0);
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t0 = Instant::now();
            par.run(threads, &|t| {
                let sum = parts
                    .iter()
                    .zip(&owner)
                    .filter(|(_, &o)| o == t)
                    .fold(0u64, |s, (p, _)| s.wrapping_add(mem::read_sum(p)));
                sink.fetch_add(sum, Ordering::Relaxed);
            });
            best = best.min(t0.elapsed().as_secs_f64());
        }
        std::hint::black_box(sink.load(Ordering::Relaxed));
        Some(total as f64 / best)
    }

    fn new_state(&self) -> Result<SeqState, EngineError> {
        Ok(SeqState {
            len: 0,
            inner: super::Inner::Native(NativeState {
                blocks: SeqBlocks::new(&self.pool, self.context),
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
        self.prepare(state, tokens)?;
        let past = state.len;
        let st = native(state)?;
        let mut jobs = [Job {
            blocks: &st.blocks,
            past,
            tokens,
            all: which == Logits::All,
            out,
        }];
        self.run(&mut jobs);
        native(state)?.blocks.written(tokens);
        state.len += tokens.len();
        Ok(())
    }

    /// Full KV blocks are shared between sequences with the same prefix.
    fn reuse_prefix(&self, state: &mut SeqState, prompt: &[u32]) -> usize {
        if state.len != 0 {
            return 0;
        }
        let Ok(st) = native(state) else { return 0 };
        let n = st.blocks.reuse_prefix(prompt);
        state.len = n;
        n
    }

    /// The whole batch goes through each layer together: one GEMM per
    /// projection, so each weight is read once per step.
    fn forward_batch(&self, items: &mut [BatchItem<'_>]) {
        for it in items.iter_mut() {
            it.result = self.prepare(it.state, it.tokens);
        }
        let mut jobs: heapless::Vec<Job<'_>, 256> = heapless::Vec::new();
        let mut rest = vec![];
        for it in items.iter_mut() {
            if it.result.is_err() {
                continue;
            }
            let past = it.state.len;
            let Ok(st) = native(it.state) else { continue };
            let job = Job {
                blocks: &st.blocks,
                past,
                tokens: it.tokens,
                all: false,
                out: &mut *it.logits,
            };
            if let Err(job) = jobs.push(job) {
                rest.push(job);
            }
        }
        self.run(&mut jobs);
        self.run(&mut rest);
        drop(jobs);
        drop(rest);
        for it in items.iter_mut() {
            if it.result.is_ok() {
                if let Ok(st) = native(it.state) {
                    st.blocks.written(it.tokens);
                }
                it.state.len += it.tokens.len();
            }
        }
    }
}
