//! The one macro that declares a SIMD kernel: a safe wrapper around a private
//! architecture-specific function, gated by its CPU predicate, plus the
//! property tests proving it equal to the scalar reference on every machine
//! that can run it.

/// Declare a kernel of one of the table's signatures.
///
/// ```text
/// kernel! { dot_u8i8:  /// docs
///           pub fn NAME = IMPL, isa = "what it needs", when = PREDICATE; }
/// ```
///
/// The kind (`dot_u8i8`, `dot_i8i8`, `tile_u8i8`, `block_u8i8`, `block16_u8i8`, `dequant_i32`, `qk_f32`, `pv_f32`, `qk_q8`, `pv_q8`, `f16_to_f32`, `panel_f32`, `dynamic_params`, `quantize_u8`, `quantize_i8`, `layer_norm_f32`, `rms_norm_f32`, `act_f32`,
/// `softmax_f32`, `lstm_cell_f32`) picks the signature, the
/// precondition check from [`crate::generic`] and the property test from
/// `crate::check`. The generated `NAME` asserts the preconditions and the CPU
/// predicate (a caller that skipped detection gets a panic, never undefined
/// behaviour), then calls `IMPL`; `NAME::equals_the_reference` is the test.
macro_rules! kernel {
    (dot_u8i8: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(a: &[u8], b: &[i8]) -> i32 {
            crate::generic::check_dot(a, b);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above, and
            // `check_dot` proved the slices are equal in length and short enough.
            unsafe { $imp(a, b) }
        }
        kernel!(@test $name, $pred, dot_u8i8);
    };
    (dot_i8i8: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(a: &[i8], b: &[i8]) -> i32 {
            crate::generic::check_dot(a, b);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above, and
            // `check_dot` proved the slices are equal in length and short enough.
            unsafe { $imp(a, b) }
        }
        kernel!(@test $name, $pred, dot_i8i8);
    };
    (tile_u8i8: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(
            xs: &[&[u8]],
            w: crate::dispatch::Rows4,
        ) -> [[i32; crate::dispatch::TILE_ROWS]; crate::dispatch::TILE_ACTS] {
            let n = crate::generic::check_tile(xs, &w);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above;
            // `check_tile` proved 1–4 activations of length `n` ≤ stride and four
            // rows of `n` bytes each inside `w.data`, all `$imp` reads.
            unsafe { $imp(xs, n, w) }
        }
        kernel!(@test $name, $pred, tile_u8i8);
    };
    (block_u8i8: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(
            xs: &[&[u8]],
            w: crate::dispatch::Block64,
        ) -> [[i32; crate::dispatch::BLOCK_ROWS]; crate::dispatch::TILE_ACTS] {
            let n = crate::generic::check_block(xs, &w);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above;
            // `check_block` proved 1–4 activations of length `n` and
            // `n.div_ceil(4)` groups of the block inside `w.data`, all `$imp` reads.
            unsafe { $imp(xs, n, w) }
        }
        kernel!(@test $name, $pred, block_u8i8);
    };
    (block16_u8i8: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(
            a: crate::dispatch::Acts16,
            w: crate::dispatch::Blocks,
            out: &mut [crate::dispatch::Acc16],
        ) {
            crate::generic::check_block16(&a, &w, out);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above;
            // `check_block16` proved 16 activation rows of `n` rounded up to 64
            // bytes inside `a.data` and every block's groups, 64 columns at a
            // time, inside `w.data`: all `$imp` reads; `out` has one entry per
            // block, all it writes.
            unsafe { $imp(a, w, out) }
        }
        kernel!(@test $name, $pred, block16_u8i8);
    };
    (dequant_i32: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(acc: &[i32], d: crate::dispatch::Dequant<'_>, out: &mut [f32]) {
            crate::generic::check_dequant(acc, &d, out);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above; the
            // body is safe, bounds-checked Rust.
            unsafe { $imp(acc, d, out) }
        }
        kernel!(@test $name, $pred, dequant_i32);
    };
    (qk_f32: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
            crate::generic::check_qk(q, keys, out);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above; the
            // body is safe, bounds-checked Rust.
            unsafe { $imp(q, keys, scale, out) }
        }
        kernel!(@test $name, $pred, qk_f32);
    };
    (pv_f32: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(p: &[f32], scale: f32, vals: &[f32], out: &mut [f32]) {
            crate::generic::check_pv(p, vals, out);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above; the
            // body is safe, bounds-checked Rust.
            unsafe { $imp(p, scale, vals, out) }
        }
        kernel!(@test $name, $pred, pv_f32);
    };
    (qk_q8: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(q: &[i8], keys: &[i8], key_scales: &[f32], scale: f32, out: &mut [f32]) {
            crate::generic::check_qk_q8(q, keys, key_scales, out);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above;
            // `check_qk_q8` proved whole groups of 4 in `q`, a block of as many
            // groups in `keys` and a scale for each of the ≤ 16 scores: all
            // `$imp` reads and writes.
            unsafe { $imp(q, keys, key_scales, scale, out) }
        }
        kernel!(@test $name, $pred, qk_q8);
    };
    (pv_q8: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(w: &[f32], scale: f32, vals: &[i8], out: &mut [f32]) {
            crate::generic::check_pv_q8(w, vals, out);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above;
            // `check_pv_q8` proved at most 16 weights and a whole block of
            // out.len() dimensions in `vals`: all `$imp` reads and writes.
            unsafe { $imp(w, scale, vals, out) }
        }
        kernel!(@test $name, $pred, pv_q8);
    };
    (f16_to_f32: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(src: &[u16], dst: &mut [f32]) {
            crate::generic::check_f16(src, dst);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above, and
            // `check_f16` proved `src` and `dst` equally long: `$imp` reads and
            // writes no further.
            unsafe { $imp(src, dst) }
        }
        kernel!(@test $name, $pred, f16_to_f32);
    };
    (panel_f32: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(xs: &[&[f32]], panel: &[f32], out: &mut [f32]) {
            crate::generic::check_panel(xs, panel, out);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above; the
            // body is safe, bounds-checked Rust.
            unsafe { $imp(xs, panel, out) }
        }
        kernel!(@test $name, $pred, panel_f32);
    };
    (dynamic_params: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(x: &[f32]) -> (f32, u8) {
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above; the
            // body is safe, bounds-checked Rust.
            unsafe { $imp(x) }
        }
        kernel!(@test $name, $pred, dynamic_params);
    };
    (quantize_u8: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(x: &[f32], scale: f32, zero_point: u8, q: &mut [u8]) {
            crate::quant::check_quantize(x, q);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above; the
            // body is safe, bounds-checked Rust.
            unsafe { $imp(x, scale, zero_point, q) }
        }
        kernel!(@test $name, $pred, quantize_u8);
    };
    (quantize_i8: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(x: &[f32], q: &mut [i8]) -> f32 {
            crate::quant::check_quantize_i8(x, q);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above, and
            // `check_quantize_i8` proved `x` and `q` equally long: `$imp` reads
            // and writes no further.
            unsafe { $imp(x, q) }
        }
        kernel!(@test $name, $pred, quantize_i8);
    };
    (layer_norm_f32: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
            crate::nn::check_layer_norm(x, gamma, beta);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above; the
            // body is safe, bounds-checked Rust.
            unsafe { $imp(x, gamma, beta, eps) }
        }
        kernel!(@test $name, $pred, layer_norm_f32);
    };
    (rms_norm_f32: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(x: &mut [f32], gamma: &[f32], eps: f32) {
            crate::nn::check_rms_norm(x, gamma);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above; the
            // body is safe, bounds-checked Rust.
            unsafe { $imp(x, gamma, eps) }
        }
        kernel!(@test $name, $pred, rms_norm_f32);
    };
    (act_f32: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(act: crate::nn::Act, x: &mut [f32]) {
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above; the
            // body is safe, bounds-checked Rust.
            unsafe { $imp(act, x) }
        }
        kernel!(@test $name, $pred, act_f32);
    };
    (softmax_f32: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(x: &mut [f32]) -> f32 {
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above; the
            // body is safe, bounds-checked Rust.
            unsafe { $imp(x) }
        }
        kernel!(@test $name, $pred, softmax_f32);
    };
    (lstm_cell_f32: $(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(gates: &[f32], c: &mut [f32], h: &mut [f32]) {
            crate::nn::check_lstm_cell(gates, c, h);
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` needs were checked just above; the
            // body is safe, bounds-checked Rust.
            unsafe { $imp(gates, c, h) }
        }
        kernel!(@test $name, $pred, lstm_cell_f32);
    };
    (@test $name:ident, $pred:expr, $check:ident) => {
        #[cfg(test)]
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn equals_the_reference() {
                if $pred {
                    crate::check::$check(super::$name);
                } else {
                    eprintln!(concat!(stringify!($name), ": not run, this CPU lacks it"));
                }
            }
        }
    };
}

/// Call `$tile::<B>` with `B = xs.len()` (1–4, checked by the caller), so each
/// batch size gets its own fully unrolled accumulator array, and return its
/// rows in a full `[[i32; TILE_ROWS]; TILE_ACTS]`. Expands to unsafe calls:
/// use inside `unsafe`, with `$tile`'s preconditions met.
#[allow(unused_macros)]
macro_rules! by_batch {
    ($tile:ident, $xs:expr, $n:expr, $w:expr) => {{
        let mut out = [[0; crate::dispatch::TILE_ROWS]; crate::dispatch::TILE_ACTS];
        match $xs.len() {
            1 => out[..1].copy_from_slice(&$tile::<1>($xs, $n, $w)),
            2 => out[..2].copy_from_slice(&$tile::<2>($xs, $n, $w)),
            3 => out[..3].copy_from_slice(&$tile::<3>($xs, $n, $w)),
            _ => out.copy_from_slice(&$tile::<4>($xs, $n, $w)),
        }
        out
    }};
}
