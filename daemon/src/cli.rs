//! Command-line interface: `emberd serve | query | status | generate | bench | eval`.
//!
//! The flags and the JSON printed by `--json` and `bench` are a contract that
//! tests, scripts and users rely on; change them only with care.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::engine::{BackendChoice, BatchItem, KvType, LoadOptions, Logits, Model};
use crate::generate::{self, GenerateParams, Truncate};
use crate::sample::SamplingParams;

/// Ember: run int8 ONNX language models on small boards.
#[derive(Debug, Parser)]
#[command(name = "emberd", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the configured models on a Unix socket (OpenAI-compatible HTTP API).
    Serve(ServeArgs),
    /// Ask a running daemon for a completion, streaming it to stdout.
    Query(QueryArgs),
    /// Show a running daemon's health, models and counters.
    Status(StatusArgs),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Measure load time, prefill, time to first token, decode speed and peak memory.
    Bench(BenchArgs),
    /// Perplexity of a model on a text file.
    Eval(EvalArgs),
}

/// `emberd serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (default: /etc/ember/ember.toml and conf.d/*.toml,
    /// else the bundled demo models).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Socket path (overrides the configuration).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Serve the model in DIR as NAME (repeatable; overrides the configuration).
    #[arg(long = "model", value_name = "NAME=DIR", value_parser = parse_model_arg)]
    pub models: Vec<(String, PathBuf)>,
    /// Also serve over MQTT through this broker (overrides `[mqtt] broker`).
    #[arg(long, value_name = "HOST:PORT")]
    pub mqtt_broker: Option<String>,
    /// This daemon's id in MQTT topics (default: the hostname).
    #[arg(long, value_name = "ID")]
    pub device_id: Option<String>,
    /// Validate the configuration, print it and exit.
    #[arg(long)]
    pub check: bool,
}

fn parse_model_arg(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((n, d)) if !n.is_empty() && !d.is_empty() => Ok((n.to_string(), PathBuf::from(d))),
        _ => Err(format!("expected NAME=DIR, got {s:?}")),
    }
}

/// Where the client connects.
#[derive(Debug, Args)]
pub struct SocketArg {
    /// The daemon's socket (default: the path `emberd serve` uses without configuration).
    #[arg(long, value_name = "PATH", env = "EMBER_SOCKET")]
    pub socket: Option<PathBuf>,
}

impl SocketArg {
    fn path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(crate::config::default_socket)
    }
}

/// `emberd query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// Model name (default: the daemon's first model).
    #[arg(long)]
    pub model: Option<String>,
    /// Send the prompt as a chat message.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature (default: the model's configured default).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// The prompt.
    pub prompt: String,
}

/// `emberd status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub socket: SocketArg,
}

/// Flags shared by every command that loads a model.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model directory (model.onnx + tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Threads per forward pass.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Engine: native int8 when it recognises the graph (auto), or forced.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Let the native engine quantize fp32 weights per row (int8).
    #[arg(long)]
    pub quantize_fp32: bool,
    /// How the native engine's KV cache stores keys and values: f16 halves
    /// its memory and what attention reads, i8 quarters them, each for a
    /// small change in logits.
    #[arg(long, value_enum, default_value_t = KvType::F32)]
    pub kv_cache: KvType,
}

impl ModelArgs {
    fn load(&self) -> anyhow::Result<Model> {
        self.load_for(1)
    }

    /// Load with room (KV cache) for `seqs` sequences at once.
    fn load_for(&self, seqs: usize) -> anyhow::Result<Model> {
        if self.threads == 0 {
            bail!("--threads must be at least 1");
        }
        Model::load(
            &self.model,
            &LoadOptions {
                threads: self.threads,
                backend: self.backend,
                quantize_fp32: self.quantize_fp32,
                kv_cache: self.kv_cache,
                max_seqs: seqs,
                ..Default::default()
            },
        )
        .with_context(|| format!("cannot load model {}", self.model.display()))
    }
}

/// `emberd generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the K most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens below this fraction of the best token's probability (0: off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// > 1 discourages tokens already in prompt or output.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Penalty for any token already generated (-2..2).
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Penalty per occurrence of a generated token (-2..2).
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Random seed: same seed, same text.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long, value_name = "STR")]
    stop: Vec<String>,
    /// Also report the N most likely alternatives of each token (with --json).
    #[arg(long, value_name = "N")]
    logprobs: Option<usize>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// What to do with a prompt longer than the context.
    #[arg(long, value_enum, default_value_t = Truncate::Error)]
    truncate: Truncate,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
    /// The prompt.
    prompt: String,
}

/// `emberd bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens to generate (greedy, EOS ignored).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Also time every operator over one more run's decode steps and print
    /// the breakdown to stderr.
    #[arg(long)]
    profile: bool,
    /// Also step this many sequences together (continuous batching's decode
    /// shape, engine only: no sampler or I/O) and report their aggregate
    /// greedy tokens/s next to one sequence stepped the same way.
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
}

/// `emberd eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text to score.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Sliding-window stride in tokens (default: half the context).
    #[arg(long)]
    stride: Option<usize>,
    /// Score at most this many tokens.
    #[arg(long)]
    max_tokens: Option<usize>,
}

/// Logs to journald with structured fields (MODEL=, REQUEST=, PEER=, ...)
/// when stderr is the journal, else as text to stderr; `EMBER_LOG` filters.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tract_onnx::model=error"))
    };
    if crate::systemd::stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(j) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(
                        j.with_syslog_identifier("emberd".into())
                            .with_field_prefix(None)
                            .with_priority_mappings(tracing_journald::PriorityMappings {
                                info: tracing_journald::Priority::Informational,
                                debug: tracing_journald::Priority::Debug,
                                ..tracing_journald::PriorityMappings::new()
                            }),
                    )
                    .init();
                return;
            }
            Err(e) => eprintln!("emberd: journald unavailable ({e}); logging to stderr"),
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .init();
}

/// Parse the command line and run it.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    if let ember_kernels::CpuOverride::Unknown(v) = ember_kernels::cpu_override() {
        let known: Vec<&str> = ember_kernels::Isa::ALL.iter().map(|i| i.name()).collect();
        tracing::warn!(
            "EMBER_CPU={v} names no kernel level ({}); ignored",
            known.join(", ")
        );
    }
    tracing::info!(
        isa = ember_kernels::kernels().isa.name(),
        "ember-kernels in use"
    );
    match cli.command {
        Command::Serve(a) => cmd_serve(a),
        Command::Query(a) => cmd_query(a),
        Command::Status(a) => cmd_status(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Eval(a) => cmd_eval(a),
    }
}

fn cmd_serve(a: ServeArgs) -> anyhow::Result<()> {
    let overrides = crate::config::Overrides {
        config: a.config,
        socket: a.socket,
        models: a.models,
        mqtt_broker: a.mqtt_broker,
        device_id: a.device_id,
    };
    let settings = crate::config::load(&overrides)?;
    if a.check {
        let src: Vec<String> = settings
            .sources
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        println!(
            "configuration OK ({})",
            if src.is_empty() {
                "built-in defaults".into()
            } else {
                src.join(", ")
            }
        );
        println!(
            "socket {} (mode {:o})",
            settings.server.socket.display(),
            settings.server.socket_mode
        );
        if let Some(m) = &settings.mqtt {
            println!("mqtt {m:?}");
        }
        for m in &settings.models {
            println!(
                "model {}: {} (threads {}, max_batch {}, max_queue {}, timeout {:?})",
                m.name,
                m.path.display(),
                m.threads,
                m.max_batch,
                m.max_queue,
                m.request_timeout
            );
        }
        return Ok(());
    }
    crate::serve::run(settings, move || Ok(crate::config::load(&overrides)?))
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")
}

fn cmd_query(a: QueryArgs) -> anyhow::Result<()> {
    let q = crate::client::Query {
        model: a.model,
        chat: a.chat,
        prompt: a.prompt,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
    };
    let socket = a.socket.path();
    let mut out = std::io::stdout().lock();
    let finish = client_runtime()?.block_on(crate::client::query(&socket, &q, &mut out))?;
    writeln!(out)?;
    if std::io::stderr().is_terminal() {
        eprintln!("[finish_reason: {finish}]");
    }
    Ok(())
}

fn cmd_status(a: StatusArgs) -> anyhow::Result<()> {
    let socket = a.socket.path();
    let mut out = std::io::stdout().lock();
    let ok = client_runtime()?.block_on(crate::client::status(&socket, &mut out))?;
    if !ok {
        bail!("the daemon is not ready");
    }
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    let prompt_ids = model.tokenizer.encode(&a.prompt)?;
    let params = GenerateParams {
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            seed: a.seed,
            logprobs: a.logprobs,
        },
        max_tokens: a.max_tokens,
        stop: a.stop,
        ignore_eos: a.ignore_eos,
        truncate: a.truncate,
    };
    let stdout = std::io::stdout();
    let json = a.json;
    let completion = generate::run(&model, prompt_ids, params, |piece| {
        if !json {
            let mut out = stdout.lock();
            // A closed pipe (`| head`) is not an error worth a backtrace.
            let _ = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
        }
    })?;
    let mut out = stdout.lock();
    if json {
        serde_json::to_writer(&mut out, &completion)?;
    }
    writeln!(out)?;
    Ok(())
}

/// Text both `emberd bench` and `tools/ort_bench.py` tokenize, repeated, for their prompt.
pub const BENCH_TEXT: &str = "In the beginning God created the heaven and the earth. ";

/// The first `n` token ids of [`BENCH_TEXT`] repeated.
pub fn bench_prompt(model: &Model, n: usize) -> anyhow::Result<Vec<u32>> {
    let mut text = String::new();
    loop {
        text.push_str(BENCH_TEXT);
        let ids = model.tokenizer.encode(&text)?;
        if ids.len() >= n {
            return Ok(ids[..n].to_vec());
        }
    }
}

/// What `emberd bench` prints (medians over runs).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// "emberd".
    pub runtime: &'static str,
    /// Backend name.
    pub backend: String,
    /// Model directory.
    pub model: String,
    /// Threads per forward pass.
    pub threads: usize,
    /// fp32 weights quantized to int8 at load (`--quantize-fp32`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub quantize_fp32: bool,
    /// KV cache storage (`--kv-cache`).
    pub kv_cache: KvType,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Generated tokens per run.
    pub gen_tokens: usize,
    /// Repetitions.
    pub runs: usize,
    /// Model load, median.
    pub load_ms: f64,
    /// Prompt processing, median.
    pub prefill_ms: f64,
    /// Prefill plus first sampled token, median.
    pub ttft_ms: f64,
    /// Generated tokens after the first, per second, median.
    pub decode_tokens_per_s: f64,
    /// Peak resident memory of the process (VmHWM).
    pub peak_rss_bytes: u64,
    /// Native engine: bytes/s a plain loop reads the weights a decode step
    /// streams at, on the same threads, measured after each run; median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights_read_bytes_per_s: Option<f64>,
    /// Native engine: each run's decode tokens/s × `bytes_per_token` over
    /// the read rate measured right after it; median. 1.0 would be decode
    /// streaming its weights as fast as a plain read loop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_share: Option<f64>,
    /// `--batch N`: N.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// `--batch N`: aggregate tokens/s of N sequences stepped together, on
    /// KV cache pages touched before (a second pass, as in a running daemon).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_decode_tokens_per_s: Option<f64>,
    /// `--batch N`: one sequence stepped the same way (the ratio's base),
    /// also its second pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch1_decode_tokens_per_s: Option<f64>,
    /// `--batch N`: the N sequences' first pass, which touches fresh KV pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_cold_decode_tokens_per_s: Option<f64>,
    /// Weights held, bytes streamed per decode token, KV cache (native only).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub footprint: Option<crate::engine::Footprint>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Peak resident set size of this process, from /proc (0 where unavailable).
pub fn peak_rss_bytes() -> u64 {
    crate::engine::proc_memory("VmHWM:")
}

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    if std::io::stdout().is_terminal() {
        let pb = indicatif::ProgressBar::new(len);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {eta}")
                .expect("static template")
                .progress_chars("=> "),
        );
        pb.set_message(what.to_string());
        pb
    } else {
        indicatif::ProgressBar::hidden()
    }
}

fn cmd_bench(a: BenchArgs) -> anyhow::Result<()> {
    if a.runs == 0 || a.gen_tokens == 0 || a.prompt_tokens == 0 {
        bail!("--runs, --gen-tokens and --prompt-tokens must be at least 1");
    }
    let (mut load, mut prefill, mut ttft, mut tps) = (vec![], vec![], vec![], vec![]);
    let (mut read_rates, mut shares) = (vec![], vec![]);
    let pb = progress(a.runs as u64, "bench");
    let (mut backend, mut footprint) = (String::new(), None);
    for _ in 0..a.runs {
        let t0 = Instant::now();
        let model = a.model.load()?;
        load.push(t0.elapsed().as_secs_f64() * 1e3);
        backend = model.backend.name().to_string();
        footprint = model.backend.footprint();
        let prompt = bench_prompt(&model, a.prompt_tokens)?;
        let params = GenerateParams {
            sampling: SamplingParams::greedy(),
            max_tokens: a.gen_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        let c = generate::run(&model, prompt, params, |_| {})?;
        prefill.push(c.timings.prefill_ms);
        ttft.push(c.timings.ttft_ms);
        tps.push(c.timings.decode_tokens_per_s);
        // The read bandwidth right after this run's decode, over the same
        // bytes on the same threads: the bound it is held against.
        if let (Some(rate), Some(f)) = (model.backend.weight_read_rate(), footprint) {
            read_rates.push(rate);
            shares.push(c.timings.decode_tokens_per_s * f.bytes_per_token as f64 / rate);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if a.profile {
        print_decode_profile(&a)?;
    }
    let batched = match a.batch {
        Some(0) => bail!("--batch must be at least 1"),
        Some(n) => {
            let model = a.model.load_for(n)?;
            let prompt = bench_prompt(&model, a.prompt_tokens)?;
            let one = batch_decode(&model, &prompt, 1, a.gen_tokens)?.1;
            let (cold, warm) = batch_decode(&model, &prompt, n, a.gen_tokens)?;
            Some((n, warm, one, cold))
        }
        None => None,
    };
    let report = BenchReport {
        runtime: "emberd",
        backend,
        model: a.model.model.display().to_string(),
        threads: a.model.threads,
        quantize_fp32: a.model.quantize_fp32,
        kv_cache: a.model.kv_cache,
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        runs: a.runs,
        load_ms: median(load),
        prefill_ms: median(prefill),
        ttft_ms: median(ttft),
        decode_tokens_per_s: median(tps),
        peak_rss_bytes: peak_rss_bytes(),
        weights_read_bytes_per_s: (!read_rates.is_empty()).then(|| median(read_rates)),
        bandwidth_share: (!shares.is_empty()).then(|| median(shares)),
        batch: batched.map(|b| b.0),
        batch_decode_tokens_per_s: batched.map(|b| b.1),
        batch1_decode_tokens_per_s: batched.map(|b| b.2),
        batch_cold_decode_tokens_per_s: batched.map(|b| b.3),
        footprint,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Aggregate greedy decode tokens/s of `n` sequences stepped together, one
/// [`Backend::forward_batch`](crate::engine::Backend::forward_batch) per step,
/// after each prefilled the bench prompt (its last token varied per sequence):
/// `(cold, warm)`. The cold pass is the model's first, so its sequences touch
/// KV cache pages no one has touched before (the kernel zeroes each on its
/// first write); the warm pass repeats it on the blocks the first gave back,
/// as every step of a daemon that has been serving for a while does.
fn batch_decode(
    model: &Model,
    prompt: &[u32],
    n: usize,
    steps: usize,
) -> anyhow::Result<(f64, f64)> {
    let vocab = model.backend.vocab_size() as u32;
    let pass = || -> anyhow::Result<f64> {
        let mut states = vec![];
        let mut logits: Vec<Vec<f32>> = vec![vec![]; n];
        for (i, l) in logits.iter_mut().enumerate() {
            let mut p = prompt.to_vec();
            if let Some(last) = p.last_mut() {
                *last = (*last + i as u32) % vocab;
            }
            let mut st = model.backend.new_state()?;
            model.backend.forward(&mut st, &p, Logits::Last, l)?;
            states.push(st);
        }
        let t0 = Instant::now();
        for _ in 0..steps {
            let next: Vec<u32> = logits.iter().map(|l| crate::sample::argmax(l)).collect();
            let mut items = BatchItem::decode_step(&mut states, &mut logits, &next);
            model.backend.forward_batch(&mut items);
            for it in items {
                it.result?;
            }
        }
        Ok((n * steps) as f64 / t0.elapsed().as_secs_f64())
    };
    let cold = pass()?;
    Ok((cold, pass()?))
}

/// Greedy decode of `gen_tokens` after the bench prompt, every operator timed.
fn print_decode_profile(a: &BenchArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    let prompt = bench_prompt(&model, a.prompt_tokens)?;
    let mut state = model.backend.new_state()?;
    let mut logits = vec![];
    model
        .backend
        .forward(&mut state, &prompt, Logits::Last, &mut logits)?;
    let mut prof = crate::engine::Profile::default();
    let t0 = Instant::now();
    for _ in 0..a.gen_tokens {
        let tok = crate::sample::argmax(&logits);
        model
            .backend
            .forward_profiled(&mut state, &[tok], Logits::Last, &mut logits, &mut prof)?;
    }
    let wall = t0.elapsed().as_secs_f64();
    let ops: f64 = prof.ops.values().map(|v| v.0.as_secs_f64()).sum();
    eprintln!(
        "decode profile: {} steps, {:.3} ms/step wall, {:.3} ms/step in operators",
        a.gen_tokens,
        wall * 1e3 / a.gen_tokens as f64,
        ops * 1e3 / a.gen_tokens as f64
    );
    eprintln!(
        "{:<28} {:>9} {:>7} {:>8}",
        "operator", "ms/step", "share", "calls"
    );
    for (name, d, share, calls) in prof.ranked().into_iter().take(15) {
        let per_step = d.as_secs_f64() * 1e3 / a.gen_tokens as f64;
        eprintln!(
            "{name:<28} {per_step:>9.4} {:>6.1}% {calls:>8}",
            share * 100.0
        );
    }
    Ok(())
}

/// Result of `emberd eval`.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    /// exp(mean negative log-likelihood).
    pub perplexity: f64,
    /// Tokens whose probability was scored.
    pub tokens_evaluated: usize,
    /// Mean negative log-likelihood in nats.
    pub nll_per_token: f64,
    /// Window and stride used (none for recurrent models, which carry their
    /// state over the whole text).
    pub window: Option<usize>,
    /// See `window`.
    pub stride: Option<usize>,
}

/// Perplexity of `ids` under `model`: a sliding window over the context, each
/// token scored once with as much left context as the window allows.
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    stride: Option<usize>,
    on_window: impl Fn(usize),
) -> anyhow::Result<EvalReport> {
    if ids.len() < 2 {
        bail!("the text has fewer than 2 tokens; nothing to evaluate");
    }
    // LSTMs have no context limit: score the whole text in chunks, carrying state.
    let window = model.context.unwrap_or(usize::MAX).min(ids.len());
    let stride = stride.unwrap_or((window / 2).max(1)).clamp(1, window);
    let mut logits = vec![];
    let mut nll = 0.0f64;
    let mut scored = 0usize;
    let vocab = model.backend.vocab_size();
    let mut add = |logits: &[f32], targets: &[u32]| {
        for (row, &t) in logits.chunks(vocab).zip(targets) {
            let (_, lz) = crate::sample::log_sum_exp(row);
            nll += (lz - row[t as usize]) as f64;
            scored += 1;
        }
    };
    if model.context.is_none() {
        let mut state = model.backend.new_state()?;
        const CHUNK: usize = 256;
        for (i, chunk) in ids[..ids.len() - 1].chunks(CHUNK).enumerate() {
            model
                .backend
                .forward(&mut state, chunk, Logits::All, &mut logits)?;
            let start = i * CHUNK + 1;
            add(&logits, &ids[start..start + chunk.len()]);
            on_window(start + chunk.len());
        }
    } else {
        // Window [begin, end); positions before `scored_to` were scored by an earlier window.
        let mut scored_to = 1usize;
        let mut begin = 0usize;
        loop {
            let end = (begin + window).min(ids.len());
            let mut state = model.backend.new_state()?;
            model
                .backend
                .forward(&mut state, &ids[begin..end - 1], Logits::All, &mut logits)?;
            // Row r predicts ids[begin + r + 1].
            let first_row = scored_to - begin - 1;
            add(&logits[first_row * vocab..], &ids[scored_to..end]);
            scored_to = end;
            on_window(end);
            if end == ids.len() {
                break;
            }
            begin += stride;
            begin = begin.min(scored_to - 1);
        }
    }
    let mean = nll / scored as f64;
    let windowed = model.context.is_some();
    Ok(EvalReport {
        perplexity: mean.exp(),
        tokens_evaluated: scored,
        nll_per_token: mean,
        window: windowed.then_some(window),
        stride: windowed.then_some(stride),
    })
}

fn cmd_eval(a: EvalArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    let text = read_text(&a.text)?;
    let mut ids = model.tokenizer.encode(&text)?;
    if let Some(m) = a.max_tokens {
        ids.truncate(m + 1);
    }
    let pb = progress(ids.len() as u64, "eval");
    let report = perplexity(&model, &ids, a.stride, |done| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read text file {}", path.display()))
}
