//! The MQTT transport end to end: Debian's mosquitto broker on a free
//! loopback port, the real `mosquitto_pub`/`mosquitto_sub` clients, and a
//! rumqttc client for what the command-line clients cannot check (streaming
//! properties, persistent sessions across a broker restart).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ember_tests::mqtt::{Msg, TestClient};
use ember_tests::{Daemon, Mosquitto};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};

/// Two models: kjv-gpt2 on the native engine, kjv-lstm on tract, where it
/// decodes slowly (700–2100 tokens/s in a debug build, by CPU) so that a long
/// request reliably holds its slot while a test queues, cancels or expires
/// others behind it.
fn config(broker: &str, device: &str, extra: &str) -> String {
    format!(
        r#"
[server]
socket = "SOCKET"
[models.kjv-gpt2]
path = "MODELS/kjv-gpt2"
max_batch = 8
max_queue = 64
[models.kjv-lstm]
path = "MODELS/kjv-lstm"
backend = "tract"
max_batch = 8
max_queue = 64
[mqtt]
broker = "{broker}"
device_id = "{device}"
max_payload_bytes = 4096
{extra}
"#
    )
}

/// Greedy text of a request through the Unix socket (the reference).
fn socket_text(d: &Daemon, model: &str, prompt: &str, n: usize) -> String {
    let r = d.post(
        "/v1/completions",
        &json!({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
}

/// Run `mosquitto_sub` until it has `count` messages (or `secs` pass).
fn sub(port: u16, version: &str, topic: &str, count: usize, secs: u64) -> std::process::Child {
    std::process::Command::new("mosquitto_sub")
        .args([
            "-V",
            version,
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
        ])
        .args([
            "-t",
            topic,
            "-C",
            &count.to_string(),
            "-W",
            &secs.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt install mosquitto-clients)")
}

/// Wait until `device` has announced itself (retained `online`, published
/// after its subscriptions, so requests sent from now on reach it).
fn wait_online(port: u16, device: &str) {
    wait_online_with(port, &[], device);
}

fn publish(port: u16, args: &[&str]) {
    let st = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(args)
        .status()
        .expect("mosquitto_pub (apt install mosquitto-clients)");
    assert!(st.success());
}

fn sub_output(c: std::process::Child) -> Vec<String> {
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn mosquitto_clients_v5_and_v311_get_the_same_text_as_the_socket() {
    let broker = Mosquitto::start();
    let d = Daemon::start(&config(&broker.addr(), "dev1", ""));
    wait_online(broker.port, "dev1");
    let want = socket_text(&d, "kjv-gpt2", "And God said", 16);
    let req =
        json!({"model": "kjv-gpt2", "prompt": "And God said", "max_tokens": 16, "temperature": 0});

    // MQTT v5: Response Topic and Correlation Data as properties.
    let s = sub(broker.port, "mqttv5", "replies/v5", 1, 30);
    std::thread::sleep(Duration::from_millis(300));
    publish(
        broker.port,
        &[
            "-V",
            "mqttv5",
            "-t",
            "ember/dev1/generate",
            "-D",
            "publish",
            "response-topic",
            "replies/v5",
            "-D",
            "publish",
            "correlation-data",
            "req-1",
            "-m",
            &req.to_string(),
        ],
    );
    let lines = sub_output(s);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["text"], want.as_str());
    assert_eq!(v["id"], "req-1");
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 16);

    // MQTT 3.1.1: reply_to and id in the JSON.
    let s = sub(broker.port, "mqttv311", "replies/v311", 1, 30);
    std::thread::sleep(Duration::from_millis(300));
    let mut req311 = req.clone();
    req311["reply_to"] = json!("replies/v311");
    req311["id"] = json!("req-2");
    publish(
        broker.port,
        &[
            "-V",
            "mqttv311",
            "-t",
            "ember/dev1/generate",
            "-m",
            &req311.to_string(),
        ],
    );
    let lines = sub_output(s);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["text"], want.as_str());
    assert_eq!(v["id"], "req-2");

    // Retained status and info.
    let s = sub(broker.port, "mqttv5", "ember/dev1/+", 2, 10);
    let lines = sub_output(s);
    assert!(lines.contains(&"online".to_string()), "{lines:?}");
    let info = lines
        .iter()
        .find(|l| l.starts_with('{'))
        .expect("info message");
    let info: Value = serde_json::from_str(info).unwrap();
    assert_eq!(info["models"], json!(["kjv-gpt2", "kjv-lstm"]));
    assert!(info["kernels"].is_string());
    // Home Assistant discovery is off unless asked for.
    assert!(sub_output(sub(broker.port, "mqttv5", "homeassistant/#", 1, 1)).is_empty());
}

#[test]
fn streaming_reassembles_to_the_plain_text_and_offline_is_retained_at_exit() {
    let broker = Mosquitto::start();
    let mut d = Daemon::start(&config(&broker.addr(), "dev2", ""));
    wait_online(broker.port, "dev2");
    let c = TestClient::connect(broker.port, "tester-stream", false);
    c.subscribe("replies/stream");
    for (model, chat) in [("kjv-gpt2", false), ("kjv-lstm", false), ("kjv-gpt2", true)] {
        let mut req = json!({"model": model, "max_tokens": 30, "temperature": 0, "stream": true});
        if chat {
            req["messages"] = json!([{"role": "user", "content": "Who made the light?"}]);
        } else {
            req["prompt"] = json!("In the beginning");
        }
        let mut plain = req.clone();
        plain["stream"] = json!(false);
        let id = format!("s-{model}-{chat}");
        c.request(
            "ember/dev2/generate",
            &plain,
            "replies/stream",
            &format!("{id}-plain"),
        );
        let whole = c.recv(30).expect("plain reply");
        let want = whole.json()["text"].as_str().unwrap().to_string();
        c.request("ember/dev2/generate", &req, "replies/stream", &id);
        let mut text = String::new();
        let mut expect_seq = 0u64;
        loop {
            let m = c.recv(30).expect("stream chunk");
            assert_eq!(m.topic, "replies/stream");
            let corr = m
                .props
                .as_ref()
                .and_then(|p| p.correlation_data.clone())
                .unwrap();
            assert_eq!(corr.as_ref(), id.as_bytes(), "correlation data echoed");
            assert_eq!(
                m.user("seq"),
                Some(expect_seq.to_string()),
                "chunks in order"
            );
            expect_seq += 1;
            let v = m.json();
            if m.user("last").as_deref() == Some("true") {
                assert_eq!(v["finish_reason"], "length");
                assert_eq!(v["usage"]["completion_tokens"], 30);
                break;
            }
            text.push_str(v["text"].as_str().unwrap());
        }
        assert_eq!(text, want, "{model} chat={chat}");
    }
    // SIGTERM: the daemon says goodbye with a retained "offline".
    d.signal("TERM");
    assert!(d.wait_exit(30).success());
    let s = sub(broker.port, "mqttv5", "ember/dev2/status", 1, 10);
    assert_eq!(sub_output(s), ["offline"]);
}

#[test]
fn bad_payloads_get_error_replies_duplicates_one_answer_and_cancel_works() {
    let broker = Mosquitto::start();
    let d = Daemon::start(&config(&broker.addr(), "dev3", ""));
    wait_online(broker.port, "dev3");
    let c = TestClient::connect(broker.port, "tester-bad", false);
    c.subscribe("replies/bad");
    let raw = |payload: &str, id: &str| {
        let props = PublishProperties {
            response_topic: Some("replies/bad".into()),
            correlation_data: Some(id.to_string().into_bytes().into()),
            ..Default::default()
        };
        c.client
            .publish_with_properties(
                "ember/dev3/generate",
                QoS::AtLeastOnce,
                false,
                payload.to_string(),
                props,
            )
            .unwrap();
    };
    let cases = [
        ("not json at all", "b1", "invalid_json"),
        (
            r#"{"model": "nope", "prompt": "x"}"#,
            "b2",
            "model_not_found",
        ),
        (
            r#"{"prompt": "x", "temperature": -3}"#,
            "b3",
            "invalid_value",
        ),
        (
            &*format!(r#"{{"prompt": "{}"}}"#, "a".repeat(5000)),
            "b4",
            "body_too_large",
        ),
    ];
    for (payload, id, code) in cases {
        raw(payload, id);
        let m = c.recv(20).unwrap_or_else(|| panic!("no reply to {id}"));
        let v = m.json();
        assert_eq!(v["error"]["code"], code, "{id}: {v}");
        assert_eq!(v["id"], id);
        assert_eq!(m.user("last").as_deref(), Some("true"));
    }
    // No reply address: nothing to answer, the daemon logs it and goes on.
    publish(
        broker.port,
        &[
            "-V",
            "mqttv311",
            "-t",
            "ember/dev3/generate",
            "-m",
            r#"{"prompt": "x"}"#,
        ],
    );
    // The same request id twice (a QoS 1 redelivery): one answer.
    let req = json!({"model": "kjv-gpt2", "prompt": "And", "max_tokens": 4});
    c.request("ember/dev3/generate", &req, "replies/bad", "dup");
    c.request("ember/dev3/generate", &req, "replies/bad", "dup");
    let first = c.recv(20).expect("one answer");
    assert_eq!(first.json()["id"], "dup");
    assert!(c.recv(2).is_none(), "a duplicate was answered twice");
    // Cancel: a long request stops and frees its slot.
    let long = json!({"model": "kjv-lstm", "prompt": "And", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    c.request("ember/dev3/generate", &long, "replies/bad", "long-1");
    let chunk = c.recv(20).expect("streaming started");
    assert_eq!(chunk.user("seq").as_deref(), Some("0"));
    publish(
        broker.port,
        &["-V", "mqttv5", "-t", "ember/dev3/cancel", "-m", "long-1"],
    );
    d.wait_health("kjv-lstm", "cancel to free the slot", 10, |m| {
        m["active"] == 0
    });
    while c.recv(1).is_some() {} // chunks already in flight
                                 // Still serving.
    c.request("ember/dev3/generate", &req, "replies/bad", "after");
    assert_eq!(c.recv(20).expect("served").json()["id"], "after");
    assert!(d.log().contains("no reply address"), "{}", d.log());
}

#[test]
fn a_broker_restart_loses_no_qos1_request_and_answers_each_once() {
    let mut broker = Mosquitto::start();
    let d = Daemon::start(&config(&broker.addr(), "dev4", "session_expiry_secs = 600"));
    wait_online(broker.port, "dev4");
    let c = TestClient::connect(broker.port, "tester-restart", true);
    c.subscribe("replies/restart");
    let n = 24;
    for i in 0..n {
        let req =
            json!({"model": "kjv-lstm", "prompt": "And", "max_tokens": 60, "ignore_eos": true});
        c.request(
            "ember/dev4/generate",
            &req,
            "replies/restart",
            &format!("r{i}"),
        );
    }
    // Per id: (deliveries, first deliveries). QoS 1 allows the broker to
    // redeliver a reply whose ack the restart lost (flagged DUP); the daemon
    // must have published each reply once.
    let mut got: HashMap<String, (usize, usize)> = HashMap::new();
    // Some answers, then the broker goes away and comes back.
    let mut seen = 0;
    while seen < 3 {
        note(&mut got, c.recv(30).expect("first answers"));
        seen += 1;
    }
    broker.restart();
    let t0 = Instant::now();
    loop {
        let done = (0..n).filter(|i| got_has(&got, *i)).count();
        if done == n {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "answers so far: {got:?}\n{}",
            d.log()
        );
        if let Some(m) = c.recv(5) {
            note(&mut got, m);
        }
    }
    while let Some(m) = c.recv(3) {
        note(&mut got, m);
    }
    for i in 0..n {
        let (all, first) = got[&format!("r{i}")];
        assert!(
            all >= 1 && first <= 1,
            "r{i}: {all} deliveries, {first} not flagged DUP"
        );
    }
    // The daemon generated each request exactly once.
    let m = d.get("/metrics").body;
    assert!(
        m.contains(&format!(
            "ember_requests_total{{model=\"kjv-lstm\",outcome=\"ok\"}} {n}"
        )),
        "{m}"
    );
    assert_eq!(d.get("/health").status, 200);
}

fn note(got: &mut HashMap<String, (usize, usize)>, m: Msg) {
    let e = got
        .entry(m.json()["id"].as_str().unwrap().to_string())
        .or_default();
    e.0 += 1;
    e.1 += usize::from(!m.dup);
}

fn got_has(got: &HashMap<String, (usize, usize)>, i: usize) -> bool {
    got.contains_key(&format!("r{i}"))
}

#[test]
fn two_daemons_on_one_shared_subscription_split_the_requests() {
    let broker = Mosquitto::start();
    // Queues large enough for the whole burst: this test is about the split.
    let cfg = |dev: &str| {
        config(&broker.addr(), dev, r#"pools = ["kitchen"]"#)
            .replace("max_queue = 64", "max_queue = 256")
    };
    let a = Daemon::start(&cfg("fleet-a"));
    let b = Daemon::start(&cfg("fleet-b"));
    wait_online(broker.port, "fleet-a");
    wait_online(broker.port, "fleet-b");
    let c = TestClient::connect(broker.port, "tester-fleet", false);
    c.subscribe("replies/fleet");
    std::thread::sleep(Duration::from_millis(300));
    let n = 200;
    for i in 0..n {
        let req = json!({"model": "kjv-gpt2", "prompt": "And", "max_tokens": 3});
        c.request(
            "ember/fleet/kitchen/generate",
            &req,
            "replies/fleet",
            &format!("f{i}"),
        );
    }
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut by_device: HashMap<String, usize> = HashMap::new();
    let t0 = Instant::now();
    while by_id.len() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{} of {n} answered",
            by_id.len()
        );
        if let Some(m) = c.recv(5) {
            let v = m.json();
            assert!(v.get("error").is_none(), "{v}");
            *by_id
                .entry(v["id"].as_str().unwrap().to_string())
                .or_default() += 1;
            *by_device
                .entry(v["device_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert!(c.recv(2).is_none(), "an extra answer");
    assert!(by_id.values().all(|&k| k == 1));
    let (na, nb) = (
        by_device.get("fleet-a").copied().unwrap_or(0),
        by_device.get("fleet-b").copied().unwrap_or(0),
    );
    assert_eq!(na + nb, n);
    assert!(na > 0 && nb > 0, "both daemons took a share: {by_device:?}");
    drop((a, b));
}

#[test]
fn an_embedded_rumqttd_broker_serves_too() {
    // rumqttd in this process, MQTT v5 listener on a free loopback port.
    let port = ember_tests::free_port();
    let cfg: rumqttd::Config = toml::from_str(&format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 10485760
max_segment_count = 10
[v5.1]
name = "v5-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v5.1.connections]
connection_timeout_ms = 60000
max_payload_size = 65536
max_inflight_count = 100
dynamic_filters = true
"#
    ))
    .expect("rumqttd config");
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(cfg);
        let _ = broker.start();
    });
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "rumqttd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&config(&addr, "embedded", ""));
    let want = socket_text(&d, "kjv-lstm", "And God said", 12);
    let c = TestClient::connect(port, "tester-embedded", false);
    c.subscribe("replies/embedded");
    let req =
        json!({"model": "kjv-lstm", "prompt": "And God said", "max_tokens": 12, "temperature": 0});
    // The daemon subscribes right after connecting: retry until it answers.
    let mut reply = None;
    for attempt in 0..50 {
        c.request(
            "ember/embedded/generate",
            &req,
            "replies/embedded",
            &format!("e{attempt}"),
        );
        if let Some(m) = c.recv(1) {
            reply = Some(m);
            break;
        }
    }
    let v = reply.expect("a reply through rumqttd").json();
    assert_eq!(v["text"], want.as_str());
}

#[test]
fn a_thousand_requests_from_ten_clients_none_lost_none_duplicated() {
    let broker = Mosquitto::start();
    let d = Daemon::start(&config(&broker.addr(), "dev5", ""));
    wait_online(broker.port, "dev5");
    let per = 100;
    let results: Vec<(usize, usize)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..10)
            .map(|k| {
                let port = broker.port;
                s.spawn(move || {
                    let c = TestClient::connect(port, &format!("load-{k}"), false);
                    let topic = format!("replies/load/{k}");
                    c.subscribe(&topic);
                    for i in 0..per {
                        let req = json!({"model": "kjv-gpt2", "prompt": "And", "max_tokens": 2});
                        c.request("ember/dev5/generate", &req, &topic, &format!("c{k}-{i}"));
                    }
                    let mut ids = std::collections::HashSet::new();
                    let (mut ok, mut busy) = (0, 0);
                    while ids.len() < per {
                        let m = c.recv(60).unwrap_or_else(|| {
                            panic!("client {k}: {} of {per} answered", ids.len())
                        });
                        let v = m.json();
                        assert!(
                            ids.insert(v["id"].as_str().unwrap().to_string()),
                            "duplicate answer {v}"
                        );
                        match v["error"]["code"].as_str() {
                            None => ok += 1,
                            Some("model_busy") => busy += 1,
                            Some(other) => panic!("unexpected error {other}: {v}"),
                        }
                    }
                    assert!(c.recv(1).is_none(), "client {k}: an extra answer");
                    (ok, busy)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: usize = results.iter().map(|r| r.0).sum();
    let busy: usize = results.iter().map(|r| r.1).sum();
    assert_eq!(ok + busy, 10 * per);
    // Queue-full refusals are counted, not silent.
    let m = d.get("/metrics").body;
    assert!(
        m.contains(&format!(
            "ember_requests_total{{model=\"kjv-gpt2\",outcome=\"ok\"}} {ok}"
        )),
        "{m}"
    );
    if busy > 0 {
        assert!(
            m.contains(&format!(
                "ember_requests_total{{model=\"kjv-gpt2\",outcome=\"busy\"}} {busy}"
            )),
            "{m}"
        );
    }
    eprintln!("1000 requests: {ok} answered, {busy} refused as busy");
}

#[test]
fn a_request_that_expires_in_the_queue_is_dropped_and_a_crash_leaves_the_will() {
    let broker = Mosquitto::start();
    let cfg = config(&broker.addr(), "dev6", "")
        .replace("max_batch = 8", "max_batch = 1")
        .replace(
            "backend = \"tract\"",
            "backend = \"tract\"\nmax_tokens_limit = 1000000",
        );
    let d = Daemon::start(&cfg);
    wait_online(broker.port, "dev6");
    let c = TestClient::connect(broker.port, "tester-expiry", false);
    c.subscribe("replies/expiry");
    // One long request holds the only slot (open-ended, and cancelled below:
    // a fixed length finished before the expiry on a fast CPU)...
    let long =
        json!({"model": "kjv-lstm", "prompt": "And", "max_tokens": 1_000_000, "ignore_eos": true});
    c.request("ember/dev6/generate", &long, "replies/expiry", "long");
    d.wait_health("kjv-lstm", "the long request running", 10, |m| {
        m["active"] == 1
    });
    // ...so this one, valid for 1 s, waits past its expiry and is dropped.
    let props = PublishProperties {
        response_topic: Some("replies/expiry".into()),
        correlation_data: Some(b"short".to_vec().into()),
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    let short = json!({"model": "kjv-lstm", "prompt": "And", "max_tokens": 5});
    c.client
        .publish_with_properties(
            "ember/dev6/generate",
            QoS::AtLeastOnce,
            false,
            short.to_string(),
            props,
        )
        .unwrap();
    // Past the short one's expiry with the long one still running, the long
    // one is cancelled: the short one then reaches a worker, expired.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.get("/health").json()["models"]["kjv-lstm"]["active"], 1);
    publish(
        broker.port,
        &["-V", "mqttv5", "-t", "ember/dev6/cancel", "-m", "long"],
    );
    let reply = c.recv(60).expect("the short request's reply").json();
    assert_eq!(reply["id"], "short", "{reply:?}");
    assert_eq!(reply["error"]["code"], "expired", "{reply:?}");
    d.wait_health("kjv-lstm", "cancel to free the slot", 10, |m| {
        m["active"] == 0
    });

    // A crash (SIGKILL): the broker publishes the Last Will, retained.
    d.signal("KILL");
    let t0 = Instant::now();
    loop {
        let out = sub_output(sub(broker.port, "mqttv5", "ember/dev6/status", 1, 2));
        if out == ["offline"] {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no Last Will: {out:?}"
        );
    }
}

#[test]
fn home_assistant_discovery_announces_status_and_tokens_per_second() {
    let broker = Mosquitto::start();
    let d = Daemon::start(&config(
        &broker.addr(),
        "ha.1",
        "home_assistant = true\nstats_interval_secs = 1\n",
    ));
    wait_online(broker.port, "ha.1");
    // Retained discovery configs, one per entity, under the default prefix.
    let lines = sub_output(sub(broker.port, "mqttv5", "homeassistant/#", 3, 10));
    assert_eq!(lines.len(), 3, "{lines:?}");
    let configs: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_id = |id: &str| {
        configs
            .iter()
            .find(|c| c["unique_id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {configs:?}"))
    };
    let status = by_id("ember_ha_1_status");
    assert_eq!(status["state_topic"], "ember/ha.1/status");
    assert_eq!(status["device_class"], "connectivity");
    assert_eq!(
        (&status["payload_on"], &status["payload_off"]),
        (&json!("online"), &json!("offline"))
    );
    let tps = by_id("ember_ha_1_tokens_per_second");
    assert_eq!(tps["state_topic"], "ember/ha.1/stats");
    assert_eq!(tps["value_template"], "{{ value_json.tokens_per_second }}");
    assert_eq!(tps["availability_topic"], "ember/ha.1/status");
    assert_eq!(tps["device"]["identifiers"], json!(["ember_ha_1"]));
    by_id("ember_ha_1_queue_depth");

    // Stats every second; generating shows up as a positive rate.
    let c = TestClient::connect(broker.port, "tester-ha", false);
    c.subscribe("ember/ha.1/stats");
    socket_text(&d, "kjv-gpt2", "And God said", 100);
    let t0 = Instant::now();
    let mut seen = Vec::new();
    loop {
        let m = c.recv(5).expect("a stats message every second");
        let v = m.json();
        seen.push(v.clone());
        // A tick may fall in the middle of the request: wait for its total.
        if v["tokens_per_second"].as_f64().unwrap() > 0.0
            && v["generated_tokens"].as_u64().unwrap() >= 100
        {
            assert!(v["queue_depth"].is_i64() && v["active_sequences"].is_i64());
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no positive rate in {seen:?}"
        );
    }
}

/// A throw-away CA, a server certificate for 127.0.0.1 and a client
/// certificate, made with the openssl command.
fn make_certs(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (apt install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    openssl(
        &[
            &[
                "req",
                "-x509",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=ember test CA",
            ],
            &ec[..],
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            &[
                &["req", "-nodes", "-subj", &format!("/CN=ember-{name}")],
                &ec[..],
                &["-keyout", &format!("{name}.key")],
                &["-out", &format!("{name}.csr")],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }
    // The broker drops root for its own user: let it read them.
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `mosquitto_rr` (request, wait for the reply) with extra connection flags.
fn request_reply(port: u16, conn: &[&str], topic: &str, req: &Value) -> Value {
    let out = std::process::Command::new("mosquitto_rr")
        .args(["-V", "mqttv5", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(conn)
        .args(["-q", "1", "-t", topic, "-e", "replies/rr", "-W", "30"])
        .args(["-m", &req.to_string()])
        .output()
        .expect("mosquitto_rr (apt install mosquitto-clients)");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text:?} {}", String::from_utf8_lossy(&out.stderr)))
}

/// [`wait_online`] as seen by a client with `conn` flags (TLS, credentials).
fn wait_online_with(port: u16, conn: &[&str], device: &str) {
    let t0 = Instant::now();
    loop {
        let out = std::process::Command::new("mosquitto_sub")
            .args(["-V", "mqttv5", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(conn)
            .args([
                "-t",
                &format!("ember/{device}/status"),
                "-C",
                "1",
                "-W",
                "2",
            ])
            .output()
            .expect("mosquitto_sub (apt install mosquitto-clients)");
        let got = String::from_utf8_lossy(&out.stdout);
        if got.trim() == "online" {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{device} never came online: {got:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn tls_with_password_file_and_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let c = certs.path();
    make_certs(c);
    let passwd = c.join("passwd");
    let st = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["ember", "s3cret-pw"])
        .status()
        .expect("mosquitto_passwd");
    assert!(st.success());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(c.join("good.pw"), "s3cret-pw\n").unwrap();
    std::fs::write(c.join("bad.pw"), "wrong-pw-123\n").unwrap();
    let tls = format!(
        "cafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\n",
        c.display()
    );

    // TLS + user name and password (from a file).
    let broker = Mosquitto::start_with(&format!(
        "{tls}allow_anonymous false\npassword_file {}\n",
        passwd.display()
    ));
    let ca = c.join("ca.pem").display().to_string();
    let user = ["--cafile", &ca, "-u", "ember", "-P", "s3cret-pw"];
    let cfg = |device: &str, pw: &str| {
        config(
            &broker.addr(),
            device,
            &format!(
                "ca_file = \"{ca}\"\nusername = \"ember\"\npassword_file = \"{}\"\n",
                c.join(pw).display()
            ),
        )
    };
    let d = Daemon::start(&cfg("tls1", "good.pw"));
    wait_online_with(broker.port, &user, "tls1");
    let want = socket_text(&d, "kjv-gpt2", "And God said", 12);
    let req =
        json!({"model": "kjv-gpt2", "prompt": "And God said", "max_tokens": 12, "temperature": 0});
    let v = request_reply(broker.port, &user, "ember/tls1/generate", &req);
    assert_eq!(v["text"], want.as_str());

    // A wrong password: refused, retried, logged without the password; the
    // socket keeps serving.
    let bad = Daemon::start(&cfg("tls2", "bad.pw"));
    let t0 = Instant::now();
    while !bad.log().contains("MQTT: connection lost or refused") {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no refusal logged: {}",
            bad.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!socket_text(&bad, "kjv-lstm", "And God said", 4).is_empty());
    for log in [d.log(), bad.log()] {
        assert!(!log.contains("s3cret-pw") && !log.contains("wrong-pw-123"));
    }

    // Mutual TLS: the client certificate is the identity.
    let broker2 = Mosquitto::start_with(&format!(
        "{tls}require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n"
    ));
    let cert = c.join("client.pem").display().to_string();
    let key = c.join("client.key").display().to_string();
    let d2 = Daemon::start(&config(
        &broker2.addr(),
        "mtls",
        &format!("ca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n"),
    ));
    let mutual = ["--cafile", &ca, "--cert", &cert, "--key", &key];
    wait_online_with(broker2.port, &mutual, "mtls");
    let v = request_reply(broker2.port, &mutual, "ember/mtls/generate", &req);
    assert_eq!(v["text"], want.as_str());
    // Without a certificate the broker turns a client away.
    let out = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker2.port.to_string()])
        .args([
            "--cafile",
            &ca,
            "-t",
            "ember/mtls/status",
            "-C",
            "1",
            "-W",
            "3",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success() && out.stdout.is_empty());
    drop(d2);
}
