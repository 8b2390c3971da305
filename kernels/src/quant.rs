//! Quantization with onnxruntime's semantics.

/// Round half to even, as ONNX's quantization ops specify, for |x| < 2²².
///
/// Adding and removing 1.5·2²³ leaves no fraction bits, so the FPU rounds in
/// its default mode, which is ties-to-even: the same result as
/// `f32::round_ties_even`, but plain arithmetic. (Baseline x86_64 has no
/// rounding instruction, so `round_ties_even` is a libm call per element
/// and the loops around it do not vectorize.) Callers keep |x| ≤ 255.
#[inline]
pub(crate) fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    debug_assert!(x.is_nan() || x.abs() < 4_194_304.0, "{x} out of range");
    (x + MAGIC) - MAGIC
}

/// Quantize `x` to u8 like ONNX `DynamicQuantizeLinear`: the range is widened
/// to include 0, `scale = (max - min) / 255`, `zero_point = round(-min / scale)`
/// clamped to [0, 255], `q = clamp(round(x / scale) + zero_point)`, rounding
/// half to even. Returns `(scale, zero_point)`; an all-zero input gives scale 0
/// and all-zero output (onnxruntime's behaviour).
pub fn dynamic_quantize_u8(x: &[f32], q: &mut [u8]) -> (f32, u8) {
    assert_eq!(x.len(), q.len(), "input and output lengths differ");
    let (scale, zp) = dynamic_params(x);
    quantize_u8(x, scale, zp, q);
    (scale, zp)
}

/// The `(scale, zero_point)` [`dynamic_quantize_u8`] chooses for `x`, for
/// quantizing a part of a tensor as onnxruntime quantizes the whole of it.
pub fn dynamic_params(x: &[f32]) -> (f32, u8) {
    dynamic_params_body(x)
}

/// The body of [`dynamic_params`], inlined into each ISA's copy
/// ([`crate::Kernels::dynamic_params`]).
#[inline(always)]
pub(crate) fn dynamic_params_body(x: &[f32]) -> (f32, u8) {
    // 16 independent lanes, compared with `<`/`>` (f32::min/max's NaN rules
    // keep LLVM from vectorizing); the range includes 0 as ONNX specifies.
    const L: usize = 16;
    let (mut lo, mut hi) = ([0f32; L], [0f32; L]);
    let chunks = x.chunks_exact(L);
    for &v in chunks.remainder() {
        lo[0] = if v < lo[0] { v } else { lo[0] };
        hi[0] = if v > hi[0] { v } else { hi[0] };
    }
    for c in chunks {
        for l in 0..L {
            lo[l] = if c[l] < lo[l] { c[l] } else { lo[l] };
            hi[l] = if c[l] > hi[l] { c[l] } else { hi[l] };
        }
    }
    let lo = lo.iter().fold(0f32, |m, &v| if v < m { v } else { m });
    let hi = hi.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    params_of_range(lo, hi)
}

/// `(scale, zero_point)` of a tensor whose values span `lo ≤ 0 ≤ hi`.
/// Min and max are exact and do not depend on the order the values are
/// seen in, so an ISA's copy that finds them its own way and ends here gives
/// the reference's bits.
#[inline(always)]
pub(crate) fn params_of_range(lo: f32, hi: f32) -> (f32, u8) {
    let scale = (hi - lo) / 255.0;
    if scale == 0.0 {
        return (0.0, 0);
    }
    // -lo/scale lies in [0, 255] (the range spans 255 steps and includes 0).
    (
        scale,
        round_even((0.0 - lo) / scale).clamp(0.0, 255.0) as u8,
    )
}

/// `q = clamp(round(x / scale) + zero_point)` with parameters from
/// [`dynamic_params`] of `x` or of a tensor holding it; scale 0 gives zeros.
pub fn quantize_u8(x: &[f32], scale: f32, zero_point: u8, q: &mut [u8]) {
    check_quantize(x, q);
    quantize_u8_body(x, scale, zero_point, q)
}

/// Panics unless `x` and `q` have one length (for [`quantize_u8`]).
pub fn check_quantize(x: &[f32], q: &[u8]) {
    assert_eq!(x.len(), q.len(), "input and output lengths differ");
}

/// The body of [`quantize_u8`], inlined into each ISA's copy
/// ([`crate::Kernels::quantize_u8`]): a division per value, as ONNX specifies,
/// which wide vectors make cheap.
#[inline(always)]
pub(crate) fn quantize_u8_body(x: &[f32], scale: f32, zero_point: u8, q: &mut [u8]) {
    if scale == 0.0 {
        q.fill(0);
        return;
    }
    let zp = zero_point as f32;
    for (o, &v) in q.iter_mut().zip(x) {
        // x/scale lies in [-255, 255] for x inside the range. Clamped and
        // integral, the value is the low byte of its bits once 2²³ is added
        // (a NaN gives 0, as `as u8` would). A float-to-int cast instead
        // checks each lane for NaN and overflow, which keeps this scalar.
        let r = (round_even(v / scale) + zp).clamp(0.0, 255.0);
        *o = (r + 8_388_608.0).to_bits() as u8;
    }
}

/// Symmetric int8 quantization of one row (a head's key or value at one
/// position in an int8 KV cache): `scale = max |x| / 127`, an infinity
/// taken as 1e38 (not f32::MAX: 127 times the scale must stay finite when
/// read) and NaNs ignored; `q = x / scale` rounded half away from zero and
/// clamped to ±127, a NaN stored as 0; a zero scale stores zeros. Returns
/// the scale. Each ISA's copy ([`crate::Kernels::quantize_i8`]) stores
/// these bytes: a cache written on one machine reads the same on another.
pub fn quantize_i8(x: &[f32], q: &mut [i8]) -> f32 {
    check_quantize_i8(x, q);
    let scale = i8_scale(x.iter().fold(0f32, |m, v| m.max(v.abs())));
    for (q, &v) in q.iter_mut().zip(x) {
        *q = to_i8(v, scale);
    }
    scale
}

/// Panics unless `x` and `q` have one length (for [`quantize_i8`]).
pub fn check_quantize_i8(x: &[f32], q: &[i8]) {
    assert_eq!(x.len(), q.len(), "input and output lengths differ");
}

/// [`quantize_i8`]'s scale for a row whose largest magnitude (NaNs left
/// out) is `max_abs`.
#[inline(always)]
pub(crate) fn i8_scale(max_abs: f32) -> f32 {
    max_abs.min(1e38) / 127.0
}

/// One value of [`quantize_i8`] at `scale`.
#[inline(always)]
pub(crate) fn to_i8(v: f32, scale: f32) -> i8 {
    if scale == 0.0 {
        return 0;
    }
    // Half away from zero without libm's roundf: |v / scale| ≤ 127 (to
    // rounding), and `as` truncates toward zero and saturates (NaN to 0).
    let r = v / scale;
    ((r + 0.5f32.copysign(r)) as i8).max(-127)
}

/// Per-row symmetric int8 weight quantization: row `r` of `w` (`rows × cols`,
/// row-major) becomes `q[r] = round(w[r] / s[r])` with `s[r] = max|w[r]| / 127`.
pub fn quantize_rows_i8(w: &[f32], cols: usize, q: &mut [i8], scales: &mut [f32]) {
    assert!(
        cols > 0 && w.len().is_multiple_of(cols),
        "weights are not rows of {cols}"
    );
    assert_eq!(w.len(), q.len());
    assert_eq!(w.len() / cols, scales.len());
    for ((row, qrow), s) in w
        .chunks(cols)
        .zip(q.chunks_mut(cols))
        .zip(scales.iter_mut())
    {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        *s = if max > 0.0 { max / 127.0 } else { 0.0 };
        for (o, &v) in qrow.iter_mut().zip(row) {
            *o = if *s > 0.0 {
                round_even(v / *s).clamp(-127.0, 127.0) as i8
            } else {
                0
            };
        }
    }
}

/// `(q - zero_point) · scale`.
pub fn dequantize_u8(q: &[u8], scale: f32, zero_point: u8, out: &mut [f32]) {
    assert_eq!(q.len(), out.len());
    for (o, &v) in out.iter_mut().zip(q) {
        *o = (v as i32 - zero_point as i32) as f32 * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dynamic_quantize_matches_the_onnx_reference_example() {
        // The example of the ONNX operator documentation for DynamicQuantizeLinear.
        let x = [0.0f32, 2.0, -3.0, -2.5, 1.34, 0.5];
        let mut q = [0u8; 6];
        let (scale, zp) = dynamic_quantize_u8(&x, &mut q);
        assert!((scale - 0.019_607_844).abs() < 1e-9, "{scale}");
        assert_eq!(zp, 153);
        assert_eq!(q, [153, 255, 0, 26, 221, 179]); // 0.5 / scale = 25.5 rounds to even 26
        let x = [-1.0f32, -2.1, -1.3, -2.5, -3.34, -4.0];
        let (scale, zp) = dynamic_quantize_u8(&x, &mut q);
        assert!((scale - 0.015_686_275).abs() < 1e-9, "{scale}");
        assert_eq!(zp, 255);
        assert_eq!(q, [191, 121, 172, 96, 42, 0]);
    }

    proptest! {
        /// The lane-wise range equals the plain fold over the values and 0.
        #[test]
        fn dynamic_params_take_the_whole_range(x in proptest::collection::vec(-50f32..50.0, 0..300)) {
            let lo = x.iter().fold(0f32, |m, &v| m.min(v));
            let hi = x.iter().fold(0f32, |m, &v| m.max(v));
            let (scale, zp) = dynamic_params(&x);
            prop_assert_eq!(scale, (hi - lo) / 255.0);
            if scale > 0.0 {
                prop_assert_eq!(zp, round_even((0.0 - lo) / scale).clamp(0.0, 255.0) as u8);
            }
        }

        #[test]
        fn dequantized_values_are_within_half_a_step(x in proptest::collection::vec(-50f32..50.0, 1..200)) {
            let mut q = vec![0u8; x.len()];
            let (scale, zp) = dynamic_quantize_u8(&x, &mut q);
            let mut back = vec![0f32; x.len()];
            dequantize_u8(&q, scale, zp, &mut back);
            for (a, b) in x.iter().zip(&back) {
                prop_assert!((a - b).abs() <= scale * 0.5 + scale * 1e-3 + 1e-6, "{a} -> {b} (scale {scale})");
            }
        }

        #[test]
        fn row_quantization_keeps_each_row_within_half_a_step(w in proptest::collection::vec(-2f32..2.0, 12..=12)) {
            let mut q = vec![0i8; 12];
            let mut s = vec![0f32; 3];
            quantize_rows_i8(&w, 4, &mut q, &mut s);
            for r in 0..3 {
                for c in 0..4 {
                    let back = q[r * 4 + c] as f32 * s[r];
                    prop_assert!((back - w[r * 4 + c]).abs() <= s[r] * 0.5 + 1e-6);
                }
            }
        }
    }

    #[test]
    fn all_zero_input_gives_zero_scale() {
        let mut q = [7u8; 3];
        assert_eq!(dynamic_quantize_u8(&[0.0; 3], &mut q), (0.0, 0));
        assert_eq!(q, [0, 0, 0]);
    }
}
