//! The native int8 engine against tract (the reference) and itself: backend
//! selection, greedy equality, batch invariance, perplexity, the KV arena's
//! limits. Model outputs against onnxruntime are in golden.rs.

use ember_tests::{golden, model, root};
use emberd::engine::{BackendChoice, BatchItem, KvType, LoadOptions, Logits, Model};
use emberd::sample::argmax;

fn load(name: &str, backend: BackendChoice, max_seqs: usize) -> Model {
    load_kv(name, backend, max_seqs, KvType::F32)
}

fn load_kv(name: &str, backend: BackendChoice, max_seqs: usize, kv_cache: KvType) -> Model {
    let opts = LoadOptions {
        backend,
        max_seqs,
        kv_cache,
        ..Default::default()
    };
    Model::load(&model(name), &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Greedy continuation of `prompt`, one token at a time.
fn greedy(m: &Model, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut st = m.backend.new_state().unwrap();
    let mut logits = vec![];
    m.backend
        .forward(&mut st, prompt, Logits::Last, &mut logits)
        .unwrap();
    let (mut ids, mut all) = (vec![], vec![]);
    for _ in 0..n {
        let t = argmax(&logits);
        ids.push(t);
        all.push(logits.clone());
        m.backend
            .forward(&mut st, &[t], Logits::Last, &mut logits)
            .unwrap();
    }
    (ids, all)
}

#[test]
fn auto_picks_native_where_it_applies_and_tract_elsewhere() {
    assert_eq!(
        load("kjv-gpt2", BackendChoice::Auto, 1).backend.name(),
        "native"
    );
    assert_eq!(
        load("kjv-gpt2", BackendChoice::Tract, 1).backend.name(),
        "tract"
    );
    // fp32 weights are quantized only on request.
    assert_eq!(
        load("tiny-gpt2", BackendChoice::Auto, 1).backend.name(),
        "tract"
    );
    let q = Model::load(
        &model("tiny-gpt2"),
        &LoadOptions {
            quantize_fp32: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(q.backend.name(), "native");
    // The Llama family too (RMSNorm, RoPE, grouped-query attention, SwiGLU).
    assert_eq!(
        load("tiny-llama-gqa-int8", BackendChoice::Auto, 1)
            .backend
            .name(),
        "native"
    );
    // And LSTM language models.
    assert_eq!(
        load("kjv-lstm", BackendChoice::Auto, 1).backend.name(),
        "native"
    );
    // Quantizations it does not run stay on tract.
    for name in ["tiny-llama-gqa", "tiny-gpt2-qdq", "tiny-gpt2-qoperator"] {
        assert_eq!(
            load(name, BackendChoice::Auto, 1).backend.name(),
            "tract",
            "{name}"
        );
    }
    // Forcing native on one says why.
    let opts = LoadOptions {
        backend: BackendChoice::Native,
        ..Default::default()
    };
    let e = Model::load(&model("tiny-gpt2-qdq"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("native engine cannot run") && e.contains("attention"),
        "{e}"
    );
}

/// 32 greedy tokens equal tract's, logits within 0.1 of tract's (see
/// golden.rs for why not closer), on the
/// golden prompts and the English/Chinese prompts of the cross tests.
#[test]
fn native_greedy_equals_tract() {
    for name in ["kjv-gpt2", "tiny-llama-gqa-int8", "kjv-lstm"] {
        let n = load(name, BackendChoice::Native, 1);
        let t = load(name, BackendChoice::Tract, 1);
        let mut worst = 0f32;
        for p in &prompts(&n, name) {
            let (a, la) = greedy(&n, p, 32);
            let (b, lb) = greedy(&t, p, 32);
            assert_eq!(a, b, "{name}: greedy tokens differ for prompt {p:?}");
            worst = worst.max(max_diff(&la, &lb));
        }
        eprintln!("{name}: worst logit difference native vs tract {worst:.2e}");
        assert!(worst < 0.1, "{name}: logits differ by {worst}");
    }
}

/// With a 16-bit or an 8-bit KV cache, on the same prompts, the native
/// engine is fed tract's 32 greedy tokens: its logits stay within 0.15 of
/// tract's, and it picks tract's token wherever tract's best two are
/// further apart than twice that (a near tie may go either way, as it may
/// between any two runtimes).
/// On the trained demo model only: the random-weight test Llama amplifies
/// any rounding of its keys (its logits move by up to ~1 on a scale of ±40
/// when its f32 cache merely holds f16-rounded values), so it measures the
/// model, not the cache.
#[test]
fn native_16_and_8_bit_kv_caches_follow_tract() {
    const TOLERANCE: f32 = 0.15;
    for (name, kv) in [("kjv-gpt2", KvType::F16), ("kjv-gpt2", KvType::I8)] {
        let n = load_kv(name, BackendChoice::Native, 1, kv);
        let t = load(name, BackendChoice::Tract, 1);
        let (mut worst, mut ties) = (0f32, 0);
        for p in &prompts(&n, name) {
            let (ids, lt) = greedy(&t, p, 32);
            let ln = forced(&n, p, &ids);
            worst = worst.max(max_diff(&ln, &lt));
            for (step, (a, b)) in ln.iter().zip(&lt).enumerate() {
                let mut sorted = b.clone();
                sorted.sort_by(|x, y| y.total_cmp(x));
                if sorted[0] - sorted[1] > 2.0 * TOLERANCE {
                    assert_eq!(
                        argmax(a),
                        argmax(b),
                        "{name}: prompt {p:?} step {step}, worst so far {worst}, margin {}",
                        sorted[0] - sorted[1]
                    );
                } else {
                    ties += 1;
                }
            }
        }
        eprintln!(
            "{name} ({kv:?} KV): worst logit difference vs tract {worst:.2e}, {ties} near ties"
        );
        assert!(worst < TOLERANCE, "{name} {kv:?}: logits differ by {worst}");
    }
}

/// The golden prompts and the English/Chinese prompts of the cross tests.
fn prompts(m: &Model, name: &str) -> Vec<Vec<u32>> {
    let mut prompts: Vec<Vec<u32>> = golden(&model(name))
        .cases
        .into_iter()
        .map(|c| c.prompt_ids)
        .collect();
    for p in [
        "In the beginning God created",
        "耶和华说",
        "And it came to pass, when the",
    ] {
        prompts.push(m.tokenizer.encode(p).unwrap());
    }
    prompts
}

/// The logits before each of `tokens`, fed one at a time after `prompt`.
fn forced(m: &Model, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut st = m.backend.new_state().unwrap();
    let mut logits = vec![];
    m.backend
        .forward(&mut st, prompt, Logits::Last, &mut logits)
        .unwrap();
    let mut all = vec![];
    for &t in tokens {
        all.push(logits.clone());
        m.backend
            .forward(&mut st, &[t], Logits::Last, &mut logits)
            .unwrap();
    }
    all
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |w, (x, y)| w.max((x - y).abs()))
}

/// A sequence gives the same logits, bit for bit, alone and in a batch of 8
/// (each at a different length), and a prompt fed in pieces equals one fed whole.
#[test]
fn native_batch_invariance() {
    for name in ["kjv-gpt2", "tiny-llama-gqa-int8", "kjv-lstm"] {
        batch_invariance(load(name, BackendChoice::Native, 8), name);
    }
    // The random-weight Llama fails the load probe with an int8 cache (its
    // logits move 5.5 % of their range, the probe allows 5 %): that cache
    // is checked on GPT-2 here, and on GQA shapes by attend_rows' unit test.
    for (name, kv) in [
        ("kjv-gpt2", KvType::F16),
        ("tiny-llama-gqa-int8", KvType::F16),
        ("kjv-gpt2", KvType::I8),
    ] {
        let m = load_kv(name, BackendChoice::Native, 8, kv);
        batch_invariance(m, &format!("{name} {kv:?} KV"));
    }
    // The LSTM quantized at load: each sequence's hidden state is quantized
    // on its own, so batching changes nothing there either.
    let opts = LoadOptions {
        backend: BackendChoice::Native,
        quantize_fp32: true,
        max_seqs: 8,
        ..Default::default()
    };
    batch_invariance(
        Model::load(&model("kjv-lstm"), &opts).unwrap(),
        "kjv-lstm int8",
    );
}

fn batch_invariance(m: Model, name: &str) {
    let texts = [
        "In the beginning",
        "And God said, Let there be light",
        "耶和华说",
        "The LORD is my shepherd; I shall not want.",
        "Blessed are the meek",
        "And it came to pass",
        "Jesus wept.",
        "For God so loved the world, that he gave his only begotten Son",
    ];
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| m.tokenizer.encode(t).unwrap())
        .collect();
    let alone: Vec<(Vec<u32>, Vec<Vec<f32>>)> = prompts.iter().map(|p| greedy(&m, p, 16)).collect();

    let mut states: Vec<_> = prompts
        .iter()
        .map(|_| m.backend.new_state().unwrap())
        .collect();
    let mut logits: Vec<Vec<f32>> = vec![vec![]; 8];
    for ((st, p), l) in states.iter_mut().zip(&prompts).zip(&mut logits) {
        m.backend.forward(st, p, Logits::Last, l).unwrap();
    }
    let mut got: Vec<Vec<u32>> = vec![vec![]; 8];
    for step in 0..16 {
        let next: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        for i in 0..8 {
            assert_eq!(
                logits[i], alone[i].1[step],
                "{name}: sequence {i} step {step}: logits differ in the batch"
            );
            got[i].push(next[i]);
        }
        let mut items = BatchItem::decode_step(&mut states, &mut logits, &next);
        m.backend.forward_batch(&mut items);
        assert!(items.iter().all(|i| i.result.is_ok()));
    }
    for i in 0..8 {
        assert_eq!(got[i], alone[i].0, "{name}: sequence {i}");
    }

    // Prompt in pieces: the cache written by one call is what the next reads.
    let p = &prompts[7];
    let mut st = m.backend.new_state().unwrap();
    let mut l = vec![];
    m.backend
        .forward(&mut st, &p[..5], Logits::Last, &mut l)
        .unwrap();
    m.backend
        .forward(&mut st, &p[5..], Logits::Last, &mut l)
        .unwrap();
    let a = argmax(&l);
    assert_eq!(a, alone[7].0[0]);
}

/// Threads split the work (weight rows, unit groups, attention's (row,
/// head) pairs) but never a sum: results are bit-identical at any count.
#[test]
fn native_threads_change_nothing() {
    let text = std::fs::read_to_string(root().join("models/heldout.txt")).unwrap();
    for name in ["kjv-gpt2", "tiny-llama-gqa-int8", "kjv-lstm"] {
        let run = |threads: usize| {
            let opts = LoadOptions {
                backend: BackendChoice::Native,
                max_seqs: 8,
                threads,
                ..Default::default()
            };
            let m = Model::load(&model(name), &opts).unwrap();
            let ids: Vec<u32> = m.tokenizer.encode(&text).unwrap()[..120].to_vec();
            // A long prompt (prefill, every position's logits) ...
            let mut st = m.backend.new_state().unwrap();
            let mut all = vec![];
            m.backend
                .forward(&mut st, &ids, Logits::All, &mut all)
                .unwrap();
            // ... then 8 sequences decoding together.
            let mut states: Vec<_> = (0..8).map(|_| m.backend.new_state().unwrap()).collect();
            let mut logits: Vec<Vec<f32>> = vec![vec![]; 8];
            for (i, (st, l)) in states.iter_mut().zip(&mut logits).enumerate() {
                let p = &ids[i * 5..i * 5 + 20 + 3 * i];
                m.backend.forward(st, p, Logits::Last, l).unwrap();
            }
            let mut steps = vec![];
            for _ in 0..12 {
                let next: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
                let mut items = BatchItem::decode_step(&mut states, &mut logits, &next);
                m.backend.forward_batch(&mut items);
                assert!(items.iter().all(|i| i.result.is_ok()));
                steps.push(logits.clone());
            }
            (all, steps)
        };
        let one = run(1);
        let two = run(2);
        assert!(
            one.0 == two.0,
            "{name}: prefill logits differ with 2 threads"
        );
        assert!(
            one.1 == two.1,
            "{name}: batched decode differs with 2 threads"
        );
    }
}

/// Logits for every position (perplexity's path) across chunks of 64 rows.
#[test]
fn native_all_logits_match_tract() {
    // The tiny Llama is random: its logits are near ties everywhere, so it is
    // compared within one chunk (quantized exactly as tract does).
    for (name, len) in [
        ("kjv-gpt2", 150),
        ("tiny-llama-gqa-int8", 64),
        ("kjv-lstm", 150),
    ] {
        all_logits_match_tract(name, len);
    }
}

fn all_logits_match_tract(name: &str, len: usize) {
    let n = load(name, BackendChoice::Native, 1);
    let t = load(name, BackendChoice::Tract, 1);
    let text = std::fs::read_to_string(root().join("models/heldout.txt")).unwrap();
    let ids: Vec<u32> = n.tokenizer.encode(&text).unwrap()[..len].to_vec();
    let (mut sn, mut stt) = (
        n.backend.new_state().unwrap(),
        t.backend.new_state().unwrap(),
    );
    let (mut ln, mut lt) = (vec![], vec![]);
    n.backend
        .forward(&mut sn, &ids, Logits::All, &mut ln)
        .unwrap();
    t.backend
        .forward(&mut stt, &ids, Logits::All, &mut lt)
        .unwrap();
    assert_eq!(ln.len(), lt.len());
    let v = n.backend.vocab_size();
    let mut same = 0;
    for (a, b) in ln.chunks(v).zip(lt.chunks(v)) {
        same += (argmax(a) == argmax(b)) as usize;
    }
    // Past 64 tokens the activations are quantized per 64-token chunk, not
    // over the whole tensor as tract and onnxruntime do.
    assert!(
        same + 3 >= len,
        "{name}: argmax equal at {same} of {len} positions"
    );
    let worst = ln
        .iter()
        .zip(&lt)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("{name}: all-positions worst difference {worst:.3}");
    assert!(worst < 0.5, "{name}: {worst}");
}

#[test]
fn native_refuses_what_does_not_fit() {
    let m = load("kjv-gpt2", BackendChoice::Native, 1);
    let ctx = m.context.unwrap();
    let mut st = m.backend.new_state().unwrap();
    let mut l = vec![];
    let long = vec![1u32; ctx + 1];
    let e = m
        .backend
        .forward(&mut st, &long, Logits::Last, &mut l)
        .unwrap_err();
    assert!(e.to_string().contains("exceeds the context"), "{e}");
    let e = m
        .backend
        .forward(&mut st, &[1_000_000], Logits::Last, &mut l)
        .unwrap_err();
    assert!(
        e.to_string().contains("outside the model's vocabulary"),
        "{e}"
    );
    // The arena holds one full-context sequence: a second one finds no blocks
    // until the first is dropped.
    m.backend
        .forward(&mut st, &vec![1u32; ctx], Logits::Last, &mut l)
        .unwrap();
    let mut other = m.backend.new_state().unwrap();
    let e = m
        .backend
        .forward(&mut other, &[1, 2], Logits::Last, &mut l)
        .unwrap_err();
    assert!(e.to_string().contains("KV cache is full"), "{e}");
    assert_eq!(other.len, 0);
    drop(st);
    m.backend
        .forward(&mut other, &[1, 2], Logits::Last, &mut l)
        .unwrap();
    assert_eq!(other.len, 2);
}

/// A prompt that starts like an earlier one takes its full KV blocks: the
/// shared part is not computed again, and the continuation is the same as
/// without the cache (greedy, 24 tokens).
#[test]
fn native_prefix_reuse() {
    let m = load("kjv-gpt2", BackendChoice::Native, 4);
    let system =
        "Thou art a helpful assistant that answereth in the words of the King James Bible. ";
    let a: Vec<u32> = m
        .tokenizer
        .encode(&format!("{system}Who created the heaven?"))
        .unwrap();
    let b: Vec<u32> = m
        .tokenizer
        .encode(&format!("{system}Who is my shepherd?"))
        .unwrap();
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(shared >= 16, "test prompts share {shared} tokens");

    // Without any cache: a fresh model.
    let fresh = load("kjv-gpt2", BackendChoice::Native, 4);
    let (want, _) = greedy(&fresh, &b, 24);

    // Request a, then b reusing a's full blocks.
    let (_, _) = greedy(&m, &a, 4);
    let mut st = m.backend.new_state().unwrap();
    let reused = m.backend.reuse_prefix(&mut st, &b);
    assert_eq!(reused, shared / 16 * 16, "full blocks of the shared prefix");
    assert_eq!(st.len, reused);
    let mut l = vec![];
    m.backend
        .forward(&mut st, &b[reused..], Logits::Last, &mut l)
        .unwrap();
    let mut got = vec![];
    for _ in 0..24 {
        let t = argmax(&l);
        got.push(t);
        m.backend
            .forward(&mut st, &[t], Logits::Last, &mut l)
            .unwrap();
    }
    assert_eq!(got, want, "continuation after prefix reuse");
    // tract has no cache: nothing reused.
    let t = load("kjv-gpt2", BackendChoice::Tract, 1);
    let mut ts = t.backend.new_state().unwrap();
    assert_eq!(t.backend.reuse_prefix(&mut ts, &b), 0);
}

/// Perplexity over the held-out text within 1 % of tract's: kjv-gpt2 (also
/// with a 16-bit KV cache) and kjv-lstm on the native engine, and kjv-lstm
/// with its fp32 gate weights quantized to int8 at load (`quantize_fp32`,
/// opt-in).
#[test]
fn native_perplexity_within_one_percent_of_tract() {
    let text = std::fs::read_to_string(root().join("models/heldout.txt")).unwrap();
    let ppl = |m: &Model| {
        let ids = m.tokenizer.encode(&text).unwrap();
        emberd::cli::perplexity(m, &ids[..1200], None, |_| {})
            .unwrap()
            .perplexity
    };
    for (name, quantize_fp32, kv_cache) in [
        ("kjv-gpt2", false, KvType::F32),
        ("kjv-gpt2", false, KvType::F16),
        ("kjv-gpt2", false, KvType::I8),
        ("kjv-lstm", false, KvType::F32),
        ("kjv-lstm", true, KvType::F32),
    ] {
        let opts = LoadOptions {
            backend: BackendChoice::Native,
            quantize_fp32,
            kv_cache,
            ..Default::default()
        };
        let n = Model::load(&model(name), &opts).unwrap();
        let t = load(name, BackendChoice::Tract, 1);
        let (a, b) = (ppl(&n), ppl(&t));
        eprintln!(
            "{name} (quantize_fp32 {quantize_fp32}, {kv_cache:?} KV): perplexity native {a:.3}, tract {b:.3}"
        );
        assert!((a / b - 1.0).abs() < 0.01, "{name}: {a} vs {b}");
    }
}
