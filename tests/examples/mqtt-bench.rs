//! MQTT transport benchmark (reported, not asserted): the latency MQTT adds
//! over the Unix socket for the same one-token request, and requests/s
//! through one broker.
//!
//! ```sh
//! cargo build --release -p emberd
//! cargo run --release -p ember-tests --example mqtt-bench
//! ```
//!
//! Needs Debian's mosquitto (started on a free loopback port).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ember_tests::mqtt::TestClient;
use ember_tests::{Daemon, Mosquitto};
use serde_json::json;

/// One HTTP/1.1 POST over the Unix socket (no client process in the way).
fn post(sock: &Path, path: &str, body: &str) -> String {
    let mut s = UnixStream::connect(sock).expect("connect");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

fn main() {
    let broker = Mosquitto::start();
    let d = Daemon::start(&format!(
        r#"
[server]
socket = "SOCKET"
[models.kjv-gpt2]
path = "MODELS/kjv-gpt2"
max_batch = 16
max_queue = 4096
[mqtt]
broker = "{}"
device_id = "bench"
"#,
        broker.addr()
    ));
    let c = TestClient::connect(broker.port, "bench-latency", false);
    c.subscribe("replies/bench");
    // Wait until the daemon answers over MQTT.
    let req = json!({"model": "kjv-gpt2", "prompt": "And", "max_tokens": 1, "temperature": 0});
    let mut warm = 0;
    loop {
        c.request(
            "ember/bench/generate",
            &req,
            "replies/bench",
            &format!("warm{warm}"),
        );
        if c.recv(1).is_some() {
            break;
        }
        warm += 1;
        assert!(warm < 30, "the daemon never answered over MQTT");
    }
    while c.recv(1).is_some() {}

    let n = 200;
    let body = req.to_string();
    let mut socket_lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        post(&d.socket, "/v1/completions", &body);
        socket_lat.push(t.elapsed());
    }
    let mut mqtt_lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        c.request(
            "ember/bench/generate",
            &req,
            "replies/bench",
            &format!("lat{i}"),
        );
        c.recv(10).expect("reply");
        mqtt_lat.push(t.elapsed());
    }

    // Throughput: 10 clients, 200 one-token requests each, all published at once.
    let (clients, per) = (10, 200);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for k in 0..clients {
            let port = broker.port;
            let req = req.clone();
            s.spawn(move || {
                let c = TestClient::connect(port, &format!("bench-load-{k}"), false);
                let topic = format!("replies/bench/{k}");
                c.subscribe(&topic);
                for i in 0..per {
                    c.request("ember/bench/generate", &req, &topic, &format!("t{k}-{i}"));
                }
                for _ in 0..per {
                    let v = c.recv(60).expect("reply").json();
                    assert!(v.get("error").is_none(), "{v}");
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();

    let (s50, s99) = (pct(&mut socket_lat, 0.5), pct(&mut socket_lat, 0.99));
    let (m50, m99) = (pct(&mut mqtt_lat, 0.5), pct(&mut mqtt_lat, 0.99));
    println!("one-token greedy request on kjv-gpt2, {n} sequential requests each way:");
    println!();
    println!("| transport | p50 | p99 |");
    println!("|---|---|---|");
    println!("| Unix socket (HTTP/1.1) | {s50:.2} ms | {s99:.2} ms |");
    println!("| MQTT v5 via mosquitto (QoS 1, loopback) | {m50:.2} ms | {m99:.2} ms |");
    println!(
        "| added by MQTT | {:.2} ms | {:.2} ms |",
        m50 - s50,
        m99 - s99
    );
    println!();
    println!(
        "throughput: {} one-token requests from {clients} clients through one broker in {wall:.2} s = {:.0} requests/s",
        clients * per,
        (clients * per) as f64 / wall
    );
}
