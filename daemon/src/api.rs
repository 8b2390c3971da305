//! The HTTP API served on the Unix socket: OpenAI-compatible completions and
//! chat completions (plain and SSE streaming), models, health, metrics,
//! tokenize/detokenize. Handlers only parse, validate, queue and relay: the
//! work happens on the models' scheduler threads ([`crate::sched`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::config::{ModelSettings, ServerSettings};
use crate::engine::{EngineError, Model};
use crate::generate::{GenerateParams, Truncate};
use crate::metrics::Metrics;
use crate::sched::{DoneEvent, Event, Job, Scheduler, SubmitError, TokenEvent};
use crate::template::ChatTemplate;

/// A model being served.
#[derive(Debug)]
pub struct Served {
    /// Its settings.
    pub settings: ModelSettings,
    /// The loaded model.
    pub model: Arc<Model>,
    /// Its scheduler.
    pub sched: Scheduler,
    /// Its chat template.
    pub template: ChatTemplate,
}

/// The models being served, by name; swapped as a whole on reload.
#[derive(Debug, Default)]
pub struct Registry {
    /// Models by name.
    pub models: BTreeMap<String, Arc<Served>>,
}

/// Daemon state as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Models are loading: 503.
    Loading = 0,
    /// Serving: 200.
    Ready = 1,
    /// Draining after SIGTERM: 503.
    Stopping = 2,
}

/// Shared state of the API.
#[derive(Debug)]
pub struct App {
    /// Server settings.
    pub settings: ServerSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    registry: RwLock<Arc<Registry>>,
    phase: AtomicU8,
    next_id: AtomicU64,
}

impl App {
    /// A new API with no models yet (loading).
    pub fn new(settings: ServerSettings, metrics: Arc<Metrics>) -> App {
        App {
            settings,
            metrics,
            registry: RwLock::new(Arc::new(Registry::default())),
            phase: AtomicU8::new(Phase::Loading as u8),
            next_id: AtomicU64::new(1),
        }
    }

    /// The current registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Install a registry; returns the previous one.
    pub fn swap_registry(&self, r: Registry) -> Arc<Registry> {
        let mut g = self.registry.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *g, Arc::new(r))
    }

    /// Set the phase.
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::SeqCst);
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Loading,
            1 => Phase::Ready,
            _ => Phase::Stopping,
        }
    }
}

/// Who is on the other end of a connection (`SO_PEERCRED`), for the logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer {
    /// Peer uid.
    pub uid: u32,
    /// Peer pid, when the kernel gives it.
    pub pid: Option<i32>,
}

/// The router.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.settings.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/tokenize", post(tokenize))
        .route("/v1/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

// ---------------------------------------------------------------- errors

/// An API error: `{"error": {"message", "type", "code", "param"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    param: Option<String>,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        let kind = match status.as_u16() {
            400 | 404 | 413 | 422 => "invalid_request_error",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            _ => "server_error",
        };
        ApiError {
            status,
            kind,
            code,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    fn param(mut self, p: impl Into<String>) -> ApiError {
        self.param = Some(p.into());
        self
    }

    fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "code": self.code,
            "param": self.param,
        }})
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The HTTP status code.
    pub fn status_code(&self) -> u16 {
        self.status.as_u16()
    }

    /// A payload over the size limit.
    pub fn too_large(message: &str) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message)
    }

    /// A payload that is not usable JSON.
    pub fn invalid_json(message: &str) -> ApiError {
        ApiError::bad("invalid_json", message)
    }

    /// A request whose time to start had passed.
    pub fn expired() -> ApiError {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "expired",
            "the request expired before it could start",
        )
    }

    /// The daemon is stopping.
    pub fn shutting_down() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the request was dropped (daemon shutting down)",
        )
    }

    /// The metrics outcome label (`invalid`, `busy`, `error`).
    pub fn outcome(&self) -> &'static str {
        match self.status.as_u16() {
            429 => "busy",
            s if s < 500 => "invalid",
            _ => "error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        r
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match &e {
            EngineError::PromptTooLong { .. } => {
                ApiError::bad("context_length_exceeded", e.to_string()).param("prompt")
            }
            EngineError::EmptyPrompt => {
                ApiError::bad("empty_prompt", e.to_string()).param("prompt")
            }
            EngineError::BadToken(..) => ApiError::bad("invalid_token", e.to_string()),
            EngineError::Params(p) => ApiError::bad("invalid_value", e.to_string()).param(p.field),
            EngineError::Text(_) => ApiError::bad("invalid_text", e.to_string()),
            EngineError::Expired => ApiError::expired(),
            EngineError::Run(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "inference_failed",
                e.to_string(),
            ),
        }
    }
}

fn body_error(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "request body is larger than the server's max_body_bytes",
        )
    } else {
        ApiError::bad("invalid_body", r.body_text())
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    parse_bytes(&body.map_err(body_error)?)
}

fn parse_bytes<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(
            "invalid_json",
            format!("request body is not valid JSON for this endpoint: {e}"),
        )
    })
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

// ---------------------------------------------------------------- requests

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: text, a one-element list of text, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

/// Fields shared by both generation endpoints (OpenAI's, plus Ember's
/// sampling extras). Unknown fields are ignored, as OpenAI clients send many.
#[derive(Debug, Default, Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    n: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    ignore_eos: bool,
    truncate: Option<Truncate>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    /// Legacy completions: how many alternatives per token (0–20).
    logprobs: Option<usize>,
    #[serde(flatten)]
    common: Common,
}

/// One chat message.
#[derive(Debug, Deserialize, Serialize, Clone)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// Its text.
    pub content: String,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<usize>,
    #[serde(flatten)]
    common: Common,
}

fn find_model(app: &App, name: Option<&str>) -> Result<Arc<Served>, ApiError> {
    if app.phase() == Phase::Loading {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "loading",
            "models are still loading",
        ));
    }
    let reg = app.registry();
    let found = match name {
        Some(n) => reg.models.get(n).cloned(),
        None => reg.models.values().next().cloned(),
    };
    found.ok_or_else(|| {
        let known: Vec<&str> = reg.models.keys().map(|s| s.as_str()).collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!(
                "model {:?} is not served here; available: {}",
                name.unwrap_or(""),
                known.join(", ")
            ),
        )
        .param("model")
    })
}

/// The request's sampling and length settings over the model's defaults.
/// `logprobs` is (alternatives asked for, the field that asked: `logprobs`
/// on completions, `top_logprobs` on chat), so errors name the client's field.
fn params(
    served: &Served,
    c: &Common,
    logprobs: (Option<usize>, &'static str),
) -> Result<GenerateParams, ApiError> {
    let st = &served.settings;
    let mut s = st.sampling.clone();
    macro_rules! take {
        ($($f:ident),*) => { $( if let Some(v) = c.$f { s.$f = v; } )* };
    }
    take!(
        temperature,
        top_p,
        top_k,
        min_p,
        repetition_penalty,
        presence_penalty,
        frequency_penalty
    );
    if c.seed.is_some() {
        s.seed = c.seed;
    }
    s.logprobs = logprobs.0;
    s.validate().map_err(|mut e| {
        if e.field == "logprobs" {
            e.field = logprobs.1;
        }
        ApiError::bad("invalid_value", e.to_string()).param(e.field)
    })?;
    if let Some(n) = c.n.filter(|&n| n != 1) {
        return Err(ApiError::bad("invalid_value", format!("n must be 1 (got {n})")).param("n"));
    }
    let max_tokens = c
        .max_tokens
        .or(c.max_completion_tokens)
        .unwrap_or(st.max_tokens);
    if max_tokens == 0 || max_tokens > st.max_tokens_limit {
        return Err(ApiError::bad(
            "invalid_value",
            format!(
                "max_tokens must be between 1 and {} (got {max_tokens})",
                st.max_tokens_limit
            ),
        )
        .param("max_tokens"));
    }
    let stop = match &c.stop {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    if stop.len() > 16 || stop.iter().any(|s| s.is_empty()) {
        return Err(
            ApiError::bad("invalid_value", "stop takes up to 16 non-empty strings").param("stop"),
        );
    }
    Ok(GenerateParams {
        sampling: s,
        max_tokens,
        stop,
        ignore_eos: c.ignore_eos,
        truncate: c.truncate.unwrap_or_default(),
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the two endpoints differ in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// A request accepted by a scheduler: its events, and what shapes its replies.
#[derive(Debug)]
pub struct Running {
    metrics: Arc<Metrics>,
    id: String,
    kind: Kind,
    model: String,
    served: Arc<Served>,
    rx: UnboundedReceiver<Event>,
    logprobs: bool,
}

async fn completions(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(&app, peer, body, prepare_completion).await
}

/// Both generation endpoints: prepare, run, reply (errors counted).
async fn generate(
    app: &Arc<App>,
    peer: Peer,
    body: Result<Bytes, BytesRejection>,
    prepare: fn(&App, &[u8]) -> Result<Prepared, Refusal>,
) -> Response {
    let r = async {
        let body = body.map_err(body_error)?;
        let p = prepare(app, &body)?;
        start(app, peer, p).await
    };
    respond(app, r.await).await
}

/// A validated generation request, ready for its model's scheduler.
#[derive(Debug)]
pub struct Prepared {
    served: Arc<Served>,
    kind: Kind,
    ids: Vec<u32>,
    params: GenerateParams,
    /// Whether the client asked for streaming.
    pub stream: bool,
    logprobs: bool,
}

/// Parse and validate a completion request (HTTP body or MQTT payload).
pub fn prepare_completion(app: &App, body: &[u8]) -> Result<Prepared, Refusal> {
    let req: CompletionRequest = parse_bytes(body)?;
    let served = find_model(app, req.common.model.as_deref())?;
    let name = served.settings.name.clone();
    let tag = |e: ApiError| Refusal::new(e, name.clone());
    let params = params(&served, &req.common, (req.logprobs, "logprobs")).map_err(tag)?;
    let ids = match &req.prompt {
        Prompt::Text(t) => encode(&served, t).map_err(tag)?,
        Prompt::Texts(v) if v.len() == 1 => encode(&served, &v[0]).map_err(tag)?,
        Prompt::Texts(_) => {
            return Err(tag(ApiError::bad(
                "invalid_value",
                "prompt must be one string (batches of prompts: send one request each)",
            )
            .param("prompt")))
        }
        Prompt::Ids(ids) => ids.clone(),
    };
    Ok(Prepared {
        served,
        kind: Kind::Completion,
        ids,
        params,
        stream: req.common.stream,
        logprobs: req.logprobs.is_some(),
    })
}

async fn chat_completions(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(&app, peer, body, prepare_chat).await
}

/// Parse and validate a chat request (HTTP body or MQTT payload).
pub fn prepare_chat(app: &App, body: &[u8]) -> Result<Prepared, Refusal> {
    let req: ChatRequest = parse_bytes(body)?;
    let served = find_model(app, req.common.model.as_deref())?;
    let name = served.settings.name.clone();
    let tag = |e: ApiError| Refusal::new(e, name.clone());
    if req.messages.is_empty() {
        return Err(tag(
            ApiError::bad("invalid_value", "messages is empty").param("messages")
        ));
    }
    let top = if req.logprobs {
        Some(req.top_logprobs.unwrap_or(0))
    } else {
        None
    };
    let mut params = params(&served, &req.common, (top, "top_logprobs")).map_err(tag)?;
    let prompt = served
        .template
        .render(&req.messages)
        .map_err(|e| tag(ApiError::bad("invalid_messages", e).param("messages")))?;
    params.stop.extend(served.template.stops().iter().cloned());
    let ids = encode(&served, &prompt).map_err(tag)?;
    Ok(Prepared {
        served,
        kind: Kind::Chat,
        ids,
        params,
        stream: req.common.stream,
        logprobs: req.logprobs,
    })
}

fn encode(served: &Served, text: &str) -> Result<Vec<u32>, ApiError> {
    served
        .model
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::bad("invalid_text", e.to_string()).param("prompt"))
}

enum Reply {
    Json(Value),
    Stream(Response),
}

async fn respond(app: &App, r: Result<Reply, Refusal>) -> Response {
    match r {
        Ok(Reply::Json(v)) => Json(v).into_response(),
        Ok(Reply::Stream(s)) => s,
        Err(r) => {
            let (e, model) = r.into_parts();
            app.metrics.outcome(&model, e.outcome());
            e.into_response()
        }
    }
}

/// A refused request: the error, and the model it named (empty when none),
/// for the metrics. Boxed: it travels through `Result`s on every path.
#[derive(Debug)]
pub struct Refusal(Box<(ApiError, String)>);

impl Refusal {
    /// `error` for `model`.
    pub fn new(error: ApiError, model: String) -> Refusal {
        Refusal(Box::new((error, model)))
    }

    /// The error.
    pub fn error(&self) -> &ApiError {
        &self.0 .0
    }

    /// The model named ("" when none was resolved).
    pub fn model(&self) -> &str {
        &self.0 .1
    }

    /// Both parts.
    pub fn into_parts(self) -> (ApiError, String) {
        *self.0
    }
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal::new(e, String::new())
    }
}

/// Queue a prepared request on its model's scheduler; the returned stream of
/// events is the request (dropping it cancels).
pub fn submit(
    app: &App,
    p: Prepared,
    origin: &str,
    start_by: Option<Duration>,
) -> Result<Running, Refusal> {
    let served = p.served;
    let model = served.settings.name.clone();
    let n = app.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match p.kind {
        Kind::Completion => format!("cmpl-{n}"),
        Kind::Chat => format!("chatcmpl-{n}"),
    };
    let (tx, rx) = unbounded_channel();
    let now = Instant::now();
    let timeout = served.settings.request_timeout;
    let job = Job {
        prompt_ids: p.ids,
        params: p.params,
        received: now,
        deadline: now + timeout,
        start_by: start_by.map(|d| now + d),
        events: tx,
    };
    tracing::info!(request = %id, model = %model, peer = origin, stream = p.stream, "request");
    if let Err(e) = served.sched.submit(job) {
        let err = match e {
            SubmitError::Busy(q, _job) => {
                let mut err = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "model_busy",
                    format!("model {model} is busy ({q} requests queued); retry shortly"),
                );
                err.retry_after = Some(1);
                err
            }
            SubmitError::Closed(_job) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                format!("model {model} is shutting down"),
            ),
        };
        return Err(Refusal::new(err, model));
    }
    Ok(Running {
        metrics: app.metrics.clone(),
        id,
        kind: p.kind,
        model,
        served,
        rx,
        logprobs: p.logprobs,
    })
}

async fn start(app: &Arc<App>, peer: Peer, p: Prepared) -> Result<Reply, Refusal> {
    let origin = format!(
        "uid {} pid {}",
        peer.uid,
        peer.pid.map_or("?".into(), |p| p.to_string())
    );
    let stream = p.stream;
    let run = submit(app, p, &origin, None)?;
    let model = run.model.clone();
    if stream {
        stream_reply(run).await.map_err(|e| Refusal::new(e, model))
    } else {
        collect(run).await.map_err(|e| Refusal::new(e, model))
    }
}

impl Running {
    /// The model's name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The next event; `None` once the scheduler let go of the request.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

/// Logprobs of the tokens so far, as OpenAI's two endpoints shape them.
#[derive(Default)]
struct Lp {
    tokens: Vec<String>,
    logprobs: Vec<f32>,
    top: Vec<Vec<(String, f32)>>,
}

impl Lp {
    fn push(&mut self, model: &Model, t: &TokenEvent) {
        let s = |id: u32| model.tokenizer.decode(&[id]).unwrap_or_default();
        self.tokens.push(s(t.token));
        self.logprobs.push(t.logprob);
        self.top
            .push(t.top.iter().map(|&(id, lp)| (s(id), lp)).collect());
    }

    fn json(&self, kind: Kind) -> Value {
        match kind {
            Kind::Completion => json!({
                "tokens": self.tokens,
                "token_logprobs": self.logprobs,
                "top_logprobs": self.top.iter().map(|t| {
                    t.iter().map(|(s, lp)| (s.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
            }),
            Kind::Chat => json!({
                "content": self.tokens.iter().zip(&self.logprobs).zip(&self.top).map(|((t, lp), top)| json!({
                    "token": t,
                    "logprob": lp,
                    "top_logprobs": top.iter().map(|(t, lp)| json!({"token": t, "logprob": lp})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
        }
    }
}

fn usage_json(d: &DoneEvent) -> Value {
    json!({
        "prompt_tokens": d.usage.prompt_tokens,
        "completion_tokens": d.usage.completion_tokens,
        "total_tokens": d.usage.total_tokens,
    })
}

async fn collect(mut run: Running) -> Result<Reply, ApiError> {
    let mut text = String::new();
    let mut lp = Lp::default();
    loop {
        match run.rx.recv().await {
            Some(Event::Token(t)) => {
                text.push_str(&t.text);
                if run.logprobs && !t.flush {
                    lp.push(&run.served.model, &t);
                }
            }
            Some(Event::Done(d)) => {
                let lpj = if run.logprobs {
                    lp.json(run.kind)
                } else {
                    Value::Null
                };
                let choice = match run.kind {
                    Kind::Completion => json!({
                        "index": 0, "text": text, "logprobs": lpj,
                        "finish_reason": d.finish_reason.as_str(),
                    }),
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lpj,
                        "finish_reason": d.finish_reason.as_str(),
                    }),
                };
                return Ok(Reply::Json(json!({
                    "id": run.id,
                    "object": if run.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
                    "created": now_secs(),
                    "model": run.model,
                    "choices": [choice],
                    "usage": usage_json(&d),
                    "timings": d.timings,
                })));
            }
            Some(Event::Failed(e)) => return Err(e.into()),
            None => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the request was dropped (daemon shutting down)",
                ))
            }
        }
    }
}

/// One SSE chunk of a streaming reply.
fn chunk(
    run: &Running,
    text: Option<&str>,
    finish: Option<&DoneEvent>,
    lp: Option<Value>,
) -> Value {
    let finish_reason = finish.map(|d| d.finish_reason.as_str());
    let mut v = match run.kind {
        Kind::Completion => json!({
            "id": run.id, "object": "text_completion", "created": now_secs(), "model": run.model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": lp, "finish_reason": finish_reason}],
        }),
        Kind::Chat => json!({
            "id": run.id, "object": "chat.completion.chunk", "created": now_secs(), "model": run.model,
            "choices": [{"index": 0, "delta": match text { Some(t) => json!({"role": "assistant", "content": t}), None => json!({}) },
                         "logprobs": lp, "finish_reason": finish_reason}],
        }),
    };
    if let Some(d) = finish {
        v["usage"] = usage_json(d);
        v["timings"] = serde_json::to_value(&d.timings).unwrap_or(Value::Null);
    }
    v
}

/// Turn one event into SSE data; `None` for events with nothing to send.
fn sse_data(run: &Running, ev: Event) -> Option<String> {
    match ev {
        Event::Token(t) => {
            let lp = if run.logprobs && !t.flush {
                let mut l = Lp::default();
                l.push(&run.served.model, &t);
                Some(l.json(run.kind))
            } else {
                None
            };
            if t.text.is_empty() && lp.is_none() {
                return None;
            }
            Some(chunk(run, Some(&t.text), None, lp).to_string())
        }
        Event::Done(d) => Some(chunk(run, None, Some(&d), None).to_string()),
        Event::Failed(e) => {
            let e = ApiError::from(e);
            run.metrics.outcome(&run.model, e.outcome());
            Some(e.body().to_string())
        }
    }
}

async fn stream_reply(mut run: Running) -> Result<Reply, ApiError> {
    // Wait for the first event so a refused request gets a proper status.
    let first = match run.rx.recv().await {
        Some(Event::Failed(e)) => return Err(e.into()),
        Some(ev) => ev,
        None => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the request was dropped (daemon shutting down)",
            ))
        }
    };
    let first_data = sse_data(&run, first);
    let rx = std::mem::replace(&mut run.rx, unbounded_channel().1);
    let run = Arc::new(run);
    let r2 = run.clone();
    let events = futures_util::stream::iter(first_data)
        .chain(UnboundedReceiverStream::new(rx).filter_map(move |ev| {
            let d = sse_data(&r2, ev);
            async move { d }
        }))
        .chain(futures_util::stream::iter(Some("[DONE]".to_string())))
        .map(|d| Ok::<_, Infallible>(SseEvent::default().data(d)));
    Ok(Reply::Stream(Sse::new(events).into_response()))
}

// ---------------------------------------------------------------- the rest

#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    #[serde(alias = "text")]
    prompt: String,
}

async fn tokenize(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = parse(body)?;
    let served = find_model(&app, req.model.as_deref())?;
    let ids = encode(&served, &req.prompt)?;
    Ok(Json(
        json!({"model": served.settings.name, "count": ids.len(), "tokens": ids}),
    ))
}

#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

async fn detokenize(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeRequest = parse(body)?;
    let served = find_model(&app, req.model.as_deref())?;
    let vocab = served.model.backend.vocab_size();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad(
            "invalid_token",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        )
        .param("tokens"));
    }
    let text = served
        .model
        .tokenizer
        .decode(&req.tokens)
        .map_err(|e| ApiError::bad("invalid_token", e.to_string()))?;
    Ok(Json(json!({"model": served.settings.name, "text": text})))
}

fn model_json(s: &Served) -> Value {
    json!({
        "id": s.settings.name,
        "object": "model",
        "created": 0,
        "owned_by": "ember",
        "backend": s.model.backend.name(),
        "family": match s.model.backend.family() {
            crate::model::Family::Decoder(_) => "decoder",
            crate::model::Family::Lstm(_) => "lstm",
        },
        "context_length": s.model.context,
        "max_batch": s.settings.max_batch,
        "max_queue": s.settings.max_queue,
        "path": s.settings.path,
    })
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let reg = app.registry();
    let data: Vec<Value> = reg.models.values().map(|s| model_json(s)).collect();
    Json(json!({"object": "list", "data": data}))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let reg = app.registry();
    let phase = app.phase();
    let models: serde_json::Map<String, Value> = reg
        .models
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                json!({
                    "state": if s.sched.is_finished() { "stopped" } else { "ready" },
                    "queued": s.sched.queued(),
                    "active": s.sched.active(),
                    "max_batch": s.settings.max_batch,
                    "load_ms": s.model.load_time.as_secs_f64() * 1e3,
                }),
            )
        })
        .collect();
    let (status, word) = match phase {
        Phase::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        Phase::Ready => (StatusCode::OK, "ok"),
        Phase::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
    };
    (
        status,
        Json(json!({"status": word, "version": env!("CARGO_PKG_VERSION"), "models": models})),
    )
        .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}
