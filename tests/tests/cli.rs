//! The `emberd` command-line contract, run as a real process.

use ember_tests::{emberd, golden, model};
use serde_json::Value;

fn json(out: std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "emberd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn generate_json_greedy_equals_golden_and_streaming_text() {
    for name in ["kjv-gpt2", "kjv-lstm"] {
        let dir = model(name);
        let d = dir.to_str().unwrap();
        for case in golden(&dir).cases {
            let args = [
                "generate",
                "--model",
                d,
                "--temperature",
                "0",
                "--max-tokens",
                "32",
                "--ignore-eos",
            ];
            let v = json(emberd(&[&args[..], &["--json", &case.prompt]].concat()));
            let ids: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
            assert_eq!(ids, case.greedy_ids, "{name}/{}", case.name);
            assert_eq!(v["text"], case.greedy_text.as_str());
            assert_eq!(v["finish_reason"], "length");
            assert_eq!(v["usage"]["completion_tokens"], 32);
            assert_eq!(v["usage"]["prompt_tokens"], case.prompt_ids.len());
            for k in ["prefill_ms", "ttft_ms", "decode_tokens_per_s"] {
                assert!(v["timings"][k].as_f64().unwrap() > 0.0, "{k}");
            }
            let out = emberd(&[&args[..], &[case.prompt.as_str()]].concat());
            assert!(out.status.success());
            assert_eq!(
                String::from_utf8(out.stdout).unwrap(),
                format!("{}\n", case.greedy_text)
            );
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let d = model("kjv-gpt2");
    let run = |seed: &str| {
        json(emberd(&[
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--seed",
            seed,
            "--max-tokens",
            "40",
            "--json",
            "And God said",
        ]))["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn stop_sequence_ends_generation_and_is_not_printed() {
    let d = model("kjv-gpt2");
    // Greedy output is ", and the LORD, and the LORD, ..." (see golden.json).
    let greedy = |max_tokens: &str, stop: &str| {
        let args = [
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--temperature",
            "0",
            "--json",
        ];
        let more = [
            "--max-tokens",
            max_tokens,
            "--stop",
            stop,
            "In the beginning God created",
        ];
        let v = json(emberd(&[&args[..], &more[..]].concat()));
        (
            v["text"].as_str().unwrap().to_string(),
            v["finish_reason"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(greedy("128", "LORD"), (", and the ".into(), "stop".into()));
    // Text held back as a possible stop prefix is released when max_tokens ends the request.
    assert_eq!(
        greedy("3", "the LORDX"),
        (", and the".into(), "length".into())
    );
    // A stop completed by the last allowed token still reports `stop`.
    assert_eq!(greedy("3", " the"), (", and".into(), "stop".into()));
}

#[test]
fn logprobs_are_reported() {
    let d = model("kjv-lstm");
    let v = json(emberd(&[
        "generate",
        "--model",
        d.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "3",
        "--logprobs",
        "2",
        "--json",
        "And",
    ]));
    let lp = v["logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), 3);
    for t in lp {
        let top = t["top"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the best alternative.
        assert_eq!(top[0][0], t["token"]);
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
    }
}

#[test]
fn bench_prints_the_documented_keys() {
    let bench = |name: &str, extra: &[&str]| {
        let d = model(name);
        let mut args = vec!["bench", "--model", d.to_str().unwrap()];
        args.extend(["--prompt-tokens", "16", "--gen-tokens", "8"]);
        args.extend(extra);
        json(emberd(&args))
    };
    let v = bench("kjv-lstm", &["--runs", "2", "--backend", "tract"]);
    for k in ["load_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k} in {v}");
    }
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert_eq!(v["prompt_tokens"], 16);
    // tract reports no footprint and no batch figures unless asked.
    assert!(v.get("bytes_per_token").is_none() && v.get("batch").is_none());
    assert!(v.get("weights_read_bytes_per_s").is_none() && v.get("bandwidth_share").is_none());

    // The native engine's footprint, and the batched decode.
    let v = bench("kjv-gpt2", &["--runs", "1", "--batch", "4"]);
    assert_eq!(v["backend"], "native");
    assert_eq!(v["batch"], 4);
    for k in [
        "batch_decode_tokens_per_s",
        "batch1_decode_tokens_per_s",
        "batch_cold_decode_tokens_per_s",
    ] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k} in {v}");
    }
    // kjv-gpt2: 4 layers of 256 wide (4·256² + 2·256·1024 weights each) and a
    // 4096-token head, all int8.
    let per_token = 4 * (4 * 256 * 256 + 2 * 256 * 1024) + 4096 * 256;
    assert_eq!(v["bytes_per_token"], per_token);
    assert!(v["weight_bytes"].as_u64().unwrap() >= per_token);
    assert!(v["kv_bytes"].as_u64().unwrap() > 0);
    // The read rate of its packed weights, and decode's share of it: with
    // one run, that run's tokens/s × bytes per token over the rate.
    let rate = v["weights_read_bytes_per_s"].as_f64().unwrap();
    assert!(rate > 1e8, "{v}");
    let share = v["decode_tokens_per_s"].as_f64().unwrap() * per_token as f64 / rate;
    let got = v["bandwidth_share"].as_f64().unwrap();
    assert!((got - share).abs() <= 1e-9 * share, "{got} against {share}");

    // The LSTM on the native engine: fp32 gate weights (2 layers, W and R of
    // 1024 × 256 each) and the int8 head; no KV cache. The first layer's W
    // is folded into a table by token: a step reads one row of it (1024
    // floats) instead.
    let v = bench("kjv-lstm", &["--runs", "1"]);
    assert_eq!(v["backend"], "native");
    let gates = 3 * 4 * 1024 * 256 + 4 * 1024;
    assert_eq!(v["bytes_per_token"], gates + 4096 * 256);
    assert_eq!(v["kv_bytes"], 0);
}

#[test]
fn eval_reports_perplexity_over_a_sliding_window() {
    let text = ember_tests::root().join("models/heldout.txt");
    for name in ["kjv-gpt2", "kjv-lstm"] {
        let d = model(name);
        let v = json(emberd(&[
            "eval",
            "--model",
            d.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--max-tokens",
            "600",
        ]));
        let ppl = v["perplexity"].as_f64().unwrap();
        // A trained model is far better than uniform over 4096 tokens.
        assert!(ppl > 1.0 && ppl < 1000.0, "{name}: {v}");
        assert_eq!(v["tokens_evaluated"], 600, "{name}: {v}");
        let window = if name == "kjv-gpt2" {
            serde_json::json!(256)
        } else {
            Value::Null
        };
        assert_eq!(v["window"], window, "{name}: {v}");
    }
}
