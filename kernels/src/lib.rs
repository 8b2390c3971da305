//! `ember-kernels`: the numeric kernels Ember runs per token.
//!
//! This crate has no dependency on tokio or tract so it can be tested (and
//! cross-tested under qemu) on its own. Today it holds the scalar reference
//! (`generic`) versions of the float helpers the sampler and evaluator use;
//! the int8 GEMV/GEMM kernels and their NEON/AVX2/AVX-512 VNNI variants, with
//! run-time dispatch, arrive with their own issue and are proven against these.

pub mod generic;

pub use generic::{argmax, log_softmax_inplace, log_sum_exp, softmax_inplace};
