//! `emberd serve` configuration: TOML files and command-line overrides,
//! validated into typed [`Settings`] before anything starts.
//!
//! Where it comes from, first match wins: `--config FILE`; else
//! `/etc/ember/ember.toml` followed by `/etc/ember/conf.d/*.toml` in name
//! order (later files override earlier keys, tables merge); else built-in
//! defaults serving the bundled demo models. `--socket` and `--model
//! NAME=DIR` override the result. A bad file names the key and why.
//!
//! ```toml
//! [server]
//! socket = "/run/ember/ember.sock"
//! socket_mode = "0660"
//! socket_group = "ember"
//! max_connections = 64
//! max_body_bytes = 1048576
//! shutdown_timeout_secs = 30
//!
//! [models.kjv-gpt2]
//! path = "/usr/share/ember/models/kjv-gpt2"
//! threads = 2                # default: the CPUs, at most 4; a batch's sequences run in parallel
//! max_batch = 8              # sequences decoded together (bounds KV memory)
//! backend = "auto"           # "native" (int8 engine) when it recognises the graph, else "tract"
//! quantize_fp32 = false      # let the native engine quantize fp32 weights per row
//! kv_cache = "f32"           # native KV cache: "f16" halves its memory and attention's reads, "i8" quarters them
//! max_queue = 32             # requests waiting; more get "busy" (HTTP 429)
//! max_tokens = 128           # default when a request says nothing
//! max_tokens_limit = 1024    # most a request may ask for
//! request_timeout_secs = 120 # then finish_reason "timeout"
//! [models.kjv-gpt2.sampling] # defaults for requests
//! temperature = 0.8
//! top_p = 0.95
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::{BackendChoice, KvType};
use crate::sample::SamplingParams;

/// Where the system configuration lives.
pub const SYSTEM_DIR: &str = "/etc/ember";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted key, e.g. `models.kjv-gpt2.max_batch`.
        key: String,
        /// Why it is refused.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    server: ServerFile,
    models: BTreeMap<String, ModelFile>,
    mqtt: Option<MqttFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct MqttFile {
    broker: Option<String>,
    device_id: Option<String>,
    client_id: Option<String>,
    topic_prefix: Option<String>,
    qos: Option<u8>,
    keepalive_secs: Option<u64>,
    session_expiry_secs: Option<u32>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    max_payload_bytes: Option<usize>,
    pools: Vec<String>,
    home_assistant: bool,
    discovery_prefix: Option<String>,
    stats_interval_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ServerFile {
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
    max_connections: Option<usize>,
    max_body_bytes: Option<usize>,
    shutdown_timeout_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ModelFile {
    path: Option<PathBuf>,
    threads: Option<usize>,
    backend: Option<BackendChoice>,
    quantize_fp32: Option<bool>,
    kv_cache: Option<KvType>,
    max_batch: Option<usize>,
    max_queue: Option<usize>,
    max_context: Option<usize>,
    max_tokens: Option<usize>,
    max_tokens_limit: Option<usize>,
    request_timeout_secs: Option<f64>,
    sampling: Option<SamplingParams>,
    chat_template: Option<String>,
}

/// The server's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// Group owning the socket file, if set.
    pub socket_group: Option<String>,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// How long SIGTERM waits for in-flight requests before cancelling them.
    pub shutdown_timeout: Duration,
}

/// One served model's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// Name clients use.
    pub name: String,
    /// Model directory.
    pub path: PathBuf,
    /// Threads for inference: a batched step spreads its sequences over them.
    pub threads: usize,
    /// Which engine runs it.
    pub backend: BackendChoice,
    /// Whether the native engine may quantize fp32 weights.
    pub quantize_fp32: bool,
    /// How the native engine's KV cache stores keys and values.
    pub kv_cache: KvType,
    /// Sequences decoded together (the KV-memory bound).
    pub max_batch: usize,
    /// Requests waiting beyond the running batch.
    pub max_queue: usize,
    /// Cap below the model's own context, if set.
    pub max_context: Option<usize>,
    /// `max_tokens` when a request does not say.
    pub max_tokens: usize,
    /// Most `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// Sampling defaults; request fields override them.
    pub sampling: SamplingParams,
    /// A Jinja chat template overriding the model's own.
    pub chat_template: Option<String>,
}

/// The MQTT transport's settings (`[mqtt]`, or `--mqtt-broker`).
#[derive(Clone, PartialEq)]
pub struct MqttSettings {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// This daemon's id in topics (default: the hostname).
    pub device_id: String,
    /// MQTT client id (default: `ember-<device_id>`); a persistent session is keyed by it.
    pub client_id: String,
    /// First topic level (default `ember`).
    pub topic_prefix: String,
    /// QoS of subscriptions and replies (0, 1 or 2; default 1).
    pub qos: u8,
    /// Keepalive.
    pub keepalive: Duration,
    /// How long the broker keeps the session (and queued requests) while we are away.
    pub session_expiry_secs: u32,
    /// User name.
    pub username: Option<String>,
    /// Password, read from `password_file` (never logged).
    pub password: Option<String>,
    /// TLS: CA certificate (PEM); TLS is on when set.
    pub ca_file: Option<PathBuf>,
    /// TLS client certificate and key (PEM).
    pub client_auth: Option<(PathBuf, PathBuf)>,
    /// Largest request payload accepted.
    pub max_payload_bytes: usize,
    /// Fleet pools this daemon takes a share of.
    pub pools: Vec<String>,
    /// Home Assistant MQTT discovery: the discovery prefix when it is on
    /// (`home_assistant = true`; prefix `homeassistant` unless `discovery_prefix`).
    pub home_assistant: Option<String>,
    /// How often `<prefix>/<device>/stats` is published (tokens/s, queue):
    /// `stats_interval_secs`, default 30 s with Home Assistant on, else off.
    pub stats_interval: Option<Duration>,
}

impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings")
            .field("broker", &format_args!("{}:{}", self.host, self.port))
            .field("device_id", &self.device_id)
            .field("client_id", &self.client_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("qos", &self.qos)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.ca_file.is_some())
            .field("pools", &self.pools)
            .field("home_assistant", &self.home_assistant)
            .field("stats_interval", &self.stats_interval)
            .finish()
    }
}

/// The machine's hostname (the default device id).
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ember".into())
}

fn topic_level(key: &str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty() || v.contains(['/', '+', '#', '$']) {
        return Err(invalid(
            key,
            format!("{v:?} must be one topic level without / + # $"),
        ));
    }
    Ok(())
}

fn mqtt_settings(f: MqttFile, o: &Overrides) -> Result<Option<MqttSettings>, ConfigError> {
    let Some(broker) = o.mqtt_broker.clone().or(f.broker) else {
        return Ok(None);
    };
    let (host, port) = match broker.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse::<u16>().map_err(|_| {
                invalid(
                    "mqtt.broker",
                    format!("{broker:?}: the port is not a number"),
                )
            })?,
        ),
        None => (
            broker.clone(),
            if f.ca_file.is_some() { 8883 } else { 1883 },
        ),
    };
    if host.is_empty() {
        return Err(invalid("mqtt.broker", "expected HOST:PORT"));
    }
    let device_id = o.device_id.clone().or(f.device_id).unwrap_or_else(hostname);
    topic_level("mqtt.device_id", &device_id)?;
    let topic_prefix = f.topic_prefix.unwrap_or_else(|| "ember".into());
    topic_level("mqtt.topic_prefix", &topic_prefix)?;
    for p in &f.pools {
        topic_level("mqtt.pools", p)?;
    }
    let qos = f.qos.unwrap_or(1);
    if qos > 2 {
        return Err(invalid("mqtt.qos", format!("must be 0, 1 or 2, got {qos}")));
    }
    let password = match &f.password_file {
        None => None,
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| {
                    invalid(
                        "mqtt.password_file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
    };
    let home_assistant = match (f.home_assistant, f.discovery_prefix) {
        (false, _) => None,
        (true, p) => {
            let p = p.unwrap_or_else(|| "homeassistant".into());
            topic_level("mqtt.discovery_prefix", &p)?;
            Some(p)
        }
    };
    let stats_interval = match f.stats_interval_secs {
        Some(0) => None,
        Some(n) => Some(Duration::from_secs(n.min(86_400))),
        None => home_assistant.as_ref().map(|_| Duration::from_secs(30)),
    };
    let client_auth = match (f.cert_file, f.key_file) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "mqtt.cert_file",
                "cert_file and key_file go together",
            ))
        }
    };
    Ok(Some(MqttSettings {
        client_id: f.client_id.unwrap_or_else(|| format!("ember-{device_id}")),
        host,
        port,
        device_id,
        topic_prefix,
        qos,
        keepalive: Duration::from_secs(f.keepalive_secs.unwrap_or(30).clamp(5, 3600)),
        session_expiry_secs: f.session_expiry_secs.unwrap_or(3600),
        username: f.username,
        password,
        ca_file: f.ca_file,
        client_auth,
        max_payload_bytes: positive(
            "mqtt.max_payload_bytes".into(),
            f.max_payload_bytes,
            1 << 16,
            1 << 28,
        )?,
        pools: f.pools,
        home_assistant,
        stats_interval,
    }))
}

/// Everything `emberd serve` runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Server.
    pub server: ServerSettings,
    /// Models, in name order.
    pub models: Vec<ModelSettings>,
    /// The MQTT transport, when configured.
    pub mqtt: Option<MqttSettings>,
    /// The files read, in order (empty for built-in defaults).
    pub sources: Vec<PathBuf>,
}

/// Command-line overrides.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--socket PATH`.
    pub socket: Option<PathBuf>,
    /// `--model NAME=DIR`, repeatable.
    pub models: Vec<(String, PathBuf)>,
    /// `--mqtt-broker HOST:PORT`.
    pub mqtt_broker: Option<String>,
    /// `--device-id ID`.
    pub device_id: Option<String>,
}

/// The default socket: `$RUNTIME_DIRECTORY/ember.sock` under systemd,
/// `/run/ember/ember.sock` for root, else in `$XDG_RUNTIME_DIR`, else
/// `/tmp/ember-UID.sock`.
pub fn default_socket() -> PathBuf {
    // Under systemd (`RuntimeDirectory=ember`): /run/ember/ember.sock.
    if let Some(d) = std::env::var_os("RUNTIME_DIRECTORY") {
        if let Some(first) = d.to_str().and_then(|d| d.split(':').next()) {
            if !first.is_empty() {
                return Path::new(first).join("ember.sock");
            }
        }
    }
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        return PathBuf::from("/run/ember/ember.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Path::new(&d).join("ember.sock"),
        _ => PathBuf::from(format!("/tmp/ember-{uid}.sock")),
    }
}

/// Where the bundled demo models are looked for, in order: `$EMBER_MODELS`,
/// `<prefix>/share/ember/models` next to the binary, the source tree's
/// `models/` (for `cargo run`), `./models`.
pub fn demo_model_dirs() -> Vec<PathBuf> {
    let mut v = vec![];
    if let Some(d) = std::env::var_os("EMBER_MODELS") {
        v.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(bin) = exe.parent() {
            v.push(bin.join("../share/ember/models"));
        }
    }
    v.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"));
    v.push(PathBuf::from("models"));
    v
}

/// The demo models found in the first folder of [`demo_model_dirs`] that has any.
fn demo_models() -> Vec<(String, PathBuf)> {
    for dir in demo_model_dirs() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut found: Vec<(String, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("model.onnx").is_file())
            .filter_map(|p| Some((p.file_name()?.to_str()?.to_string(), p)))
            .collect();
        if !found.is_empty() {
            found.sort();
            return found;
        }
    }
    vec![]
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string(),
    })
}

/// Merge `over` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Read the files `overrides` and the system directory `system` call for.
fn read_sources(
    overrides: &Overrides,
    system: &Path,
) -> Result<(toml::Table, Vec<PathBuf>), ConfigError> {
    if let Some(f) = &overrides.config {
        return Ok((read_table(f)?, vec![f.clone()]));
    }
    let main = system.join("ember.toml");
    if !main.is_file() {
        return Ok((toml::Table::new(), vec![]));
    }
    let mut table = read_table(&main)?;
    let mut sources = vec![main];
    if let Ok(entries) = std::fs::read_dir(system.join("conf.d")) {
        let mut frags: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        frags.sort();
        for f in frags {
            merge(&mut table, read_table(&f)?);
            sources.push(f);
        }
    }
    Ok((table, sources))
}

/// Load and validate the configuration (system directory `/etc/ember`).
pub fn load(overrides: &Overrides) -> Result<Settings, ConfigError> {
    load_from(overrides, Path::new(SYSTEM_DIR))
}

/// [`load`] with another system directory (tests).
pub fn load_from(overrides: &Overrides, system: &Path) -> Result<Settings, ConfigError> {
    let (table, sources) = read_sources(overrides, system)?;
    let origin = sources
        .last()
        .cloned()
        .unwrap_or_else(|| PathBuf::from("<defaults>"));
    let file: FileConfig =
        FileConfig::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
            path: origin,
            message: e.to_string().trim().to_string(),
        })?;
    let mut s = validate(file, overrides)?;
    s.sources = sources;
    Ok(s)
}

/// Threads a model uses by default: the CPUs available, at most 4.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

fn positive(
    key: String,
    v: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    let v = v.unwrap_or(default);
    if v == 0 || v > max {
        return Err(invalid(
            key,
            format!("must be between 1 and {max}, got {v}"),
        ));
    }
    Ok(v)
}

fn seconds(key: String, v: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if !(v > 0.0 && v <= 86_400.0 * 365.0) {
        return Err(invalid(
            key,
            format!("must be a positive number of seconds, got {v}"),
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

fn validate(file: FileConfig, o: &Overrides) -> Result<Settings, ConfigError> {
    let mqtt = mqtt_settings(file.mqtt.unwrap_or_default(), o)?;
    let sv = file.server;
    let socket_mode = match &sv.socket_mode {
        None => 0o660,
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|&v| v <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "server.socket_mode",
                    format!("{m:?} is not an octal mode like \"0660\""),
                )
            })?,
    };
    let server = ServerSettings {
        socket: o
            .socket
            .clone()
            .or(sv.socket)
            .unwrap_or_else(default_socket),
        socket_mode,
        socket_group: sv.socket_group,
        max_connections: positive(
            "server.max_connections".into(),
            sv.max_connections,
            64,
            65_536,
        )?,
        max_body_bytes: positive(
            "server.max_body_bytes".into(),
            sv.max_body_bytes,
            1 << 20,
            1 << 30,
        )?,
        shutdown_timeout: seconds(
            "server.shutdown_timeout_secs".into(),
            sv.shutdown_timeout_secs,
            30.0,
        )?,
    };
    let mut entries = file.models;
    for (name, path) in &o.models {
        entries.entry(name.clone()).or_default().path = Some(path.clone());
    }
    if entries.is_empty() {
        for (name, path) in demo_models() {
            entries.entry(name).or_default().path = Some(path);
        }
    }
    if entries.is_empty() {
        return Err(invalid(
            "models",
            "no model configured and no demo models found; add a [models.NAME] table or pass --model NAME=DIR",
        ));
    }
    let mut models = vec![];
    for (name, m) in entries {
        let key = |k: &str| format!("models.{name}.{k}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(invalid(
                format!("models.{name}"),
                "a model name uses only letters, digits, '.', '_' and '-'",
            ));
        }
        let path = m
            .path
            .ok_or_else(|| invalid(key("path"), "missing: the model directory"))?;
        let sampling = m.sampling.unwrap_or_default();
        sampling
            .validate()
            .map_err(|e| invalid(key(&format!("sampling.{}", e.field)), e.reason))?;
        let max_tokens_limit =
            positive(key("max_tokens_limit"), m.max_tokens_limit, 4096, 1 << 20)?;
        let max_tokens = positive(key("max_tokens"), m.max_tokens, 128, max_tokens_limit)?;
        if let Some(c) = m.max_context {
            positive(key("max_context"), Some(c), c, 1 << 24)?;
        }
        models.push(ModelSettings {
            threads: positive(key("threads"), m.threads, default_threads(), 256)?,
            backend: m.backend.unwrap_or_default(),
            quantize_fp32: m.quantize_fp32.unwrap_or(false),
            kv_cache: m.kv_cache.unwrap_or_default(),
            max_batch: positive(key("max_batch"), m.max_batch, 8, 256)?,
            max_queue: positive(key("max_queue"), m.max_queue, 32, 1 << 16)?,
            max_context: m.max_context,
            max_tokens,
            max_tokens_limit,
            request_timeout: seconds(key("request_timeout_secs"), m.request_timeout_secs, 300.0)?,
            sampling,
            chat_template: m.chat_template,
            name,
            path,
        });
    }
    Ok(Settings {
        server,
        models,
        mqtt,
        sources: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn with_config(text: &str) -> Result<Settings, ConfigError> {
        let d = tempfile::tempdir().unwrap();
        let f = write(d.path(), "ember.toml", text);
        load_from(
            &Overrides {
                config: Some(f),
                ..Default::default()
            },
            d.path(),
        )
    }

    #[test]
    fn a_full_file_becomes_typed_settings() {
        let s = with_config(
            r#"
            [server]
            socket = "/tmp/x.sock"
            socket_mode = "0600"
            max_connections = 4
            [models.a]
            path = "/m/a"
            max_batch = 4
            max_queue = 2
            request_timeout_secs = 1.5
            kv_cache = "f16"
            [models.a.sampling]
            temperature = 0.0
            "#,
        )
        .unwrap();
        assert_eq!(s.server.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(s.server.socket_mode, 0o600);
        assert_eq!(s.server.max_connections, 4);
        let m = &s.models[0];
        assert_eq!((m.name.as_str(), m.max_batch, m.max_queue), ("a", 4, 2));
        assert_eq!(m.request_timeout, Duration::from_millis(1500));
        assert_eq!(m.kv_cache, crate::engine::KvType::F16);
        assert_eq!(m.sampling.temperature, 0.0);
    }

    #[test]
    fn errors_name_the_key() {
        let e = with_config("[models.a]\npath = \"/m\"\nmax_batch = 0\n").unwrap_err();
        assert!(e.to_string().starts_with("models.a.max_batch:"), "{e}");
        let e = with_config("[models.a]\npath = \"/m\"\n[models.a.sampling]\ntop_p = 2.0\n")
            .unwrap_err();
        assert!(e.to_string().starts_with("models.a.sampling.top_p:"), "{e}");
        let e = with_config("[server]\nsocket_mode = \"rw\"\n").unwrap_err();
        assert!(e.to_string().starts_with("server.socket_mode:"), "{e}");
        let e = with_config("[server]\nsokcet = \"/x\"\n").unwrap_err();
        assert!(e.to_string().contains("sokcet"), "{e}");
        let e = with_config("[models.a]\nthreads = 2\n").unwrap_err();
        assert!(e.to_string().starts_with("models.a.path:"), "{e}");
        let e = with_config("[models.a]\npath = \"/m\"\nkv_cache = \"f8\"\n").unwrap_err();
        assert!(e.to_string().contains("models.a.kv_cache"), "{e}");
        let e = with_config("[models.a\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }

    #[test]
    fn conf_d_fragments_merge_in_order_and_flags_override() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "ember.toml",
            "[server]\nsocket = \"/a.sock\"\n[models.a]\npath = \"/m/a\"\nmax_batch = 2\n",
        );
        write(
            d.path(),
            "conf.d/10-more.toml",
            "[models.a]\nmax_batch = 3\n[models.b]\npath = \"/m/b\"\n",
        );
        write(
            d.path(),
            "conf.d/20-last.toml",
            "[models.a]\nmax_batch = 5\n",
        );
        write(d.path(), "conf.d/ignored.txt", "not toml");
        let s = load_from(&Overrides::default(), d.path()).unwrap();
        assert_eq!(s.sources.len(), 3);
        assert_eq!(s.models.len(), 2);
        assert_eq!(s.models[0].max_batch, 5);
        assert_eq!(s.models[0].path, PathBuf::from("/m/a"));
        let s = load_from(
            &Overrides {
                socket: Some("/b.sock".into()),
                models: vec![("a".into(), "/elsewhere".into())],
                ..Default::default()
            },
            d.path(),
        )
        .unwrap();
        assert_eq!(s.server.socket, PathBuf::from("/b.sock"));
        assert_eq!(s.models[0].path, PathBuf::from("/elsewhere"));
        assert_eq!(s.models[0].max_batch, 5);
    }

    #[test]
    fn mqtt_settings_validate_and_flags_enable_them() {
        let s = with_config("[models.a]\npath = \"/m\"\n").unwrap();
        assert!(s.mqtt.is_none());
        let d = tempfile::tempdir().unwrap();
        let pw = write(d.path(), "pw", "s3cret\n");
        let s = with_config(&format!(
            "[models.a]\npath = \"/m\"\n[mqtt]\nbroker = \"broker.lan:1884\"\ndevice_id = \"pi\"\npools = [\"kitchen\"]\nusername = \"u\"\npassword_file = \"{}\"\n",
            pw.display()
        ))
        .unwrap();
        let m = s.mqtt.unwrap();
        assert_eq!((m.host.as_str(), m.port, m.qos), ("broker.lan", 1884, 1));
        assert_eq!(m.client_id, "ember-pi");
        assert_eq!(m.password.as_deref(), Some("s3cret"));
        assert!(
            !format!("{m:?}").contains("s3cret"),
            "password never in Debug output"
        );
        let e = with_config("[models.a]\npath = \"/m\"\n[mqtt]\nbroker = \"h:x\"\n").unwrap_err();
        assert!(e.to_string().starts_with("mqtt.broker:"), "{e}");
        let e =
            with_config("[models.a]\npath = \"/m\"\n[mqtt]\nbroker = \"h\"\ndevice_id = \"a/b\"\n")
                .unwrap_err();
        assert!(e.to_string().starts_with("mqtt.device_id:"), "{e}");
        let s = load_from(
            &Overrides {
                mqtt_broker: Some("127.0.0.1:1883".into()),
                device_id: Some("dev".into()),
                ..Default::default()
            },
            d.path(),
        )
        .unwrap();
        assert_eq!(s.mqtt.unwrap().device_id, "dev");
    }

    #[test]
    fn home_assistant_discovery_is_off_by_default_and_brings_stats() {
        let base = "[models.a]\npath = \"/m\"\n[mqtt]\nbroker = \"h\"\n";
        let m = with_config(base).unwrap().mqtt.unwrap();
        assert_eq!((m.home_assistant, m.stats_interval), (None, None));
        let m = with_config(&format!("{base}home_assistant = true\n"))
            .unwrap()
            .mqtt
            .unwrap();
        assert_eq!(m.home_assistant.as_deref(), Some("homeassistant"));
        assert_eq!(m.stats_interval, Some(Duration::from_secs(30)));
        let m = with_config(&format!(
            "{base}home_assistant = true\ndiscovery_prefix = \"ha\"\nstats_interval_secs = 0\n"
        ))
        .unwrap()
        .mqtt
        .unwrap();
        assert_eq!(
            (m.home_assistant.as_deref(), m.stats_interval),
            (Some("ha"), None)
        );
        let m = with_config(&format!("{base}stats_interval_secs = 5\n"))
            .unwrap()
            .mqtt
            .unwrap();
        assert_eq!(m.stats_interval, Some(Duration::from_secs(5)));
        let e = with_config(&format!(
            "{base}home_assistant = true\ndiscovery_prefix = \"a/b\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().starts_with("mqtt.discovery_prefix:"), "{e}");
    }

    #[test]
    fn no_file_serves_the_demo_models() {
        let d = tempfile::tempdir().unwrap();
        let s = load_from(&Overrides::default(), d.path()).unwrap();
        let names: Vec<&str> = s.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["kjv-gpt2", "kjv-lstm"]);
        assert!(s.sources.is_empty());
    }
}
