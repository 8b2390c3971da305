//! Engines: what turns token ids into logits.
//!
//! A [`Backend`] owns an optimised graph and runs sequences through it; each
//! sequence carries its own [`SeqState`] (KV cache or LSTM state), so one
//! loaded model serves many sequences. [`Model`] bundles a backend with its
//! tokenizer and settings; it is what the CLI and the server hold.

pub mod native;
pub mod tract;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::model::{self, Family, ModelDir, ModelError};
use crate::text::{TextError, Tokenizer};

/// A request the engine refused or failed to run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The prompt does not fit the context window.
    #[error("prompt is {prompt} tokens but the model's context is {context} tokens (including {max_tokens} requested for the output); shorten it, lower max_tokens, or use the truncate policy")]
    PromptTooLong {
        /// Prompt length in tokens.
        prompt: usize,
        /// Model context.
        context: usize,
        /// Output budget asked for.
        max_tokens: usize,
    },
    /// The prompt has no tokens.
    #[error("prompt is empty")]
    EmptyPrompt,
    /// A token id outside the vocabulary.
    #[error("token id {0} is outside the model's vocabulary of {1}")]
    BadToken(u32, usize),
    /// Sampling settings out of range.
    #[error(transparent)]
    Params(#[from] crate::sample::ParamError),
    /// Tokenization failed.
    #[error(transparent)]
    Text(#[from] TextError),
    /// The backend failed while running the graph.
    #[error("the request expired before it could start")]
    Expired,
    #[error("inference failed: {0}")]
    Run(String),
}

/// Per-sequence state owned by a backend (KV cache, recurrent state, position).
#[derive(Debug)]
pub struct SeqState {
    /// Tokens already consumed.
    pub len: usize,
    pub(crate) inner: Inner,
}

/// What a backend keeps per sequence.
#[derive(Debug)]
pub(crate) enum Inner {
    Tract(tract::TractState),
    Native(native::NativeState),
    Rnn(native::RnnState),
}

/// Whether a forward pass returns logits for every position or the last only.
/// One sequence's part of a batched step ([`Backend::forward_batch`]).
#[derive(Debug)]
pub struct BatchItem<'a> {
    /// The sequence.
    pub state: &'a mut SeqState,
    /// Tokens to feed (one while decoding).
    pub tokens: &'a [u32],
    /// Receives the logits of the last position.
    pub logits: &'a mut Vec<f32>,
    /// Set by the backend: this item's outcome.
    pub result: Result<(), EngineError>,
}

impl<'a> BatchItem<'a> {
    /// One decode step's items: sequence `i` is fed `next[i]`, its logits go
    /// to `logits[i]`.
    pub fn decode_step(
        states: &'a mut [SeqState],
        logits: &'a mut [Vec<f32>],
        next: &'a [u32],
    ) -> Vec<BatchItem<'a>> {
        states
            .iter_mut()
            .zip(logits)
            .zip(next)
            .map(|((state, logits), t)| BatchItem {
                state,
                tokens: std::slice::from_ref(t),
                logits,
                result: Ok(()),
            })
            .collect()
    }
}

/// How the native engine's KV cache stores keys and values.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum KvType {
    /// 32-bit floats: the values the graph computes, kept as onnxruntime
    /// keeps them, so logits match it as closely as the weights allow.
    #[default]
    F32,
    /// IEEE half precision, rounded to nearest even: half the memory, and
    /// half the bytes attention reads per step (what limits a batch of long
    /// sequences), for a small change in logits. Widened exactly to f32 for
    /// the attention kernels, so every ISA computes the same values.
    F16,
    /// Symmetric int8 with one f32 scale per position and KV head: a
    /// quarter of the f32 memory (plus 1/16 for the scales at head
    /// dimension 64) and of what attention reads per step, for a larger
    /// change in logits than f16. Attention reads it in integers: scores
    /// against the query quantized the same way, the weighted sum with the
    /// softmax weights quantized to u8 per block, exact in i32, so every
    /// ISA computes the same values.
    I8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `[vocab]`: what decoding needs.
    Last,
    /// `[tokens, vocab]`: what perplexity needs.
    All,
}

/// What a backend holds in memory and reads per token, where it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    /// Weights held, packed (padding, scales and float tables included).
    pub weight_bytes: usize,
    /// Weight bytes one decode step streams (every projection once): over the
    /// memory read bandwidth, the bound on tokens/s.
    pub bytes_per_token: usize,
    /// The KV cache, allocated at load.
    pub kv_bytes: usize,
}

/// A model runner. `forward` appends `tokens` to the sequence and writes logits to `out`.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Backend name for logs and metrics ("tract").
    fn name(&self) -> &'static str;
    /// The detected family.
    fn family(&self) -> &Family;
    /// Logit row width.
    fn vocab_size(&self) -> usize;
    /// A fresh, empty sequence.
    fn new_state(&self) -> Result<SeqState, EngineError>;
    /// Run `tokens` after what `state` holds.
    fn forward(
        &self,
        state: &mut SeqState,
        tokens: &[u32],
        which: Logits,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError>;
    /// On a fresh sequence: take cached state for a prefix of `prompt`
    /// (prefix reuse) and return how many of its tokens are already in
    /// `state`; the caller feeds the rest. Backends without a cache return 0.
    fn reuse_prefix(&self, state: &mut SeqState, prompt: &[u32]) -> usize {
        let _ = (state, prompt);
        0
    }

    /// Memory held and streamed per token; `None` where the backend cannot
    /// tell (tract keeps its own copies).
    fn footprint(&self) -> Option<Footprint> {
        None
    }

    /// Bytes per second a plain sequential loop reads the weights one decode
    /// step streams at, on this backend's threads (the best of three
    /// passes over the same memory); `None` where the backend cannot tell.
    /// Decode tokens/s times [`Footprint::bytes_per_token`] over it is how
    /// close decode runs to the memory's read bandwidth.
    fn weight_read_rate(&self) -> Option<f64> {
        None
    }

    /// One step for several sequences (continuous batching), logits of each
    /// item's last position into its `logits`. The default steps them one after
    /// another; a backend that can runs them as one batched product.
    fn forward_batch(&self, items: &mut [BatchItem<'_>]) {
        for it in items.iter_mut() {
            it.result = self.forward(it.state, it.tokens, Logits::Last, it.logits);
        }
    }

    /// [`Backend::forward`] with time accounted per operator; the default
    /// accounts the whole pass as one ("native forward").
    fn forward_profiled(
        &self,
        state: &mut SeqState,
        tokens: &[u32],
        which: Logits,
        out: &mut Vec<f32>,
        profile: &mut Profile,
    ) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let r = self.forward(state, tokens, which, out);
        profile.add(&format!("{} forward", self.name()), t0.elapsed());
        r
    }
}

/// Wall time per operator kind, accumulated over profiled forward passes.
#[derive(Debug, Default)]
pub struct Profile {
    /// Operator name -> (total time, calls).
    pub ops: std::collections::BTreeMap<String, (Duration, u64)>,
}

impl Profile {
    /// Account `d` to operator `op`.
    pub fn add(&mut self, op: &str, d: Duration) {
        let e = self.ops.entry(op.to_string()).or_default();
        e.0 += d;
        e.1 += 1;
    }

    /// Operators by decreasing time: (name, time, share of the total, calls).
    pub fn ranked(&self) -> Vec<(String, Duration, f64, u64)> {
        let total: Duration = self.ops.values().map(|v| v.0).sum();
        let mut v: Vec<_> = self
            .ops
            .iter()
            .map(|(k, &(d, n))| {
                (
                    k.clone(),
                    d,
                    d.as_secs_f64() / total.as_secs_f64().max(1e-12),
                    n,
                )
            })
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }
}

/// Which backend runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Native when it recognises the graph and agrees with tract, else tract.
    #[default]
    Auto,
    /// Native or fail to load.
    Native,
    /// Always tract.
    Tract,
}

/// Options for [`Model::load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Backend selection.
    pub backend: BackendChoice,
    /// Let the native engine quantize fp32 weight matrices (per row, int8).
    pub quantize_fp32: bool,
    /// The native engine's KV cache storage (tract keeps the graph's f32).
    pub kv_cache: KvType,
    /// Sequences the native KV arena holds at once (the batch size).
    pub max_seqs: usize,
    /// Threads for one forward pass.
    pub threads: usize,
    /// Threads a batched step spreads its sequences over (serving); each
    /// sequence then runs single-threaded.
    pub batch_threads: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            backend: BackendChoice::Auto,
            quantize_fp32: false,
            kv_cache: KvType::F32,
            max_seqs: 1,
            threads: 1,
            batch_threads: 1,
        }
    }
}

/// A loaded model: tokenizer, backend and the settings generation needs.
#[derive(Debug)]
pub struct Model {
    /// Where it came from.
    pub dir: ModelDir,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its runner.
    pub backend: Box<dyn Backend>,
    /// Context window in tokens, when known (LSTMs have none by default).
    pub context: Option<usize>,
    /// Ids that end generation.
    pub eos_ids: Vec<u32>,
    /// Wall time of [`Model::load`].
    pub load_time: Duration,
}

impl Model {
    /// Load and optimise a model directory.
    pub fn load(root: &Path, opts: &LoadOptions) -> Result<Model, ModelError> {
        let t0 = Instant::now();
        let dir = ModelDir::open(root)?;
        let tokenizer = Tokenizer::from_file(&dir.tokenizer)?;
        let version = crate::model::FileVersion::of(&dir.onnx)?;
        dir.verify_checksum()?;
        let proto = crate::model::read_proto(&dir)?;
        load_stage("parsed");
        let backend = choose_backend(&dir, &proto, opts)?;
        drop(proto);
        if crate::model::FileVersion::of(&dir.onnx)? != version {
            return Err(ModelError::Changed {
                path: dir.onnx.clone(),
            });
        }
        release_freed_memory();
        load_stage("backend chosen");
        let mut eos_ids = dir.eos_ids.clone();
        if eos_ids.is_empty() {
            eos_ids.extend(
                ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
                    .iter()
                    .filter_map(|t| tokenizer.token_id(t)),
            );
        }
        let context = match backend.family() {
            Family::Decoder(_) => dir.context_length(),
            Family::Lstm(_) => dir.ember.context_length,
        };
        Ok(Model {
            dir,
            tokenizer,
            backend,
            context,
            eos_ids,
            load_time: t0.elapsed(),
        })
    }

    /// Directory name, used as the model's display name.
    pub fn name(&self) -> String {
        self.dir
            .root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }
}

/// Blocks at least this large get their own mapping from glibc's malloc
/// (see [`fix_malloc_threshold`]).
pub const MMAP_THRESHOLD: usize = 16 << 20;

/// Fix glibc's mmap threshold at [`MMAP_THRESHOLD`], for the life of the
/// process; `main` calls it first. By default glibc raises the threshold
/// each time a mapped block is freed, up to 32 MiB, and its trim threshold
/// to twice that. Loading frees many blocks that size. After that, the
/// load's big buffers came from the heap, where freed memory stays
/// resident, so they piled up on each other. A fixed threshold turns that
/// off: blocks of 16 MiB or more are mapped and unmapped, and the heap
/// gives memory back once 128 KiB is free at its top. On the 135M bench
/// model, peak RSS fell from 280–294 MB to 248–250 MB, and load took as
/// long as before. The small demo models, which never grow the threshold,
/// peak 2–3 MB higher (kjv-gpt2: 37 → 39–40 MB), since their blocks
/// between 128 KiB and 16 MiB now come from the heap.
///
/// The environment's `MALLOC_MMAP_THRESHOLD_` or `GLIBC_TUNABLES` wins
/// where set. Does nothing outside glibc; musl's malloc has no such
/// threshold.
pub fn fix_malloc_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
        && std::env::var_os("GLIBC_TUNABLES").is_none()
    {
        // SAFETY: mallopt only changes malloc's tuning parameters, which glibc
        // allows at any time; the value fits in a c_int.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        }
    }
}

/// Hand the heap's free pages back to the kernel. Loading frees hundreds of
/// megabytes (the file, the decoded protobuf, tract's copy when the native
/// engine takes over), but glibc keeps freed large blocks in its heap once
/// its mmap threshold has grown, so RSS stayed at the load's level for the
/// life of the daemon. Also called between load stages, so that the next
/// stage's allocations do not sit on top of the last one's freed memory.
/// musl returns them on its own. In `emberd` the threshold no longer grows
/// ([`fix_malloc_threshold`]); this still returns freed blocks below
/// [`MMAP_THRESHOLD`] that are not at the heap's top, and does the whole
/// job where the library runs in a process whose `main` did not fix the
/// threshold (the tests).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory at the heap's top and in
    // its free lists to the kernel; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A `/proc/self/status` memory figure in bytes (`"VmRSS:"`, `"VmHWM:"`), 0
/// where unavailable.
pub fn proc_memory(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Log (debug) the process's resident and peak memory after a load stage:
/// where a big model's load peak comes from.
fn load_stage(stage: &str) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        let mib = |key| proc_memory(key) >> 20;
        tracing::debug!(
            stage,
            rss_mib = mib("VmRSS:"),
            peak_mib = mib("VmHWM:"),
            "model load"
        );
    }
}

/// Apply [`LoadOptions::backend`]: try the native engine unless told not to,
/// keep tract when native does not recognise the graph or disagrees with it
/// (an error instead when native was required).
///
/// tract checks and runs every model first, as the reference: its graph
/// typed but neither decluttered nor optimised (both make copies of the
/// weights), run on the probe and dropped. Only then does the native
/// engine pack its own copy, so the load holds one copy of the weights at a
/// time. A model that stays on tract is built again, optimised, from the
/// same (weightless) protobuf.
fn choose_backend(
    dir: &ModelDir,
    proto: &tract_onnx::pb::ModelProto,
    opts: &LoadOptions,
) -> Result<Box<dyn Backend>, ModelError> {
    let optimized = || -> Result<Box<dyn Backend>, ModelError> {
        if opts.kv_cache != KvType::F32 {
            tracing::warn!(
                model = %dir.root.display(),
                kv_cache = ?opts.kv_cache,
                "the KV cache setting applies to the native engine only; tract keeps f32"
            );
        }
        let tract = tract::TractBackend::from_proto(dir, proto, opts, tract::Build::Optimized)?;
        Ok(Box::new(tract))
    };
    if opts.backend == BackendChoice::Tract {
        return optimized();
    }
    // The reference stops before the output head, which runs on its own
    // once the rest is dropped (see tract::Head).
    let head = model::detect_family(dir, proto).ok().and_then(|family| {
        tract::Head::cut(proto, &native::head_input(dir, proto)?, family.logits())
    });
    let build = match &head {
        Some(head) => tract::Build::ReferenceUntil(head.input()),
        None => tract::Build::Reference,
    };
    let reference = tract::TractBackend::from_proto(dir, proto, opts, build)?;
    load_stage("tract reference");
    let family = reference.family().clone();
    let t0 = Instant::now();
    let probe = native::Probe::record(&reference);
    drop(reference);
    release_freed_memory();
    load_stage("reference dropped");
    let probe = match head {
        Some(head) => probe.and_then(|p| {
            p.map(|inputs, rows| {
                let logits = head.logits(dir, &[inputs.to_vec()], &[rows]);
                load_stage("tract head");
                let mut logits = logits.map_err(|e| e.to_string())?;
                logits
                    .pop()
                    .ok_or_else(|| "tract's head gave no logits".into())
            })
        }),
        None => probe,
    };
    release_freed_memory();
    load_stage("head dropped");
    let native = probe.and_then(|probe| {
        let n = native::load(dir, proto, &family, opts)?;
        load_stage("native packed");
        probe.check(&*n.backend).map(|diff| (n, diff))
    });
    match native {
        Ok((n, diff)) => {
            tracing::info!(
                model = %dir.root.display(),
                weights_mib = n.weight_bytes as f64 / (1 << 20) as f64,
                kv_cache_mib = n.kv_bytes as f64 / (1 << 20) as f64,
                kv_cache = ?opts.kv_cache,
                int8_file = n.from_int8,
                max_logit_diff = diff,
                probe_pack_and_check_ms = t0.elapsed().as_millis() as u64,
                "native engine"
            );
            Ok(n.backend)
        }
        Err(reason) if opts.backend == BackendChoice::Native => Err(ModelError::NotNative {
            path: dir.onnx.clone(),
            reason,
        }),
        Err(reason) => {
            tracing::info!(model = %dir.root.display(), %reason, "native engine not used; running on tract");
            optimized()
        }
    }
}
