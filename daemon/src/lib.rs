//! Ember's daemon as a library: everything `emberd` does, so tests can run it
//! in-process and the binary stays a thin `main`.
//!
//! * [`model`]: the model directory contract and family detection;
//! * [`engine`]: backends that turn token ids into logits (tract today);
//! * [`sample`]: sampling, shared by every front end;
//! * [`text`]: tokenizer, streaming detokenizer, stop sequences;
//! * [`generate`]: one request as a state machine over logits;
//! * [`cli`]: the `emberd` command line.

pub mod cli;
pub mod engine;
pub mod generate;
pub mod model;
pub mod sample;
pub mod text;
