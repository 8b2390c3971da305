//! The MQTT transport: generation requests and replies over an MQTT v5
//! broker (3.1.1 clients welcome), sharing the schedulers with the socket API.
//!
//! Topics (prefix `ember` by default):
//! * `ember/<device>/generate` — requests for this daemon;
//! * `ember/fleet/<pool>/generate`, subscribed as `$share/<pool>/...` — each
//!   daemon of a pool takes a share (the broker balances, no coordination here);
//! * `ember/<device>/cancel`, `ember/fleet/<pool>/cancel` — payload: the
//!   request's correlation id;
//! * `ember/<device>/status` (retained `online`, Last Will `offline`) and
//!   `ember/<device>/info` (retained JSON: version, models, board, kernels);
//! * `ember/<device>/stats` every `stats_interval_secs` (JSON: tokens/s over
//!   the interval, tokens generated, queue depth, active sequences);
//! * with `home_assistant = true`, retained Home Assistant discovery configs
//!   (`homeassistant/binary_sensor/...` for the status, `homeassistant/sensor/...`
//!   for tokens/s and queue depth) so the daemon shows up as a device there.
//!
//! A request's payload is the socket API's JSON (`prompt` or `messages`, the
//! sampling fields, `stream`). Replies go to the MQTT v5 Response Topic with the
//! request's Correlation Data; MQTT 3.1.1 clients put `reply_to` and `id` in the
//! JSON instead. A streamed reply is one message per chunk (user properties
//! `seq` and `last`), the final one carrying `finish_reason` and `usage`.
//!
//! One task owns the rumqttc event loop; each request is relayed by a task of
//! its own. Requests are acknowledged (QoS 1) only once their final reply is
//! queued, and a redelivery of an id already seen is not answered twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

use crate::api::{prepare_chat, prepare_completion, submit, ApiError, App, Refusal, Running};
use crate::config::MqttSettings;
use crate::sched::Event;

/// How many recent request ids are remembered to drop redeliveries.
const DEDUPE_WINDOW: usize = 8192;

/// Topics of one daemon.
#[derive(Debug, Clone)]
struct Topics {
    generate: String,
    cancel: String,
    status: String,
    info: String,
    stats: String,
    fleet: Vec<(String, String)>,
}

impl Topics {
    fn new(s: &MqttSettings) -> Topics {
        let p = &s.topic_prefix;
        let d = &s.device_id;
        Topics {
            generate: format!("{p}/{d}/generate"),
            cancel: format!("{p}/{d}/cancel"),
            status: format!("{p}/{d}/status"),
            info: format!("{p}/{d}/info"),
            stats: format!("{p}/{d}/stats"),
            fleet: s
                .pools
                .iter()
                .map(|pool| {
                    (
                        format!("{p}/fleet/{pool}/generate"),
                        format!("{p}/fleet/{pool}/cancel"),
                    )
                })
                .collect(),
        }
    }

    fn is_generate(&self, t: &str) -> bool {
        t == self.generate || self.fleet.iter().any(|(g, _)| g == t)
    }

    fn is_cancel(&self, t: &str) -> bool {
        t == self.cancel || self.fleet.iter().any(|(_, c)| c == t)
    }
}

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Where a reply goes.
#[derive(Debug, Clone)]
struct ReplyTo {
    topic: String,
    /// MQTT v5 correlation data, echoed.
    correlation: Option<Bytes>,
    /// The request id (correlation data as text, or the JSON `id`).
    id: Option<String>,
}

/// Request ids seen recently (in flight or answered), and how to cancel the
/// ones in flight.
#[derive(Debug, Default)]
struct Seen {
    order: VecDeque<String>,
    set: HashSet<String>,
    running: HashMap<String, AbortHandle>,
}

impl Seen {
    /// False when `id` was already seen (a redelivery).
    fn first_time(&mut self, id: &str) -> bool {
        if !self.set.insert(id.to_string()) {
            return false;
        }
        self.order.push_back(id.to_string());
        if self.order.len() > DEDUPE_WINDOW {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

struct Shared {
    inflight: std::sync::atomic::AtomicUsize,
    app: Arc<App>,
    client: AsyncClient,
    settings: MqttSettings,
    topics: Topics,
    seen: Mutex<Seen>,
}

/// Build the client options (Last Will, persistent session, credentials, TLS).
/// `capacity` (what the schedulers can hold) becomes the Receive Maximum: the
/// broker hands us at most that many unacknowledged requests at a time and
/// keeps the rest (a request is acknowledged once its reply is queued, a busy
/// refusal included), so a burst never piles up inside the daemon.
fn options(s: &MqttSettings, topics: &Topics, capacity: usize) -> anyhow::Result<MqttOptions> {
    let mut o = MqttOptions::new(&s.client_id, &s.host, s.port);
    o.set_receive_maximum(Some(capacity.clamp(1, u16::MAX as usize) as u16));
    // Replies are small and latency-bound: no Nagle delay.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    o.set_keep_alive(s.keepalive);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(s.session_expiry_secs));
    o.set_manual_acks(true);
    o.set_max_packet_size(Some(
        (s.max_payload_bytes + 4096).min(u32::MAX as usize) as u32
    ));
    o.set_last_will(LastWill::new(
        &topics.status,
        "offline",
        qos(s.qos),
        true,
        None,
    ));
    if let Some(u) = &s.username {
        o.set_credentials(u, s.password.clone().unwrap_or_default());
    }
    if let Some(ca) = &s.ca_file {
        // rumqttc is built without a crypto provider: ring, process-wide (a
        // second install is a no-op error).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca =
            std::fs::read(ca).map_err(|e| anyhow::anyhow!("mqtt.ca_file {}: {e}", ca.display()))?;
        let client_auth = match &s.client_auth {
            Some((c, k)) => Some((
                std::fs::read(c)
                    .map_err(|e| anyhow::anyhow!("mqtt.cert_file {}: {e}", c.display()))?,
                std::fs::read(k)
                    .map_err(|e| anyhow::anyhow!("mqtt.key_file {}: {e}", k.display()))?,
            )),
            None => None,
        };
        o.set_transport(rumqttc::Transport::tls(ca, client_auth, None));
    }
    Ok(o)
}

/// What this board is, for the retained info message.
fn board() -> String {
    for p in [
        // /proc/device-tree is hidden by ProcSubset=pid in the unit.
        "/sys/firmware/devicetree/base/model",
        "/sys/devices/virtual/dmi/id/product_name",
    ] {
        if let Ok(s) = std::fs::read_to_string(p) {
            let s = s.trim_matches(char::from(0)).trim();
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    std::env::consts::ARCH.to_string()
}

fn info(app: &App, s: &MqttSettings) -> Value {
    let reg = app.registry();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "device_id": s.device_id,
        "models": reg.models.keys().collect::<Vec<_>>(),
        "board": board(),
        "arch": std::env::consts::ARCH,
        "kernels": ember_kernels::kernels().isa.name(),
        "pools": s.pools,
    })
}

/// Tokens generated so far, queue depth and active sequences, over all models.
fn totals(app: &App) -> (u64, i64, i64) {
    let reg = app.registry();
    reg.models.keys().fold((0, 0, 0), |(t, q, a), name| {
        let m = app.metrics.model(name);
        (
            t + m.tokens.get(),
            q + m.queue_depth.get(),
            a + m.active.get(),
        )
    })
}

/// Turns the tokens counter into a rate between two `stats` messages.
#[derive(Debug)]
struct Rate {
    at: std::time::Instant,
    tokens: u64,
}

impl Rate {
    fn stats(&mut self, app: &App) -> Value {
        let (tokens, queue, active) = totals(app);
        let now = std::time::Instant::now();
        let secs = now.duration_since(self.at).as_secs_f64().max(1e-3);
        // A reload resets a model's counter: never report a negative rate.
        let rate = tokens.saturating_sub(self.tokens) as f64 / secs;
        *self = Rate { at: now, tokens };
        json!({
            "tokens_per_second": (rate * 10.0).round() / 10.0,
            "generated_tokens": tokens,
            "queue_depth": queue,
            "active_sequences": active,
        })
    }
}

/// Home Assistant MQTT discovery: (config topic, retained config) for the
/// status (a connectivity binary sensor on the status topic itself) and the
/// tokens/s and queue depth sensors (read from the stats topic).
fn discovery(prefix: &str, s: &MqttSettings, t: &Topics) -> Vec<(String, Value)> {
    // Discovery node ids allow [a-zA-Z0-9_-] only.
    let node: String = format!("ember_{}", s.device_id)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let device = json!({
        "identifiers": [node],
        "name": format!("Ember {}", s.device_id),
        "manufacturer": "Ember",
        "model": board(),
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let origin = json!({"name": "emberd", "sw_version": env!("CARGO_PKG_VERSION")});
    let sensor = |key: &str, name: &str, unit: &str, icon: &str| {
        (
            format!("{prefix}/sensor/{node}/{key}/config"),
            json!({
                "name": name,
                "unique_id": format!("{node}_{key}"),
                "state_topic": t.stats,
                "value_template": format!("{{{{ value_json.{key} }}}}"),
                "unit_of_measurement": unit,
                "state_class": "measurement",
                "icon": icon,
                "availability_topic": t.status,
                "payload_available": "online",
                "payload_not_available": "offline",
                "device": device,
                "origin": origin,
            }),
        )
    };
    vec![
        (
            format!("{prefix}/binary_sensor/{node}/status/config"),
            json!({
                "name": "Status",
                "unique_id": format!("{node}_status"),
                "state_topic": t.status,
                "payload_on": "online",
                "payload_off": "offline",
                "device_class": "connectivity",
                "device": device,
                "origin": origin,
            }),
        ),
        sensor(
            "tokens_per_second",
            "Tokens per second",
            "tok/s",
            "mdi:speedometer",
        ),
        sensor("queue_depth", "Queue depth", "requests", "mdi:tray-full"),
    ]
}

/// Run the MQTT transport until `stop` fires: connect (and reconnect with
/// backoff, forever), serve requests, then publish `offline` and disconnect.
pub async fn run(
    settings: MqttSettings,
    app: Arc<App>,
    mut stop: broadcast::Receiver<()>,
) -> anyhow::Result<()> {
    let topics = Topics::new(&settings);
    let capacity: usize = app
        .registry()
        .models
        .values()
        .map(|m| m.settings.max_queue + m.settings.max_batch)
        .sum();
    let opts = options(&settings, &topics, capacity)?;
    let (client, mut eventloop): (AsyncClient, EventLoop) = AsyncClient::new(opts, 1024);
    let shared = Arc::new(Shared {
        inflight: Default::default(),
        app,
        client: client.clone(),
        settings: settings.clone(),
        topics: topics.clone(),
        seen: Mutex::new(Seen::default()),
    });
    tracing::info!(broker = %format!("{}:{}", settings.host, settings.port), device = %settings.device_id, "MQTT: connecting");
    let mut backoff = Duration::from_millis(250);
    let mut stats_tick = settings.stats_interval.map(|every| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut rate = Rate {
        at: std::time::Instant::now(),
        tokens: totals(&shared.app).0,
    };
    loop {
        let ev = tokio::select! {
            _ = stop.recv() => break,
            ev = eventloop.poll() => ev,
            _ = async { stats_tick.as_mut().expect("guarded").tick().await }, if stats_tick.is_some() => {
                // Not awaited: this task is the one that drains the client's
                // channel; a full channel skips one sample.
                let v = rate.stats(&shared.app).to_string();
                let _ = client.try_publish(&topics.stats, QoS::AtMostOnce, false, v);
                continue;
            }
        };
        match ev {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(250);
                tracing::info!("MQTT: connected");
                on_connect(&shared).await;
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => on_publish(&shared, p),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("MQTT: connection lost or refused ({e}); retrying in {backoff:?}");
                tokio::select! {
                    _ = stop.recv() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    // Drain: requests already taken finish and their replies go out; new ones
    // are left unacknowledged for the broker to redeliver (another member of
    // the pool, or this daemon's next session).
    let drain = async {
        while shared.inflight.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            tokio::select! {
                ev = eventloop.poll() => if ev.is_err() { tokio::time::sleep(Duration::from_millis(100)).await },
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    };
    if tokio::time::timeout(shared.app.settings.shutdown_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!("MQTT: requests still running at shutdown; their replies are lost");
    }
    // Clean goodbye: status offline (retained), then DISCONNECT.
    let _ = client
        .publish(&topics.status, qos(settings.qos), true, "offline")
        .await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(ev) = eventloop.poll().await {
            if let MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect) = ev {
                break;
            }
        }
    })
    .await;
    tracing::info!("MQTT: disconnected");
    Ok(())
}

async fn on_connect(sh: &Arc<Shared>) {
    let q = qos(sh.settings.qos);
    let t = &sh.topics;
    let mut subs = vec![t.generate.clone(), t.cancel.clone()];
    for (pool, (generate, cancel)) in sh.settings.pools.iter().zip(&t.fleet) {
        subs.push(format!("$share/{pool}/{generate}"));
        subs.push(cancel.clone());
    }
    for s in subs {
        if let Err(e) = sh.client.subscribe(s.clone(), q).await {
            tracing::error!("MQTT: cannot subscribe to {s}: {e}");
        }
    }
    let _ = sh.client.publish(&t.status, q, true, "online").await;
    let _ = sh
        .client
        .publish(&t.info, q, true, info(&sh.app, &sh.settings).to_string())
        .await;
    if let Some(prefix) = &sh.settings.home_assistant {
        for (topic, config) in discovery(prefix, &sh.settings, t) {
            let _ = sh.client.publish(topic, q, true, config.to_string()).await;
        }
    }
}

fn on_publish(sh: &Arc<Shared>, p: Publish) {
    let topic = String::from_utf8_lossy(&p.topic).into_owned();
    if sh.topics.is_cancel(&topic) {
        let raw = String::from_utf8_lossy(&p.payload).trim().to_string();
        let id = serde_json::from_str::<Value>(&raw)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str().map(String::from)))
            .unwrap_or(raw);
        if let Some(h) = sh
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running
            .remove(&id)
        {
            tracing::info!(id = %id, "MQTT: request cancelled");
            h.abort();
        }
        let _ = sh.client.try_ack(&p);
        return;
    }
    if !sh.topics.is_generate(&topic) {
        let _ = sh.client.try_ack(&p);
        return;
    }
    let sh2 = sh.clone();
    tokio::spawn(async move { handle_request(sh2, p).await });
}

/// The reply address: v5 Response Topic + Correlation Data, else JSON
/// `reply_to` + `id` (MQTT 3.1.1).
fn reply_address(p: &Publish, body: Option<&Value>) -> Option<ReplyTo> {
    let props = p.properties.as_ref();
    if let Some(topic) = props.and_then(|pp| pp.response_topic.clone()) {
        let correlation = props.and_then(|pp| pp.correlation_data.clone());
        let id = correlation
            .as_ref()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .or_else(|| body.and_then(|b| b.get("id")).and_then(json_id));
        return Some(ReplyTo {
            topic,
            correlation,
            id,
        });
    }
    let b = body?;
    let topic = b.get("reply_to")?.as_str()?.to_string();
    Some(ReplyTo {
        topic,
        correlation: None,
        id: b.get("id").and_then(json_id),
    })
}

fn json_id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

async fn handle_request(sh: Arc<Shared>, p: Publish) {
    sh.inflight
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    handle_request_inner(&sh, p).await;
    sh.inflight
        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
}

async fn handle_request_inner(sh: &Arc<Shared>, p: Publish) {
    let body: Option<Value> = serde_json::from_slice(&p.payload).ok();
    let reply = reply_address(&p, body.as_ref());
    // Redeliveries of a request already taken are not answered twice.
    if let Some(id) = reply.as_ref().and_then(|r| r.id.clone()) {
        if !sh
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first_time(&id)
        {
            tracing::debug!(id = %id, "MQTT: duplicate request ignored");
            let _ = sh.client.ack(&p).await;
            return;
        }
    }
    let result = generate(sh, &p, body.as_ref(), reply.as_ref()).await;
    if let Err(e) = result {
        sh.app.metrics.outcome(e.model(), e.error().outcome());
        tracing::warn!(topic = %String::from_utf8_lossy(&p.topic), "MQTT: request refused: {}", e.error().message());
        match &reply {
            Some(r) => publish(sh, r, error_json(e.error(), r), true, 0).await,
            None => tracing::warn!(
                "MQTT: no reply address (v5 Response Topic or JSON reply_to); nothing sent"
            ),
        }
    }
    if let Some(id) = reply.as_ref().and_then(|r| r.id.as_ref()) {
        sh.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running
            .remove(id);
    }
    let _ = sh.client.ack(&p).await;
}

fn error_json(e: &ApiError, r: &ReplyTo) -> Value {
    let mut v = e.body();
    v["id"] = json!(r.id);
    v["status"] = json!(e.status_code());
    v
}

async fn generate(
    sh: &Arc<Shared>,
    p: &Publish,
    body: Option<&Value>,
    reply: Option<&ReplyTo>,
) -> Result<(), Refusal> {
    if p.payload.len() > sh.settings.max_payload_bytes {
        return Err(ApiError::too_large("payload is larger than mqtt.max_payload_bytes").into());
    }
    let Some(body) = body else {
        return Err(ApiError::invalid_json("payload is not JSON").into());
    };
    let Some(reply) = reply else {
        return Err(ApiError::invalid_json(
            "no reply address: set the MQTT v5 Response Topic, or reply_to in the JSON",
        )
        .into());
    };
    if let Some(0) = p
        .properties
        .as_ref()
        .and_then(|pp| pp.message_expiry_interval)
    {
        return Err(ApiError::expired().into());
    }
    let raw = p.payload.as_ref();
    let prepared = if body.get("messages").is_some() {
        prepare_chat(&sh.app, raw)?
    } else {
        prepare_completion(&sh.app, raw)?
    };
    let stream = prepared.stream;
    let origin = format!("mqtt {}", String::from_utf8_lossy(&p.topic));
    let expiry = p
        .properties
        .as_ref()
        .and_then(|pp| pp.message_expiry_interval)
        .map(|s| Duration::from_secs(s as u64));
    let run = submit(&sh.app, prepared, &origin, expiry)?;
    let model = run.model().to_string();
    // The relay runs as its own task so a cancel message can abort it (which
    // drops the event receiver: the scheduler frees the slot).
    let (sh2, r2) = (sh.clone(), reply.clone());
    let task = tokio::spawn(async move { relay(sh2, run, r2, stream).await });
    if let Some(id) = &reply.id {
        sh.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running
            .insert(id.clone(), task.abort_handle());
    }
    match task.await {
        Ok(r) => r.map_err(|e| Refusal::new(e, model)),
        Err(_) => {
            sh.app.metrics.outcome(&model, "cancelled");
            Ok(())
        }
    }
}

/// Relay a running request's events as MQTT messages.
async fn relay(
    sh: Arc<Shared>,
    mut run: Running,
    reply: ReplyTo,
    stream: bool,
) -> Result<(), ApiError> {
    let mut text = String::new();
    let mut seq = 0u64;
    while let Some(ev) = run.next_event().await {
        match ev {
            Event::Token(t) => {
                if stream && !t.text.is_empty() {
                    let chunk = json!({"id": reply.id, "model": run.model(), "text": t.text});
                    publish(&sh, &reply, chunk, false, seq).await;
                    seq += 1;
                }
                text.push_str(&t.text);
            }
            Event::Done(d) => {
                let v = json!({
                    "id": reply.id,
                    "device_id": sh.settings.device_id,
                    "model": run.model(),
                    "text": if stream { String::new() } else { text },
                    "finish_reason": d.finish_reason.as_str(),
                    "usage": {
                        "prompt_tokens": d.usage.prompt_tokens,
                        "completion_tokens": d.usage.completion_tokens,
                        "total_tokens": d.usage.total_tokens,
                    },
                    "timings": d.timings,
                });
                publish(&sh, &reply, v, true, seq).await;
                return Ok(());
            }
            Event::Failed(e) => return Err(e.into()),
        }
    }
    Err(ApiError::shutting_down())
}

async fn publish(sh: &Shared, r: &ReplyTo, v: Value, last: bool, seq: u64) {
    let props = PublishProperties {
        correlation_data: r.correlation.clone(),
        content_type: Some("application/json".into()),
        user_properties: vec![
            ("seq".into(), seq.to_string()),
            ("last".into(), last.to_string()),
        ],
        ..Default::default()
    };
    if let Err(e) = sh
        .client
        .publish_with_properties(&r.topic, qos(sh.settings.qos), false, v.to_string(), props)
        .await
    {
        tracing::warn!(topic = %r.topic, "MQTT: cannot queue a reply: {e}");
    }
}
