//! Ember's daemon as a library: everything `emberd` does, so tests can run it
//! in-process and the binary stays a thin `main`.
//!
//! * [`model`]: the model directory contract and family detection;
//! * [`engine`]: backends that turn token ids into logits (tract today);
//! * [`sample`]: sampling, shared by every front end;
//! * [`text`]: tokenizer, streaming detokenizer, stop sequences;
//! * [`generate`]: one request as a state machine over logits;
//! * [`config`]: `emberd serve`'s TOML configuration, validated;
//! * [`sched`]: per-model continuous-batching schedulers on their own threads;
//! * [`api`]: the OpenAI-compatible HTTP API on the Unix socket;
//! * [`serve`]: socket, accept loop, loading, reload, graceful shutdown;
//! * [`mqtt`]: the MQTT transport (requests and replies through a broker);
//! * [`metrics`]: Prometheus metrics;
//! * [`template`]: chat templates;
//! * [`client`]: `emberd query` / `emberd status`;
//! * [`cli`]: the `emberd` command line.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod generate;
pub mod metrics;
pub mod model;
pub mod mqtt;
mod proto;
pub mod sample;
pub mod sched;
pub mod serve;
pub mod systemd;
pub mod template;
pub mod text;
