//! `emberd serve` end to end: a real daemon process on a temporary Unix
//! socket, real `curl --unix-socket` requests.

use std::time::{Duration, Instant};

use ember_tests::{curl, emberd, Daemon};
use serde_json::json;

/// Both demo models, small limits so the tests can fill them. kjv-lstm runs
/// on tract, where it decodes slowly (about 700 tokens/s in a debug build),
/// so a long request reliably holds its slot while a test queues, cancels,
/// drains or reloads around it; kjv-gpt2 runs on the native engine.
fn config(max_batch: usize, max_queue: usize, timeout: f64) -> String {
    format!(
        r#"
[server]
socket = "SOCKET"
max_body_bytes = 65536
shutdown_timeout_secs = 20

[models.kjv-gpt2]
path = "MODELS/kjv-gpt2"
max_batch = {max_batch}
max_queue = {max_queue}
request_timeout_secs = {timeout}

[models.kjv-lstm]
path = "MODELS/kjv-lstm"
backend = "tract"
max_batch = {max_batch}
max_queue = {max_queue}
request_timeout_secs = {timeout}
"#
    )
}

fn greedy(model: &str, prompt: &str, max_tokens: usize, stream: bool) -> String {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
           "temperature": 0, "stream": stream})
    .to_string()
}

#[test]
fn completions_plain_and_streamed_agree_and_report_usage() {
    let d = Daemon::start(&config(8, 8, 60.0));
    for model in ["kjv-gpt2", "kjv-lstm"] {
        let plain = d.post("/v1/completions", &greedy(model, "And God said", 24, false));
        assert_eq!(plain.status, 200, "{}", plain.body);
        let v = plain.json();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], model);
        let text = v["choices"][0]["text"].as_str().unwrap().to_string();
        assert!(!text.is_empty());
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 24);
        assert_eq!(
            v["usage"]["prompt_tokens"],
            v["usage"]["total_tokens"].as_u64().unwrap() - 24
        );

        let streamed = curl(
            &d.socket,
            "POST",
            "/v1/completions",
            Some(&greedy(model, "And God said", 24, true)),
            &["-N"],
        );
        assert_eq!(streamed.status, 200);
        assert!(
            streamed
                .headers
                .to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{}",
            streamed.headers
        );
        let (s_text, finish, done) = streamed.sse_text();
        assert_eq!(s_text, text, "stream reassembles to the plain text");
        assert_eq!(finish.as_deref(), Some("length"));
        assert!(done, "stream ends with [DONE]");
    }
}

#[test]
fn chat_completions_use_the_template_and_stream_the_same_text() {
    let d = Daemon::start(&config(8, 8, 60.0));
    let body = |stream: bool| {
        json!({"model": "kjv-gpt2", "messages": [
            {"role": "system", "content": "Answer in the words of the King James Bible."},
            {"role": "user", "content": "Who made the light?"}],
            "max_tokens": 16, "temperature": 0, "stream": stream})
        .to_string()
    };
    let plain = d.post("/v1/chat/completions", &body(false));
    assert_eq!(plain.status, 200, "{}", plain.body);
    let v = plain.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // The default template's prompt: system text, "User: ...", "Assistant:".
    let tokenized = d.post("/v1/tokenize", &json!({"model": "kjv-gpt2",
        "prompt": "Answer in the words of the King James Bible.\n\nUser: Who made the light?\nAssistant:"}).to_string());
    assert_eq!(v["usage"]["prompt_tokens"], tokenized.json()["count"]);
    let streamed = curl(
        &d.socket,
        "POST",
        "/v1/chat/completions",
        Some(&body(true)),
        &["-N"],
    );
    let (s_text, _, done) = streamed.sse_text();
    assert_eq!(s_text, text);
    assert!(done);
}

/// Also covers chunked prefill: one prompt is ~170 tokens, read over three
/// steps in pieces of at most 64 while the others decode.
#[test]
fn eight_concurrent_streams_equal_their_single_runs() {
    let d = Daemon::start(&config(8, 16, 60.0));
    let long = "In the beginning God created the heaven and the earth. ".repeat(14);
    let prompts = [
        "In the beginning",
        "And God said",
        "The LORD is my shepherd",
        "起初神创造天地",
        "Blessed are the meek",
        long.as_str(),
        "Thou shalt not",
        "Let there be light",
    ];
    for model in ["kjv-gpt2", "kjv-lstm"] {
        let alone: Vec<String> = prompts
            .iter()
            .map(|p| {
                d.post("/v1/completions", &greedy(model, p, 40, false))
                    .json()["choices"][0]["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let socket = d.socket.clone();
        let together: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = prompts
                .iter()
                .map(|p| {
                    let socket = socket.clone();
                    s.spawn(move || {
                        let r = curl(
                            &socket,
                            "POST",
                            "/v1/completions",
                            Some(&greedy(model, p, 40, true)),
                            &["-N"],
                        );
                        assert_eq!(r.status, 200, "{}", r.body);
                        let (t, _, done) = r.sse_text();
                        assert!(done);
                        t
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together, alone, "{model}: batching changed a greedy output");
        if model == "kjv-gpt2" {
            // The CLI feeds the long prompt in one call: the same text.
            let dir = ember_tests::model(model);
            let out = emberd(&[
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--temperature",
                "0",
                "--max-tokens",
                "40",
                "--json",
                &long,
            ]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                v["text"].as_str().unwrap(),
                alone[5],
                "chunked prefill changed the text"
            );
            assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 128, "{v}");
        }
    }
    let m = d.get("/metrics").body;
    assert!(
        m.contains("ember_requests_total{model=\"kjv-gpt2\",outcome=\"ok\"} 16"),
        "{m}"
    );
    // Second runs took the first runs' full KV blocks: 144 of the long
    // prompt's 155 tokens, 16 of the Chinese prompt's (the only other one
    // longer than a 16-token block); tract (the LSTM) has no cache.
    assert!(
        m.contains("ember_prefix_reused_tokens_total{model=\"kjv-gpt2\"} 160"),
        "{m}"
    );
    assert!(
        m.contains("ember_prefix_reused_tokens_total{model=\"kjv-lstm\"} 0"),
        "{m}"
    );
}

#[test]
fn a_full_queue_answers_429_and_a_cancelled_client_frees_its_slot() {
    // One running sequence, one queued request: the third is refused.
    let d = Daemon::start(&config(1, 1, 60.0));
    let long = json!({"model": "kjv-lstm", "prompt": "And", "max_tokens": 4000,
                      "ignore_eos": true, "stream": true})
    .to_string();
    let spawn_curl = || {
        std::process::Command::new("curl")
            .args(["-sN", "--unix-socket"])
            .arg(&d.socket)
            .args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                &long,
            ])
            .arg("http://localhost/v1/completions")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut running = spawn_curl();
    d.wait_health("kjv-lstm", "one active", 20, |m| m["active"] == 1);
    let mut queued = spawn_curl();
    d.wait_health("kjv-lstm", "one queued", 20, |m| m["queued"] == 1);
    let refused = d.post("/v1/completions", &long);
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "model_busy");
    assert!(
        refused
            .headers
            .to_ascii_lowercase()
            .contains("retry-after: 1"),
        "{}",
        refused.headers
    );
    // The other model has its own queue.
    assert_eq!(
        d.post("/v1/completions", &greedy("kjv-gpt2", "And", 4, false))
            .status,
        200
    );

    // Both clients hang up: their slots free within a step.
    running.kill().unwrap();
    queued.kill().unwrap();
    let _ = (running.wait(), queued.wait());
    d.wait_health("kjv-lstm", "slots freed", 20, |m| {
        m["active"] == 0 && m["queued"] == 0
    });
    let after = d.post("/v1/completions", &greedy("kjv-lstm", "And", 4, false));
    assert_eq!(after.status, 200, "{}", after.body);
    let m = d.get("/metrics").body;
    assert!(m.contains("outcome=\"cancelled\"} 2"), "{m}");
    assert!(m.contains("model=\"kjv-lstm\",outcome=\"busy\"} 1"), "{m}");
}

#[test]
fn a_request_past_its_deadline_finishes_with_timeout() {
    let d = Daemon::start(&config(4, 4, 0.3));
    let r = d.post(
        "/v1/completions",
        &json!({"model": "kjv-lstm", "prompt": "And", "max_tokens": 4000, "ignore_eos": true})
            .to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "timeout");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0 && n < 4000, "{n} tokens");
}

#[test]
fn bad_requests_get_json_errors_and_the_daemon_keeps_serving() {
    let d = Daemon::start(&config(4, 4, 60.0));
    let long_prompt = "and ".repeat(400);
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "invalid_json"),
        (r#"{"prompt": 5}"#.into(), 400, "invalid_json"),
        (
            r#"{"model": "nope", "prompt": "x"}"#.into(),
            404,
            "model_not_found",
        ),
        (
            json!({"model": "kjv-gpt2", "prompt": long_prompt, "max_tokens": 8}).to_string(),
            400,
            "context_length_exceeded",
        ),
        (
            r#"{"prompt": "x", "temperature": -1}"#.into(),
            400,
            "invalid_value",
        ),
        (
            r#"{"prompt": "x", "top_p": 1.5}"#.into(),
            400,
            "invalid_value",
        ),
        (
            r#"{"prompt": "x", "max_tokens": 0}"#.into(),
            400,
            "invalid_value",
        ),
        (r#"{"prompt": "x", "n": 3}"#.into(), 400, "invalid_value"),
        (
            r#"{"prompt": "x", "logprobs": 50}"#.into(),
            400,
            "invalid_value",
        ),
        (r#"{"prompt": ""}"#.into(), 400, "empty_prompt"),
        (r#"{"prompt": [99999]}"#.into(), 400, "invalid_token"),
        (
            format!(r#"{{"prompt": "{}"}}"#, "a".repeat(70_000)),
            413,
            "body_too_large",
        ),
    ];
    for (body, status, code) in &cases {
        let r = d.post("/v1/completions", body);
        assert_eq!(r.status, *status, "{body:.80}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["code"], *code, "{body:.80}: {v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"]["type"].is_string());
    }
    // Streaming requests refused before the first token get a status too.
    let r = d.post(
        "/v1/completions",
        &json!({"model": "kjv-gpt2", "prompt": long_prompt, "stream": true}).to_string(),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let r = d.post("/v1/chat/completions", r#"{"messages": []}"#);
    assert_eq!(r.status, 400);
    // Out-of-range alternatives: the error names the field the client used.
    for (path, body, field) in [
        (
            "/v1/completions",
            r#"{"prompt": "x", "logprobs": 21}"#,
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}"#,
            "top_logprobs",
        ),
    ] {
        let r = d.post(path, body);
        assert_eq!(r.status, 400, "{}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["param"], field, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
    assert_eq!(d.get("/v1/nothing").status, 404);
    // Still serving.
    let ok = d.post(
        "/v1/completions",
        &greedy("kjv-gpt2", "And God said", 8, false),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    let m = d.get("/metrics").body;
    assert!(m.contains("outcome=\"invalid\""), "{m}");
}

#[test]
fn models_health_metrics_tokenize_detokenize() {
    let d = Daemon::start(&config(4, 4, 60.0));
    let models = d.get("/v1/models").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["kjv-gpt2", "kjv-lstm"]);
    assert_eq!(models["data"][0]["context_length"], 256);
    let h = d.get("/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    assert_eq!(h.json()["models"]["kjv-gpt2"]["state"], "ready");
    let text = "起初神创造天地。In the beginning 🌍";
    let t = d
        .post(
            "/v1/tokenize",
            &json!({"model": "kjv-gpt2", "prompt": text}).to_string(),
        )
        .json();
    let back = d.post(
        "/v1/detokenize",
        &json!({"model": "kjv-gpt2", "tokens": t["tokens"]}).to_string(),
    );
    assert_eq!(back.json()["text"], text);
    assert_eq!(
        d.post("/v1/detokenize", r#"{"tokens": [123456]}"#).status,
        400
    );
    let m = d.get("/metrics");
    assert!(m.headers.contains("text/plain"));
    for name in [
        "ember_model_load_seconds{model=\"kjv-gpt2\"}",
        "ember_queue_depth{model=\"kjv-lstm\"} 0",
        "# TYPE ember_time_to_first_token_seconds histogram",
        "# TYPE ember_token_latency_seconds histogram",
        "# TYPE ember_active_sequences gauge",
    ] {
        assert!(m.body.contains(name), "{name} missing:\n{}", m.body);
    }
}

#[test]
fn sigterm_drains_running_requests_then_removes_the_socket() {
    let mut d = Daemon::start(&config(4, 4, 60.0));
    let socket = d.socket.clone();
    let h = std::thread::spawn(move || {
        curl(
            &socket,
            "POST",
            "/v1/completions",
            Some(&json!({"model": "kjv-lstm", "prompt": "And", "max_tokens": 600, "ignore_eos": true}).to_string()),
            &[],
        )
    });
    d.wait_health("kjv-lstm", "the request running", 20, |m| m["active"] == 1);
    d.signal("TERM");
    let r = h.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["usage"]["completion_tokens"],
        600,
        "drained to the end"
    );
    let st = d.wait_exit(30);
    assert!(st.success(), "{st}\n{}", d.log());
    assert!(!d.socket.exists(), "socket removed");
}

#[test]
fn sighup_reload_swaps_models_without_losing_requests() {
    let d = Daemon::start(&config(4, 8, 60.0));
    // Requests in flight on the model the reload replaces.
    let socket = d.socket.clone();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                curl(
                    &socket,
                    "POST",
                    "/v1/completions",
                    Some(&json!({"model": "kjv-lstm", "prompt": "And", "max_tokens": 300 + i, "ignore_eos": true}).to_string()),
                    &[],
                )
            })
        })
        .collect();
    d.wait_health("kjv-lstm", "requests running", 20, |m| {
        m["active"].as_u64() > Some(0)
    });
    // kjv-lstm's settings change (reloaded), kjv-gpt2 is removed, "second" is added.
    d.rewrite_config(
        r#"
[server]
socket = "SOCKET"
[models.kjv-lstm]
path = "MODELS/kjv-lstm"
max_batch = 2
[models.second]
path = "MODELS/kjv-gpt2"
"#,
    );
    d.signal("HUP");
    let t0 = Instant::now();
    loop {
        let ids: Vec<String> = d.get("/v1/models").json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        if ids == ["kjv-lstm", "second"] {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "reload not applied: {ids:?}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.json()["usage"]["completion_tokens"],
            300 + i,
            "finished on the old model"
        );
    }
    assert_eq!(
        d.post("/v1/completions", &greedy("second", "And", 4, false))
            .status,
        200
    );
    assert_eq!(
        d.post("/v1/completions", &greedy("kjv-gpt2", "And", 4, false))
            .status,
        404
    );
    assert_eq!(d.get("/v1/models").json()["data"][0]["max_batch"], 2);

    // A broken configuration leaves the running one serving.
    d.rewrite_config("[models.kjv-lstm]\npath = \"/nonexistent\"\n");
    d.signal("HUP");
    let t0 = Instant::now();
    while !d.log().contains("reload failed") {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        d.post("/v1/completions", &greedy("second", "And", 4, false))
            .status,
        200
    );
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ember.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap()); // a crash leaves the file
    assert!(sock.exists());
    let cfg = config(4, 4, 60.0);
    let d = Daemon::start_in(dir, &cfg);
    assert_eq!(
        d.get("/health").status,
        200,
        "the daemon took over the stale socket"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&d.socket).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o660, "socket mode");
    // A second daemon on the same live socket refuses to start.
    let out = emberd(&["serve", "--config", d.config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another running daemon"), "{err}");
    assert_eq!(d.get("/health").status, 200, "the first daemon is unharmed");
}

#[test]
fn query_and_status_clients_talk_to_the_daemon() {
    let d = Daemon::start(&config(4, 4, 60.0));
    let sock = d.socket.to_str().unwrap();
    let out = emberd(&[
        "query",
        "--socket",
        sock,
        "--model",
        "kjv-gpt2",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "And God said",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = d
        .post(
            "/v1/completions",
            &greedy("kjv-gpt2", "And God said", 12, false),
        )
        .json();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'),
        plain["choices"][0]["text"]
    );
    let out = emberd(&[
        "query",
        "--socket",
        sock,
        "--chat",
        "--max-tokens",
        "4",
        "Hello",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = emberd(&["status", "--socket", sock]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("kjv-gpt2") && table.contains("kjv-lstm") && table.contains("ok"),
        "{table}"
    );
    let out = emberd(&["query", "--socket", sock, "--model", "missing", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not served here"));
}

#[test]
fn a_bad_configuration_names_the_key_and_a_missing_model_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[models.a]\npath = \"/x\"\nmax_batch = 0\n").unwrap();
    let out = emberd(&["serve", "--config", bad.to_str().unwrap(), "--check"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("models.a.max_batch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let missing = dir.path().join("missing.toml");
    let sock = dir.path().join("s.sock");
    std::fs::write(
        &missing,
        format!(
            "[server]\nsocket = \"{}\"\n[models.a]\npath = \"/nonexistent/model\"\n",
            sock.display()
        ),
    )
    .unwrap();
    let out = emberd(&["serve", "--config", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model a") && err.contains("/nonexistent/model"),
        "{err}"
    );
    assert!(!sock.exists(), "socket cleaned up after a failed start");
}

#[test]
fn a_listener_passed_by_socket_activation_is_used() {
    // systemd-socket-activate (Debian's systemd package) binds the socket and
    // starts emberd on the first connection with LISTEN_FDS=1, LISTEN_PID.
    let dir = tempfile::tempdir().unwrap();
    let passed = dir.path().join("activated.sock");
    let configured = dir.path().join("configured.sock");
    let cfg = dir.path().join("ember.toml");
    std::fs::write(
        &cfg,
        config(4, 4, 60.0)
            .replace("SOCKET", &configured.display().to_string())
            .replace(
                "MODELS",
                &ember_tests::root().join("models").display().to_string(),
            ),
    )
    .unwrap();
    let mut child = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&passed)
        .arg(ember_tests::emberd_bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (apt install systemd)");
    let t0 = Instant::now();
    let health = loop {
        let r = curl(&passed, "GET", "/health", None, &[]);
        if r.status == 200 || t0.elapsed() > Duration::from_secs(60) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(health.status, 200, "{}", health.body);
    let r = curl(
        &passed,
        "POST",
        "/v1/completions",
        Some(&greedy("kjv-gpt2", "And", 4, false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        !configured.exists(),
        "the daemon used the passed listener, not its configured socket"
    );
    let _ = child.kill();
    let _ = child.wait();
}
