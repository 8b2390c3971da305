//! `ember-kernels`: the numeric kernels Ember runs per token.
//!
//! Why a crate of its own: Ember's speed on a Raspberry Pi has to come from
//! int8 kernels written for the boards' CPUs, chosen at run time so one binary
//! per target triple runs on every board. The crate has no dependency on tokio
//! or tract, so it can be tested (and cross-tested under qemu) on its own.
//!
//! Layout, after tract-linalg:
//! * [`generic`]: plain scalar Rust, always compiled — the reference every
//!   SIMD kernel is proven against;
//! * per-architecture modules whose `#[target_feature]` functions stay private
//!   behind safe wrappers that check their preconditions;
//! * [`Kernels`]: one table of function pointers, built once by
//!   [`Kernels::generic`] then each architecture's `plug`, according to the
//!   CPU's features and the `EMBER_CPU` override.

pub mod gemv;
pub mod generic;
pub mod quant;

#[macro_use]
mod macros;

#[cfg(target_arch = "x86_64")]
mod x86_64;

mod dispatch;

pub use dispatch::{kernels, Isa, Kernels};
pub use generic::{argmax, log_softmax_inplace, log_sum_exp, softmax_inplace};
