//! One model's scheduler: a bounded queue in front of a dedicated worker
//! thread that runs continuous batching.
//!
//! Inference never runs on the async I/O tasks: they [`Scheduler::submit`] a
//! [`Job`] (refused at once with [`SubmitError::Busy`] when the queue is full,
//! never buffered without bound) and read [`Event`]s back. Between decode
//! steps the worker admits queued jobs into the running batch (up to
//! `max_batch` sequences, so KV memory is bounded) and retires finished,
//! timed-out and abandoned ones: a client that goes away (its event receiver
//! dropped) frees its slot before the next step. Each step feeds every active
//! sequence one token through [`Backend::forward_batch`]; sampling is per
//! sequence with its own seeded sampler, so a request's tokens do not depend on
//! what else is in the batch.
//!
//! Prefill is chunked: an admitted prompt joins the next steps in pieces of
//! at most [`PREFILL_CHUNK`] tokens (the pieces of all prompts being read
//! share that budget per step), alongside the running sequences' decode
//! tokens. A long prompt therefore delays the running streams by one chunk
//! per step instead of its whole length, and on the native backend its rows
//! go through the same weight reads as the decode rows.
//!
//! Outcomes the scheduler decides (ok, timeout, cancelled) are counted here;
//! failures are counted by the front end that relays them.
//!
//! Heartbeat: the worker stamps the start of every prefill and decode step;
//! [`Scheduler::wedged`] reports a step running longer than a limit (or a
//! worker that died), which is what stops the systemd watchdog pings so a
//! wedged engine gets restarted. An idle worker waiting for work is healthy.
//! For the test of exactly that, `EMBER_FAULT_WEDGE=<model>` in the
//! environment makes that model's worker hang in its first step.
//!
//! [`Backend::forward_batch`]: crate::engine::Backend::forward_batch

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::LazyLock;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{BatchItem, EngineError, Model, SeqState};
use crate::generate::{FinishReason, GenerateParams, Generation, Step, Timings, Usage};
use crate::metrics::ModelMetrics;

/// A request as the scheduler takes it.
#[derive(Debug)]
pub struct Job {
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Generation parameters (validated by the caller).
    pub params: GenerateParams,
    /// When it arrived (time to first token counts from here).
    pub received: Instant,
    /// Past this instant it ends with `finish_reason: "timeout"`.
    pub deadline: Instant,
    /// If still queued at this instant, it is dropped without generating
    /// (MQTT message expiry).
    pub start_by: Option<Instant>,
    /// Where its events go; dropping the receiver cancels the job.
    pub events: UnboundedSender<Event>,
}

/// One generated token.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// Text that became final (may be empty while a character or a possible
    /// stop sequence is held back).
    pub text: String,
    /// The token id.
    pub token: u32,
    /// Its logprob.
    pub logprob: f32,
    /// The best alternatives, when logprobs were asked for.
    pub top: Vec<(u32, f32)>,
    /// Only releases held-back text at the end (no new token: EOS, deadline).
    pub flush: bool,
}

/// The end of a job.
#[derive(Debug, Clone)]
pub struct DoneEvent {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
}

/// What a job sends back, in order: tokens, then `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// A token.
    Token(TokenEvent),
    /// Finished (possibly after a text-only `Token` carrying held-back text).
    Done(DoneEvent),
    /// The request could not be served.
    Failed(EngineError),
}

/// A refused submission; the job is handed back.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full.
    #[error("model is busy: {0} requests already queued; retry shortly")]
    Busy(usize, Box<Job>),
    /// The scheduler is shutting down.
    #[error("model is shutting down")]
    Closed(Box<Job>),
}

/// Scheduler limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Jobs waiting.
    pub max_queue: usize,
}

#[derive(Debug, Default)]
struct Shared {
    queued: AtomicUsize,
    active: AtomicUsize,
    abort: AtomicBool,
    /// When the running step began, in µs since [`EPOCH`] + 1; 0 when idle.
    step_since: AtomicU64,
}

/// The heartbeat's clock origin.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// A step is running from now on (`busy`) or has ended.
fn beat(shared: &Shared, busy: bool) {
    let v = if busy {
        EPOCH.elapsed().as_micros() as u64 + 1
    } else {
        0
    };
    shared.step_since.store(v, Ordering::SeqCst);
}

/// A running scheduler (one per served model).
#[derive(Debug)]
pub struct Scheduler {
    tx: Mutex<Option<SyncSender<Job>>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    metrics: ModelMetrics,
}

impl Scheduler {
    /// Start the worker thread for `model`.
    pub fn spawn(
        name: &str,
        model: Arc<Model>,
        limits: Limits,
        metrics: ModelMetrics,
    ) -> Scheduler {
        let (tx, rx) = mpsc::sync_channel(limits.max_queue);
        let shared = Arc::new(Shared::default());
        let wedge = std::env::var("EMBER_FAULT_WEDGE").is_ok_and(|m| m == name);
        let worker = Worker {
            wedge,
            model,
            rx,
            limits,
            metrics: metrics.clone(),
            shared: shared.clone(),
            active: Vec::with_capacity(limits.max_batch),
        };
        let thread = std::thread::Builder::new()
            .name(format!("sched-{name}"))
            .spawn(move || worker.run())
            .expect("spawning a scheduler thread");
        Scheduler {
            tx: Mutex::new(Some(tx)),
            shared,
            thread: Mutex::new(Some(thread)),
            metrics,
        }
    }

    /// Queue a job, or hand it back at once if the queue is full or closed.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else {
            return Err(SubmitError::Closed(Box::new(job)));
        };
        // Count before sending so the worker's decrement never goes below zero.
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(job) {
            Ok(()) => {
                self.metrics.queue_depth.inc();
                Ok(())
            }
            Err(e) => {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                match e {
                    TrySendError::Full(job) => Err(SubmitError::Busy(self.queued(), Box::new(job))),
                    TrySendError::Disconnected(job) => Err(SubmitError::Closed(Box::new(job))),
                }
            }
        }
    }

    /// Jobs waiting.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// Sequences in the running batch.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Stop taking jobs; the worker finishes what it has (queue included), then exits.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// End every job now (each gets a `Failed` event), then exit.
    pub fn abort(&self) {
        self.shared.abort.store(true, Ordering::SeqCst);
        self.close();
    }

    /// Wait for the worker to exit (after [`close`](Self::close) or [`abort`](Self::abort)).
    pub fn join(&self) {
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// How long the running prefill or decode step has taken so far (None
    /// when the worker is idle).
    pub fn step_running_for(&self) -> Option<Duration> {
        match self.shared.step_since.load(Ordering::SeqCst) {
            0 => None,
            t => Some(EPOCH.elapsed().saturating_sub(Duration::from_micros(t - 1))),
        }
    }

    /// The worker is stuck: one step has run for more than `limit`, or the
    /// worker died while the scheduler still takes jobs.
    pub fn wedged(&self, limit: Duration) -> bool {
        let open = self.tx.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        (open && self.is_finished()) || self.step_running_for().is_some_and(|d| d > limit)
    }

    /// Whether the worker has exited.
    pub fn is_finished(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|h| h.is_finished())
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.abort();
        self.join();
    }
}

/// Prompt tokens fed per step, over all sequences still reading their prompt.
pub const PREFILL_CHUNK: usize = 64;

/// A sequence in the running batch.
struct Seq {
    gen: Generation,
    state: SeqState,
    /// Prompt tokens already fed (the sequence decodes once all are).
    fed: usize,
    logits: Vec<f32>,
    next: u32,
    events: UnboundedSender<Event>,
    received: Instant,
    deadline: Instant,
    prefill: Duration,
    first: Option<Duration>,
    last_token: Instant,
    want_logprobs: bool,
}

struct Worker {
    /// Fault injection for the watchdog test: hang in the first step.
    wedge: bool,
    model: Arc<Model>,
    rx: Receiver<Job>,
    limits: Limits,
    metrics: ModelMetrics,
    shared: Arc<Shared>,
    active: Vec<Seq>,
}

impl Worker {
    fn run(mut self) {
        let mut open = true;
        loop {
            // Admit queued jobs between steps.
            while open && self.active.len() < self.limits.max_batch {
                let job = if self.active.is_empty() {
                    match self.rx.recv() {
                        Ok(j) => j,
                        Err(_) => {
                            open = false;
                            break;
                        }
                    }
                } else {
                    match self.rx.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                };
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                self.metrics.queue_depth.dec();
                if self.shared.abort.load(Ordering::SeqCst) {
                    let _ = job.events.send(Event::Failed(shutting_down()));
                    continue;
                }
                beat(&self.shared, true);
                self.admit(job);
                beat(&self.shared, false);
                self.publish();
            }
            if self.shared.abort.load(Ordering::SeqCst) {
                for s in self.active.drain(..) {
                    let _ = s.events.send(Event::Failed(shutting_down()));
                }
            }
            if self.active.is_empty() {
                if !open {
                    self.publish();
                    return;
                }
                continue;
            }
            beat(&self.shared, true);
            self.step();
            beat(&self.shared, false);
            self.publish();
        }
    }

    fn publish(&self) {
        self.shared
            .active
            .store(self.active.len(), Ordering::SeqCst);
        self.metrics.active.set(self.active.len() as i64);
    }

    /// Prefill a new job and sample its first token.
    fn admit(&mut self, job: Job) {
        if self.wedge {
            // Hang for good (park can wake spuriously).
            loop {
                std::thread::park();
            }
        }
        if job.events.is_closed() {
            self.metrics.outcome("cancelled");
            return;
        }
        if job.start_by.is_some_and(|t| Instant::now() >= t) {
            let _ = job.events.send(Event::Failed(EngineError::Expired));
            return;
        }
        let model = &*self.model;
        let want_logprobs = job.params.sampling.logprobs.is_some();
        let started = || -> Result<(Generation, SeqState, usize), EngineError> {
            let gen = Generation::new(model, job.prompt_ids, job.params)?;
            let mut state = model.backend.new_state()?;
            // A prompt starting like an earlier one (same system prompt)
            // skips what is cached.
            let reused = model.backend.reuse_prefix(&mut state, gen.prompt_ids());
            if reused > 0 {
                tracing::debug!(reused, prompt = gen.prompt_ids().len(), "prefix reused");
            }
            Ok((gen, state, reused))
        };
        match started() {
            Err(e) => {
                // Counted by the front end that relays the failure.
                let _ = job.events.send(Event::Failed(e));
            }
            Ok((gen, state, reused)) => {
                let now = Instant::now();
                self.metrics.prefix_tokens.inc_by(reused as u64);
                self.active.push(Seq {
                    gen,
                    state,
                    fed: reused,
                    logits: Vec::with_capacity(model.backend.vocab_size()),
                    next: 0,
                    events: job.events,
                    received: job.received,
                    deadline: job.deadline,
                    prefill: Duration::ZERO,
                    first: None,
                    last_token: now,
                    want_logprobs,
                });
            }
        }
    }

    /// One decode step for the whole batch.
    fn step(&mut self) {
        let now = Instant::now();
        let model = self.model.clone();
        let metrics = self.metrics.clone();
        self.active.retain_mut(|s| {
            if s.events.is_closed() {
                metrics.outcome("cancelled");
                return false;
            }
            if now >= s.deadline {
                finish(&model, &metrics, s, FinishReason::Timeout);
                return false;
            }
            true
        });
        // Decode tokens for every sequence past its prompt, prompt pieces for
        // the others within the step's budget (first come, first served).
        let mut budget = PREFILL_CHUNK;
        let len = self.active.len();
        let mut fed = vec![0usize; len];
        let results: Vec<Option<Result<(), EngineError>>> = {
            let mut items: Vec<(usize, BatchItem)> = Vec::with_capacity(self.active.len());
            for (i, s) in self.active.iter_mut().enumerate() {
                let prompt = s.gen.prompt_ids();
                let tokens = if s.fed < prompt.len() {
                    let n = (prompt.len() - s.fed).min(budget);
                    if n == 0 {
                        continue;
                    }
                    budget -= n;
                    fed[i] = n;
                    &prompt[s.fed..s.fed + n]
                } else {
                    std::slice::from_ref(&s.next)
                };
                items.push((
                    i,
                    BatchItem {
                        state: &mut s.state,
                        tokens,
                        logits: &mut s.logits,
                        result: Ok(()),
                    },
                ));
            }
            let (index, mut batch): (Vec<usize>, Vec<BatchItem>) = items.into_iter().unzip();
            model.backend.forward_batch(&mut batch);
            let mut results: Vec<Option<Result<(), EngineError>>> =
                (0..len).map(|_| None).collect();
            for (i, it) in index.into_iter().zip(batch) {
                results[i] = Some(it.result);
            }
            results
        };
        let mut keep = Vec::with_capacity(self.active.len());
        let now = Instant::now();
        for ((mut s, r), n) in self
            .active
            .drain(..)
            .zip(results)
            .zip(fed)
            .collect::<Vec<_>>()
        {
            match r {
                None => keep.push(s), // its prompt waits for the next step's budget
                Some(Err(e)) => {
                    let _ = s.events.send(Event::Failed(e));
                }
                Some(Ok(())) => {
                    s.fed += n;
                    if s.fed < s.gen.prompt_ids().len() {
                        keep.push(s); // more prompt to read
                        continue;
                    }
                    if n > 0 {
                        s.prefill = now - s.received;
                    }
                    if self.sample(&mut s) {
                        keep.push(s);
                    }
                }
            }
        }
        self.active = keep;
    }

    /// Sample from `s.logits`, send the token; false when the sequence ended.
    fn sample(&self, s: &mut Seq) -> bool {
        let step: Step = match s.gen.accept(&self.model, &mut s.logits) {
            Ok(st) => st,
            Err(e) => {
                let _ = s.events.send(Event::Failed(e));
                return false;
            }
        };
        let now = Instant::now();
        match s.first {
            None => {
                s.first = Some(now - s.received);
                self.metrics.ttft.observe((now - s.received).as_secs_f64());
            }
            Some(_) => self
                .metrics
                .token_latency
                .observe((now - s.last_token).as_secs_f64()),
        }
        s.last_token = now;
        if step.finish != Some(FinishReason::Eos) {
            self.metrics.tokens.inc();
        }
        let eos = step.finish == Some(FinishReason::Eos);
        if !eos || !step.text.is_empty() {
            let _ = s.events.send(Event::Token(TokenEvent {
                text: step.text,
                token: step.sampled.token,
                logprob: step.sampled.logprob,
                top: if s.want_logprobs && !eos {
                    step.sampled.top.iter().copied().collect()
                } else {
                    vec![]
                },
                flush: eos,
            }));
        }
        match step.finish {
            Some(why) => {
                done(&self.metrics, s, why);
                false
            }
            None => {
                s.next = step.sampled.token;
                true
            }
        }
    }
}

fn shutting_down() -> EngineError {
    EngineError::Run("the daemon is shutting down".into())
}

/// End a sequence from outside (deadline): release held text, then `Done`.
fn finish(model: &Model, metrics: &ModelMetrics, s: &mut Seq, why: FinishReason) {
    match s.gen.interrupt(model, why) {
        Ok(text) if !text.is_empty() => {
            let _ = s.events.send(Event::Token(TokenEvent {
                text,
                token: s.next,
                logprob: 0.0,
                top: vec![],
                flush: true,
            }));
        }
        Ok(_) => {}
        Err(e) => {
            let _ = s.events.send(Event::Failed(e));
            return;
        }
    }
    done(metrics, s, why);
}

fn done(metrics: &ModelMetrics, s: &Seq, why: FinishReason) {
    let total = s.received.elapsed();
    let ttft = s.first.unwrap_or(total);
    let n = s.gen.output_ids().len();
    metrics.outcome(if why == FinishReason::Timeout {
        "timeout"
    } else {
        "ok"
    });
    let _ = s.events.send(Event::Done(DoneEvent {
        finish_reason: why,
        usage: Usage::new(s.gen.prompt_ids().len(), n),
        timings: Timings::measure(s.prefill, ttft, total, n),
    }));
}
