//! Model outputs against onnxruntime goldens (tools/demo_models.py).
//!
//! Tolerance: top-5 logits within `LOGIT_TOL` of onnxruntime's. Both runtimes
//! quantize activations with the same DynamicQuantizeLinear rule and multiply
//! in exact integers, so the difference comes from float rounding in the
//! surrounding ops. Measured worst differences: 2e-6 (kjv-gpt2), 2e-5 (tiny
//! Llama fp32 and int8), 5.5e-3 (kjv-lstm, where one activation rounding flip
//! before the int8 output layer moves logits by one quantum).

use ember_tests::{golden, model};
use emberd::engine::{BackendChoice, LoadOptions, Logits, Model};
use emberd::generate::{self, GenerateParams};
use emberd::sample::SamplingParams;

const LOGIT_TOL: f32 = 1e-2;

/// Greedy ids and top-5 logits; `strict` demands all 32 ids equal, otherwise a
/// divergence is accepted only where the reference's top-1 margin is itself
/// within the logit tolerance (a near-tie rounding may flip).
fn check(name: &str, strict: bool) {
    check_on(name, strict, BackendChoice::Auto)
}

/// [`check`] on a given backend (asserted to be the one running).
fn check_on(name: &str, strict: bool, backend: BackendChoice) {
    let dir = model(name);
    let opts = LoadOptions {
        backend,
        ..Default::default()
    };
    let m = Model::load(&dir, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    match backend {
        BackendChoice::Native => assert_eq!(m.backend.name(), "native"),
        BackendChoice::Tract => assert_eq!(m.backend.name(), "tract"),
        BackendChoice::Auto => {}
    }
    let name = &format!("{name} ({})", m.backend.name());
    // The native engine is held to the same tolerance: it quantizes
    // activations with onnxruntime's rule over the same tensors (the head's
    // input included), measured within 3e-6 (kjv-gpt2) and 1.4e-5 (Llama).
    let tol = LOGIT_TOL;
    let g = golden(&dir);
    let mut worst = 0f32;
    for case in &g.cases {
        assert_eq!(
            m.tokenizer.encode(&case.prompt).unwrap(),
            case.prompt_ids,
            "{name}/{}: tokenizer",
            case.name
        );
        let mut state = m.backend.new_state().unwrap();
        let mut logits = vec![];
        m.backend
            .forward(&mut state, &case.prompt_ids, Logits::Last, &mut logits)
            .unwrap();
        for (step, &want) in case.greedy_ids.iter().enumerate() {
            if let Some(t5) = case.top5.iter().find(|t| t.step == step) {
                for (&id, &l) in t5.ids.iter().zip(&t5.logits) {
                    let d = (logits[id as usize] - l).abs();
                    worst = worst.max(d);
                    assert!(
                        d <= tol,
                        "{name}/{} step {step}: logit of {id} is {} vs onnxruntime {l}",
                        case.name,
                        logits[id as usize]
                    );
                }
            }
            let got = emberd::sample::argmax(&logits);
            if got != want {
                let margin = case.top1_margins[step];
                assert!(!strict && margin <= tol, "{name}/{} step {step}: greedy {got} != onnxruntime {want} (reference margin {margin})", case.name);
                eprintln!(
                    "{name}/{}: near-tie at step {step} (margin {margin}); stopping comparison",
                    case.name
                );
                break;
            }
            m.backend
                .forward(&mut state, &[want], Logits::Last, &mut logits)
                .unwrap();
        }
    }
    eprintln!("{name}: worst top-5 logit difference vs onnxruntime {worst:.2e}");
}

#[test]
fn kjv_gpt2_matches_onnxruntime() {
    check_on("kjv-gpt2", true, BackendChoice::Tract);
}

#[test]
fn kjv_gpt2_native_matches_onnxruntime() {
    check_on("kjv-gpt2", true, BackendChoice::Native);
}

#[test]
fn kjv_lstm_matches_onnxruntime() {
    check_on("kjv-lstm", true, BackendChoice::Tract);
}

#[test]
fn kjv_lstm_native_matches_onnxruntime() {
    check_on("kjv-lstm", true, BackendChoice::Native);
}

#[test]
fn llama_gqa_rope_fp32_matches_onnxruntime() {
    check("tiny-llama-gqa", false);
}

#[test]
fn llama_gqa_rope_int8_per_channel_matches_onnxruntime() {
    check("tiny-llama-gqa-int8", false);
}

#[test]
fn llama_gqa_rope_int8_native_matches_onnxruntime() {
    check_on("tiny-llama-gqa-int8", false, BackendChoice::Native);
}

#[test]
fn gpt2_fp32_other_shape_matches_onnxruntime() {
    check("tiny-gpt2", false);
}

/// The full generation path (sampler, detokenizer) reproduces the golden text.
#[test]
fn greedy_generation_reproduces_golden_text() {
    for name in ["kjv-gpt2", "kjv-lstm"] {
        let dir = model(name);
        let m = Model::load(&dir, &LoadOptions::default()).unwrap();
        for case in golden(&dir).cases {
            let params = GenerateParams {
                sampling: SamplingParams::greedy(),
                max_tokens: 32,
                ignore_eos: true,
                ..Default::default()
            };
            let mut streamed = String::new();
            let c = generate::run(&m, case.prompt_ids.clone(), params, |p| {
                streamed.push_str(p)
            })
            .unwrap();
            assert_eq!(c.token_ids, case.greedy_ids, "{name}/{}", case.name);
            assert_eq!(c.text, case.greedy_text, "{name}/{}", case.name);
            assert_eq!(streamed, c.text);
        }
    }
}

#[test]
fn gpt2_static_int8_qdq_matches_onnxruntime() {
    check("tiny-gpt2-qdq", false);
}

#[test]
fn gpt2_static_int8_qoperator_matches_onnxruntime() {
    check("tiny-gpt2-qoperator", false);
}
