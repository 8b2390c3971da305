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
//! load (prefill and decode); otherwise the model stays on tract, which
//! remains the reference.

mod gpt2;
mod graph;
mod kv;
mod llama;
mod ops;
mod pool;

use std::sync::{Arc, Mutex};

use ember_kernels::gemv::{Parallel, Serial};
use ember_kernels::Kernels;
use tract_onnx::pb;

use super::{Backend, BatchItem, EngineError, LoadOptions, Logits, Profile, SeqState};
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

/// The native sequence state: its KV blocks (returned to the arena on drop).
#[derive(Debug)]
pub struct NativeState {
    blocks: SeqBlocks,
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
        family: &Family,
        opts: &LoadOptions,
    ) -> Result<NativeBackend, Unrecognized> {
        let g = graph::Graph::new(proto, &dir.root);
        let net = match family {
            Family::Decoder(io) => {
                Net::recognize(&g, io, dir.context_length(), opts.quantize_fp32)?
            }
            Family::Lstm(_) => return Err("LSTM models are not native yet".into()),
        };
        let (shape, max_pos) = (net.kv_shape(), net.max_positions());
        let context = dir.context_length().unwrap_or(max_pos).min(max_pos);
        let seqs = opts.max_seqs.max(1);
        let blocks = seqs * context.div_ceil(kv::BLOCK);
        let (arena, pool) = KvArena::new(shape, blocks);
        let kv_bytes = arena.bytes();
        let weight_bytes = net.weight_bytes();
        let work = net.new_work(arena, context);
        let threads = opts.threads.max(opts.batch_threads);
        let threads = if threads > 1 {
            Some(
                pool::SpinPool::new(threads, "ember-native")
                    .map_err(|e| format!("cannot start threads: {e}"))?,
            )
        } else {
            None
        };
        Ok(NativeBackend {
            family: family.clone(),
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

    /// Bytes of packed weights.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of the KV arena.
    pub fn kv_bytes(&self) -> usize {
        self.kv_bytes
    }

    /// Whether the file's weights were int8 (false: quantized at load).
    pub fn from_int8(&self) -> bool {
        self.net.all_int8()
    }

    /// Compare with `reference` on a probe sequence: prefill of 10 tokens, then
    /// 3 decode steps. Returns the largest logit difference relative to the
    /// largest logit magnitude, or why they disagree.
    pub fn check_against(&self, reference: &dyn Backend) -> Result<f32, String> {
        let vocab = self.vocab_size();
        if reference.vocab_size() != vocab {
            return Err(format!(
                "vocabulary {vocab} vs tract's {}",
                reference.vocab_size()
            ));
        }
        let probe: Vec<u32> = (0..13u32).map(|i| (i * 7919 + 13) % vocab as u32).collect();
        let (mut a, mut b) = (
            self.new_state().map_err(|e| e.to_string())?,
            reference.new_state().map_err(|e| e.to_string())?,
        );
        let (mut la, mut lb) = (vec![], vec![]);
        let mut worst = 0f32;
        for part in [&probe[..10], &probe[10..11], &probe[11..12], &probe[12..13]] {
            self.forward(&mut a, part, Logits::All, &mut la)
                .map_err(|e| e.to_string())?;
            reference
                .forward(&mut b, part, Logits::All, &mut lb)
                .map_err(|e| e.to_string())?;
            let scale = lb.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let diff = la
                .iter()
                .zip(&lb)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            worst = worst.max(diff / scale);
            let argmax = crate::sample::argmax;
            if argmax(&la[la.len() - vocab..]) != argmax(&lb[lb.len() - vocab..]) {
                return Err("the most likely next token differs from tract's".into());
            }
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

    fn par(&self) -> &dyn Parallel {
        match &self.threads {
            Some(p) => p,
            None => &Serial,
        }
    }

    /// Check an item and reserve its blocks.
    fn prepare(&self, state: &mut SeqState, tokens: &[u32]) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let vocab = self.vocab_size();
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadToken(bad, vocab));
        }
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
        let vocab = self.vocab_size();
        for j in jobs.iter_mut() {
            let n = if j.all { j.tokens.len() } else { 1 };
            j.out.clear();
            j.out.resize(n * vocab, 0.0);
        }
        let mut work = self.work.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: heapless::Vec<Row, MAX_ROWS> = heapless::Vec::new();
        let (mut j, mut t) = (0, 0);
        while j < jobs.len() {
            rows.clear();
            while !rows.is_full() && j < jobs.len() {
                let job = &jobs[j];
                let _ = rows.push(Row {
                    job: j,
                    pos: job.past + t,
                    token: job.tokens[t],
                    t,
                    want: job.all || t + 1 == job.tokens.len(),
                });
                t += 1;
                if t == job.tokens.len() {
                    (j, t) = (j + 1, 0);
                }
            }
            self.net
                .chunk(self.kernels, &mut work, &rows, jobs, self.par());
        }
    }
}

/// Largest logit difference from tract accepted at load, relative to the
/// largest logit magnitude. Float rounding in another order can flip an
/// activation's u8 code by one, which moves logits by a fraction of a
/// quantum: measured 2e-7 on kjv-gpt2's probe, 1.2 % on the random 1024-wide
/// GPT-2, 1.6 % for an fp32 file quantized at load; a wrong reading of the
/// graph moves them by tens of percent.
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

    fn forward_profiled(
        &self,
        state: &mut SeqState,
        tokens: &[u32],
        which: Logits,
        out: &mut Vec<f32>,
        profile: &mut Profile,
    ) -> Result<(), EngineError> {
        let t0 = std::time::Instant::now();
        let r = self.forward(state, tokens, which, out);
        profile.add("native forward", t0.elapsed());
        r
    }
}
