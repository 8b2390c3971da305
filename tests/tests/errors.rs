//! Every bad input of the foundation issue produces its own clear message,
//! never a panic.

use std::path::Path;

use ember_tests::{emberd, model};
use emberd::engine::{EngineError, LoadOptions, Model};
use emberd::generate::{self, GenerateParams, Truncate};
use emberd::model::ModelError;
use emberd::sample::SamplingParams;

fn load_err(dir: &Path) -> String {
    match Model::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A copy of the demo GPT-2 in a temp dir, with `edit` applied.
fn broken_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.onnx", "tokenizer.json", "config.json", "SHA256SUMS"] {
        std::fs::copy(model("kjv-gpt2").join(f), tmp.path().join(f)).unwrap();
    }
    edit(tmp.path());
    tmp
}

#[test]
fn missing_directory() {
    let msg = load_err(Path::new("/nonexistent/model"));
    assert!(
        msg.contains("/nonexistent/model does not exist or is not a directory"),
        "{msg}"
    );
}

#[test]
fn missing_model_file() {
    let d = broken_copy(|p| std::fs::remove_file(p.join("model.onnx")).unwrap());
    let msg = load_err(d.path());
    assert!(msg.contains("ONNX graph (model.onnx) missing"), "{msg}");
}

#[test]
fn missing_tokenizer() {
    let d = broken_copy(|p| std::fs::remove_file(p.join("tokenizer.json")).unwrap());
    let msg = load_err(d.path());
    assert!(msg.contains("tokenizer (tokenizer.json) missing"), "{msg}");
}

#[test]
fn corrupt_tokenizer() {
    let d = broken_copy(|p| std::fs::write(p.join("tokenizer.json"), "{ not json").unwrap());
    let msg = load_err(d.path());
    assert!(msg.contains("cannot load tokenizer"), "{msg}");
}

#[test]
fn truncated_model_is_caught_by_its_checksum() {
    let d = broken_copy(|p| {
        let bytes = std::fs::read(p.join("model.onnx")).unwrap();
        std::fs::write(p.join("model.onnx"), &bytes[..bytes.len() / 2]).unwrap();
    });
    let msg = load_err(d.path());
    assert!(
        msg.contains("does not match its SHA256SUMS entry") && msg.contains("corrupt or truncated"),
        "{msg}"
    );
}

#[test]
fn truncated_model_without_checksum() {
    let d = broken_copy(|p| {
        std::fs::remove_file(p.join("SHA256SUMS")).unwrap();
        let bytes = std::fs::read(p.join("model.onnx")).unwrap();
        std::fs::write(p.join("model.onnx"), &bytes[..bytes.len() / 3]).unwrap();
    });
    let msg = load_err(d.path());
    assert!(
        msg.contains("is not a valid ONNX model (truncated, corrupt or not ONNX)"),
        "{msg}"
    );
}

#[test]
fn not_onnx_at_all() {
    for content in [
        &b""[..],
        b"this is a text file, not a model\n",
        &[0xffu8; 64][..],
    ] {
        let d = broken_copy(|p| {
            std::fs::remove_file(p.join("SHA256SUMS")).unwrap();
            std::fs::write(p.join("model.onnx"), content).unwrap();
        });
        let msg = load_err(d.path());
        assert!(msg.contains("is not a valid ONNX model"), "{msg}");
    }
}

#[test]
fn unsupported_operator_is_named() {
    let msg = load_err(&model("unsupported-op"));
    assert!(
        msg.contains("uses operators Ember cannot run: SparseAttention (domain com.microsoft"),
        "{msg}"
    );
}

#[test]
fn io_matching_no_family() {
    let msg = load_err(&model("wrong-io"));
    assert!(
        msg.contains("inputs [x] and outputs [y] match no supported model family"),
        "{msg}"
    );
}

#[test]
fn bad_config_json_names_the_file() {
    let d = broken_copy(|p| {
        std::fs::write(p.join("config.json"), "{\"n_positions\": \"many\"}").unwrap()
    });
    let msg = load_err(d.path());
    assert!(
        msg.contains("bad model configuration") && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn prompt_longer_than_context() {
    let m = Model::load(&model("kjv-gpt2"), &LoadOptions::default()).unwrap();
    let ctx = m.context.expect("gpt2 has a context");
    assert_eq!(ctx, 256);
    let long: Vec<u32> = (0..300).map(|i| 100 + i % 50).collect();
    let params = GenerateParams {
        max_tokens: 8,
        ..Default::default()
    };
    let err = generate::run(&m, long.clone(), params.clone(), |_| {}).unwrap_err();
    assert!(matches!(
        err,
        EngineError::PromptTooLong {
            prompt: 300,
            context: 256,
            ..
        }
    ));
    assert!(
        err.to_string()
            .contains("prompt is 300 tokens but the model's context is 256 tokens"),
        "{err}"
    );
    // The truncate policy keeps the tail and generates.
    let params = GenerateParams {
        truncate: Truncate::Left,
        sampling: SamplingParams::greedy(),
        ..params
    };
    let c = generate::run(&m, long.clone(), params, |_| {}).unwrap();
    assert_eq!(c.prompt_token_ids.len(), ctx - 8);
    assert_eq!(c.prompt_token_ids[..], long[long.len() - (ctx - 8)..]);
    assert_eq!(c.token_ids.len(), 8);
}

#[test]
fn bad_sampling_values_and_token_ids_are_refused() {
    let m = Model::load(&model("kjv-lstm"), &LoadOptions::default()).unwrap();
    let params = GenerateParams {
        sampling: SamplingParams {
            top_p: 1.5,
            ..Default::default()
        },
        ..Default::default()
    };
    let err = generate::run(&m, vec![1, 2], params, |_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid sampling parameter `top_p`: must be in (0, 1]"
    );
    let err = generate::run(&m, vec![1, 999_999], GenerateParams::default(), |_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        "token id 999999 is outside the model's vocabulary of 4096"
    );
    let err = generate::run(&m, vec![], GenerateParams::default(), |_| {}).unwrap_err();
    assert_eq!(err.to_string(), "prompt is empty");
}

#[test]
fn model_errors_are_typed() {
    assert!(matches!(
        Model::load(&model("wrong-io"), &LoadOptions::default()),
        Err(ModelError::UnrecognizedIo { .. })
    ));
}

#[test]
fn cli_reports_errors_on_one_line_with_exit_code_1() {
    let out = emberd(&["generate", "--model", "/nonexistent", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err, "error: cannot load model /nonexistent: model directory /nonexistent does not exist or is not a directory\n");
    let long = "In the beginning ".repeat(100);
    let out = emberd(&[
        "generate",
        "--model",
        model("kjv-gpt2").to_str().unwrap(),
        &long,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("error: prompt is") && err.contains("use the truncate policy"),
        "{err}"
    );
}
