//! Helpers shared by Ember's end-to-end tests: where the repository, the demo
//! models and the `emberd` binary are, and the golden files' format.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;

/// Repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `models/NAME` or `tests/fixtures/NAME`, whichever exists.
pub fn model(name: &str) -> PathBuf {
    let m = root().join("models").join(name);
    if m.is_dir() {
        return m;
    }
    root().join("tests/fixtures").join(name)
}

/// The `emberd` binary of this build. `cargo test --workspace` builds it
/// (the emberd package has integration tests); testing this package alone
/// needs a `cargo build -p emberd` first.
pub fn emberd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    // target/<profile>/deps/<test> -> target/<profile>/emberd
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("emberd");
    assert!(
        bin.exists(),
        "{} not built: run `cargo test --workspace` or `cargo build -p emberd` first",
        bin.display()
    );
    bin
}

/// Run `emberd ARGS...`.
pub fn emberd(args: &[&str]) -> Output {
    Command::new(emberd_bin())
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run emberd")
}

/// `golden.json` written by tools/demo_models.py with onnxruntime.
#[derive(Debug, Deserialize)]
pub struct Golden {
    /// onnxruntime version.
    pub made_with: String,
    /// One per prompt.
    pub cases: Vec<GoldenCase>,
}

/// One prompt's reference continuation.
#[derive(Debug, Deserialize)]
pub struct GoldenCase {
    /// english / chinese / one_token.
    pub name: String,
    /// Prompt text.
    pub prompt: String,
    /// Its ids.
    pub prompt_ids: Vec<u32>,
    /// Greedy continuation, EOS not treated specially.
    pub greedy_ids: Vec<u32>,
    /// Its text.
    pub greedy_text: String,
    /// Top-5 at some steps.
    pub top5: Vec<Top5>,
    /// Best-minus-second logit at each step.
    pub top1_margins: Vec<f32>,
}

/// Top-5 logits at one step.
#[derive(Debug, Deserialize)]
pub struct Top5 {
    /// Step index (0: after the prompt).
    pub step: usize,
    /// Token ids, best first.
    pub ids: Vec<u32>,
    /// Their logits.
    pub logits: Vec<f32>,
}

/// Read a model's golden file.
pub fn golden(model_dir: &Path) -> Golden {
    let text = std::fs::read_to_string(model_dir.join("golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}
