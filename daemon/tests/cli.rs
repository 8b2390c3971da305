//! The binary's argument handling (the end-to-end CLI tests live in `tests/`).
//! Having an integration test here also makes `cargo test --workspace` build
//! the `emberd` binary those tests run.

use std::process::Command;

fn emberd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_emberd"))
        .args(args)
        .output()
        .expect("run emberd")
}

#[test]
fn version_and_help() {
    let out = emberd(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("emberd {}\n", env!("CARGO_PKG_VERSION"))
    );
    let out = emberd(&["--help"]);
    let help = String::from_utf8(out.stdout).unwrap();
    for cmd in ["generate", "bench", "eval"] {
        assert!(help.contains(cmd), "{help}");
    }
}

#[test]
fn usage_errors_exit_2_and_name_the_problem() {
    let out = emberd(&["generate", "hello"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("--model <DIR>"));
    let out = emberd(&["generate", "--model", "m", "--temperature", "warm", "hi"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("invalid value 'warm' for '--temperature"));
    let out = emberd(&["generate", "--model", "m", "--threads", "0", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "error: --threads must be at least 1\n"
    );
}
