//! Float helpers run once per token and layer: norms, activations, RoPE.
//!
//! Lane-wise Rust that LLVM vectorizes, compiled once per ISA through the
//! kernel table (one token's norm is O(width) against the matrix products'
//! O(width²), but a batch of eight short rows spent 5 % of its step in a
//! norm compiled for baseline SSE2 with its sums in one chain). Tolerances
//! (checked against f64 references in the tests): norms and RoPE 1e-5
//! relative to the row's scale, activations 1e-6 absolute, GELU-erf 1e-6.

/// ONNX `LayerNormalization` over one row, in place:
/// `(x − mean) / sqrt(var + eps) · gamma + beta` (two-pass mean and
/// variance, each sum in 16 lanes folded in a fixed order, so every ISA's
/// copy gives the same bits). The reference of
/// [`crate::Kernels::layer_norm_f32`].
pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    check_layer_norm(x, gamma, beta);
    layer_norm_body(x, gamma, beta, eps)
}

/// Panics unless the parameters are as long as the row (for [`layer_norm`]).
pub fn check_layer_norm(x: &[f32], gamma: &[f32], beta: &[f32]) {
    assert!(
        gamma.len() == x.len() && beta.len() == x.len(),
        "layer norm parameters do not match the row"
    );
}

/// `Σ f(x[i])` in [`LANES`](crate::generic::LANES) lanes: lane `l` sums the
/// elements `≡ l` (mod 16) of the whole chunks, the tail goes to a separate
/// sum, and the lanes fold pairwise (`l + w` into `l`, halving `w`), then the
/// tail is added. Vectorizes without reassociating anything.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    use crate::generic::LANES;
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(0f32, |s, &v| s + f(v));
    for c in chunks {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    fold_lanes(acc) + tail
}

/// The lanes' sum, folded pairwise: lane `l + w` into `l`, halving `w`.
#[inline(always)]
fn fold_lanes(mut acc: [f32; crate::generic::LANES]) -> f32 {
    let mut w = crate::generic::LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// The body of [`layer_norm`], inlined into each ISA's copy.
#[inline(always)]
pub(crate) fn layer_norm_body(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    if x.is_empty() {
        return;
    }
    let n = x.len() as f32;
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, g), b) in x.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inv * g + b;
    }
}

/// RMS norm (Llama's, ONNX `RMSNormalization`) over one row, in place:
/// `x / sqrt(mean(x²) + eps) · gamma`, the sum in lanes as in
/// [`layer_norm`]. The reference of [`crate::Kernels::rms_norm_f32`].
pub fn rms_norm(x: &mut [f32], gamma: &[f32], eps: f32) {
    check_rms_norm(x, gamma);
    rms_norm_body(x, gamma, eps)
}

/// Panics unless the weights are as long as the row (for [`rms_norm`]).
pub fn check_rms_norm(x: &[f32], gamma: &[f32]) {
    assert_eq!(
        gamma.len(),
        x.len(),
        "RMS norm weights do not match the row"
    );
}

/// The body of [`rms_norm`], inlined into each ISA's copy.
#[inline(always)]
pub(crate) fn rms_norm_body(x: &mut [f32], gamma: &[f32], eps: f32) {
    if x.is_empty() {
        return;
    }
    let ms = lane_sum(x, |v| v * v) / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for (v, g) in x.iter_mut().zip(gamma) {
        *v *= inv * g;
    }
}

/// `e^x` in plain arithmetic, so loops over it vectorize (libm's `expf` is a
/// call per element): `x = n·ln2 + r` with |r| ≤ ln2/2, `e^r` by its Taylor
/// polynomial to degree 6 (relative error < 2.5e-7), `2^n` built in the
/// exponent bits. The input is clamped to [-87.3, 88]: below, the result is
/// ~1e-38 instead of going subnormal or 0; above, it stays finite.
#[inline]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.0);
    let n = crate::quant::round_even(x * LOG2E);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^n from the bits of n + 127 + 2^23: its low mantissa bits are n + 127
    // (1..=254), shifted into the exponent. An `as i32` cast would do, but
    // its saturation checks keep LLVM from vectorizing the loops around.
    let scale = f32::from_bits((n + 8_388_735.0).to_bits() << 23);
    p * scale
}

/// `tanh` through [`exp`]: `(e^2x − 1)/(e^2x + 1)`, |x| clamped to 9 (where
/// tanh is 1 in f32). Absolute error < 5e-7, what GELU needs.
#[inline]
pub fn tanh(x: f32) -> f32 {
    let e = exp(2.0 * x.clamp(-9.0, 9.0));
    (e - 1.0) / (e + 1.0)
}

/// Logistic sigmoid, `1 / (1 + e^−x)`, through [`exp`]. Inputs below −80
/// count as −80 (1.8e-35): further down the result would be subnormal.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x.max(-80.0)))
}

/// SiLU (swish), `x · sigmoid(x)`: Llama's MLP gate.
#[inline]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// GELU as ONNX `Gelu` (approximate = "none") and torch's default:
/// `x/2 · (1 + erf(x/√2))`. `1 + erf` comes as `erfc(|x|/√2)` (or 2 minus
/// it) from Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), so there is
/// no cancellation for negative x and no branch or libm call: it vectorizes.
#[inline]
pub fn gelu(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = 1.061_405_4;
    let poly = poly * t - 1.453_152_1;
    let poly = poly * t + 1.421_413_8;
    let poly = poly * t - 0.284_496_74;
    let poly = poly * t + 0.254_829_6;
    // erfc(9) < 4.2e-37: past it, 0, so that neither the product nor the
    // result is ever a subnormal float (see `NUMERATOR_FLOOR`).
    let e = exp(-(z * z).min(81.0));
    let erfc = if z < 9.0 { poly * t * e } else { 0.0 };
    let one_plus_erf = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * one_plus_erf
}

/// GELU with the tanh approximation (GPT-2's `gelu_new`, ONNX `Gelu`
/// approximate = "tanh").
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/π)
    0.5 * x * (1.0 + tanh(C * (x + 0.044_715 * x * x * x)))
}

/// Apply `f` to every element.
#[inline]
pub fn map_inplace(x: &mut [f32], f: impl Fn(f32) -> f32) {
    for v in x {
        *v = f(*v);
    }
}

/// An element-wise activation, for [`crate::Kernels::act_f32`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Act {
    /// [`gelu`].
    Gelu,
    /// [`gelu_tanh`].
    GeluTanh,
    /// [`silu`].
    Silu,
    /// [`sigmoid`].
    Sigmoid,
    /// [`tanh`].
    Tanh,
}

impl Act {
    /// Every activation (for tests).
    pub const ALL: [Act; 5] = [Act::Gelu, Act::GeluTanh, Act::Silu, Act::Sigmoid, Act::Tanh];

    /// The activation of one value.
    #[inline]
    pub fn of(self, x: f32) -> f32 {
        match self {
            Act::Gelu => gelu(x),
            Act::GeluTanh => gelu_tanh(x),
            Act::Silu => silu(x),
            Act::Sigmoid => sigmoid(x),
            Act::Tanh => tanh(x),
        }
    }
}

/// Apply `act` to every element, in place: the reference of
/// [`crate::Kernels::act_f32`], whose SIMD copies compile this same code.
pub fn act_f32(act: Act, x: &mut [f32]) {
    act_body(act, x)
}

/// The body of [`act_f32`]: one loop per activation, each inlined and
/// vectorized for the caller's target features.
#[inline(always)]
pub(crate) fn act_body(act: Act, x: &mut [f32]) {
    match act {
        Act::Gelu => map_inplace(x, gelu),
        Act::GeluTanh => map_inplace(x, gelu_tanh),
        Act::Silu => map_inplace(x, silu),
        Act::Sigmoid => map_inplace(x, sigmoid),
        Act::Tanh => map_inplace(x, tanh),
    }
}

/// The ONNX `LSTM` cell (activations sigmoid, tanh, tanh; no peepholes) for
/// `c.len()` units: `gates` holds their pre-activations `i`, `o`, `f`, `z`
/// (the candidate), `c.len()` each in that order; the cell state `c` is
/// updated in place and the new hidden state written to `h`:
/// `c ← σ(f)·c + σ(i)·tanh(z)`, `h ← σ(o)·tanh(c)`. The reference of
/// [`crate::Kernels::lstm_cell_f32`].
pub fn lstm_cell_f32(gates: &[f32], c: &mut [f32], h: &mut [f32]) {
    check_lstm_cell(gates, c, h);
    lstm_cell_body(gates, c, h)
}

/// Panics unless `gates` holds four values per unit and `h` one.
pub fn check_lstm_cell(gates: &[f32], c: &[f32], h: &[f32]) {
    assert!(
        gates.len() == 4 * c.len() && h.len() == c.len(),
        "an LSTM cell takes 4 gate values, a cell state and a hidden state per unit"
    );
}

/// The body of [`lstm_cell_f32`], vectorized across units.
#[inline(always)]
pub(crate) fn lstm_cell_body(gates: &[f32], c: &mut [f32], h: &mut [f32]) {
    let u = c.len();
    let (i, rest) = gates.split_at(u);
    let (o, rest) = rest.split_at(u);
    let (f, z) = rest.split_at(u);
    let units = c
        .iter_mut()
        .zip(h.iter_mut())
        .zip(i.iter().zip(o))
        .zip(f.iter().zip(z));
    for (((c, h), (&i, &o)), (&f, &z)) in units {
        let cn = sigmoid(f) * *c + sigmoid(i) * tanh(z);
        *c = cn;
        *h = sigmoid(o) * tanh(cn);
    }
}

/// Softmax numerators in place, `x ← e^(x − max x)`, returning their sum;
/// the caller divides (attention folds `1/sum` into its value sum). The max
/// and the sum run in 16 lanes folded in a fixed order, so every ISA's
/// copy gives the same bits. An empty slice sums to 0.
pub fn softmax_f32(x: &mut [f32]) -> f32 {
    softmax_body(x)
}

/// Below this, a softmax numerator is 0 rather than `e^d` (< 1.6e-28, so
/// nothing a sum with the maximum's 1 can hold). `exp` alone stops at ~1e-38,
/// and that times a probability scale and a value is a subnormal float: each
/// one costs a microcode assist on x86, which made attention's weighted sum
/// 3× slower in a real prefill.
const NUMERATOR_FLOOR: f32 = -64.0;

#[inline(always)]
fn numerator(d: f32) -> f32 {
    let e = exp(d);
    if d >= NUMERATOR_FLOOR {
        e
    } else {
        0.0
    }
}

/// The body of [`softmax_f32`].
#[inline(always)]
pub(crate) fn softmax_body(x: &mut [f32]) -> f32 {
    use crate::generic::LANES;
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    for c in chunks {
        for l in 0..LANES {
            m[l] = m[l].max(c[l]);
        }
    }
    for v in m {
        max = max.max(v);
    }
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = numerator(c[l] - max);
            acc[l] += c[l];
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = numerator(*v - max);
        tail += *v;
    }
    fold_lanes(acc) + tail
}

/// Which dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// `(i, i + d/2)`: Hugging Face Llama's `rotate_half`, GPT-NeoX.
    Half,
    /// `(2i, 2i + 1)`: GPT-J, Meta's original Llama.
    Interleaved,
}

/// Rotary position embedding with precomputed angles for positions
/// `0..max_pos`: `θ_i = pos · base^(−2i/d)`.
#[derive(Debug, Clone)]
pub struct Rope {
    dim: usize,
    max_pos: usize,
    layout: RopeLayout,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for heads of `dim` (even) values, positions below `max_pos`.
    pub fn new(dim: usize, max_pos: usize, base: f32, layout: RopeLayout) -> Rope {
        assert!(
            dim > 0 && dim.is_multiple_of(2),
            "RoPE needs an even head size, got {dim}"
        );
        let half = dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for pos in 0..max_pos {
            for i in 0..half {
                // Angles in f64: position × frequency loses precision in f32 at long contexts.
                let freq = (base as f64).powf(-2.0 * i as f64 / dim as f64);
                let a = pos as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Rope {
            dim,
            max_pos,
            layout,
            cos,
            sin,
        }
    }

    /// Head size.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rotate every head in `x` (a whole number of heads) for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        assert!(
            pos < self.max_pos,
            "position {pos} beyond the RoPE table ({})",
            self.max_pos
        );
        assert!(
            x.len().is_multiple_of(self.dim),
            "{} values are not whole heads of {}",
            x.len(),
            self.dim
        );
        let half = self.dim / 2;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(self.dim) {
            match self.layout {
                RopeLayout::Half => {
                    let (a, b) = head.split_at_mut(half);
                    for i in 0..half {
                        let (x0, x1) = (a[i], b[i]);
                        a[i] = x0 * cos[i] - x1 * sin[i];
                        b[i] = x1 * cos[i] + x0 * sin[i];
                    }
                }
                RopeLayout::Interleaved => {
                    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (x0, x1) = (pair[0], pair[1]);
                        pair[0] = x0 * cos[i] - x1 * sin[i];
                        pair[1] = x1 * cos[i] + x0 * sin[i];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exp_and_tanh_against_std() {
        let mut x = -86.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), (x as f64).exp());
            let rel = ((got as f64 - want) / want).abs();
            assert!(rel < 2.5e-7, "exp({x}) = {got}, want {want} ({rel:e})");
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 2e-38);
        assert!(exp(1000.0).is_finite());
        let mut x = -12.0f32;
        while x < 12.0 {
            let d = (tanh(x) as f64 - (x as f64).tanh()).abs();
            assert!(d < 5e-7, "tanh({x}): {d:e}");
            x += 0.001;
        }
    }

    #[test]
    fn magic_rounding_is_ties_to_even() {
        for i in -600_000..600_000 {
            let x = i as f32 / 2048.0; // halves, quarters and more in ±293
            assert_eq!(crate::quant::round_even(x), x.round_ties_even(), "{x}");
        }
    }

    fn row() -> impl Strategy<Value = Vec<f32>> {
        proptest::collection::vec(-20f32..20.0, 1..300)
    }

    fn scale(x: &[f32]) -> f64 {
        x.iter().fold(1.0f64, |m, v| m.max(v.abs() as f64))
    }

    proptest! {
        #[test]
        fn layer_norm_matches_f64(x in row(), g in -2f32..2.0, b in -1f32..1.0) {
            let n = x.len();
            let (gamma, beta) = (vec![g; n], vec![b; n]);
            let mut y = x.clone();
            layer_norm(&mut y, &gamma, &beta, 1e-5);
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            for (i, &v) in x.iter().enumerate() {
                let want = (v as f64 - mean) / (var + 1e-5).sqrt() * g as f64 + b as f64;
                prop_assert!((y[i] as f64 - want).abs() <= 1e-5 * scale(&y).max(1.0) * 10.0, "{} vs {}", y[i], want);
            }
        }

        #[test]
        fn rms_norm_matches_f64(x in row(), g in -2f32..2.0) {
            let n = x.len();
            let mut y = x.clone();
            rms_norm(&mut y, &vec![g; n], 1e-6);
            let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
            for (i, &v) in x.iter().enumerate() {
                let want = v as f64 / (ms + 1e-6).sqrt() * g as f64;
                prop_assert!((y[i] as f64 - want).abs() <= 1e-5 * scale(&y).max(1.0), "{} vs {}", y[i], want);
            }
        }

        #[test]
        fn activations_match_f64(v in -30f32..30.0) {
            let x = v as f64;
            let sig = 1.0 / (1.0 + (-x).exp());
            prop_assert!((sigmoid(v) as f64 - sig).abs() <= 1e-6);
            prop_assert!((silu(v) as f64 - x * sig).abs() <= 1e-6 * x.abs().max(1.0));
            let ge = 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            prop_assert!((gelu(v) as f64 - ge).abs() <= 1e-6 * x.abs().max(1.0));
            let gt = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            prop_assert!((gelu_tanh(v) as f64 - gt).abs() <= 1e-6 * x.abs().max(1.0));
            prop_assert!((tanh(v) as f64 - x.tanh()).abs() <= 1e-6);
            for act in Act::ALL {
                let mut one = [v];
                act_f32(act, &mut one);
                prop_assert_eq!(one[0].to_bits(), act.of(v).to_bits());
            }
        }

        #[test]
        fn softmax_matches_f64(x in proptest::collection::vec(-80f32..80.0, 0..100)) {
            let mut y = x.clone();
            let sum = softmax_f32(&mut y);
            // The difference is rounded to f32 as the kernel rounds it; what
            // is checked is the exponential and the sum.
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let want: Vec<f64> = x.iter().map(|&v| ((v - max) as f64).exp()).collect();
            let ws: f64 = want.iter().sum();
            prop_assert!((sum as f64 - ws).abs() <= 1e-6 * ws.max(1.0), "{} vs {}", sum, ws);
            for (g, w) in y.iter().zip(&want) {
                let floored = *g == 0.0 && *w < 1.7e-28;
                prop_assert!(floored || (*g as f64 - w).abs() <= 3e-7 * w, "{} vs {}", g, w);
                prop_assert!(!g.is_subnormal());
            }
        }

        #[test]
        fn rope_matches_f64(heads in 1usize..4, half in 1usize..33, pos in 0usize..2048, seed in any::<u64>(), interleaved in any::<bool>()) {
            let dim = 2 * half;
            let layout = if interleaved { RopeLayout::Interleaved } else { RopeLayout::Half };
            let rope = Rope::new(dim, 2048, 10000.0, layout);
            let x: Vec<f32> = (0..heads * dim).map(|i| ((i as u64 + 1).wrapping_mul(seed | 1) % 1000) as f32 / 250.0 - 2.0).collect();
            let mut y = x.clone();
            rope.apply(&mut y, pos);
            for h in 0..heads {
                for i in 0..half {
                    let (a, b) = match layout { RopeLayout::Half => (i, i + half), RopeLayout::Interleaved => (2 * i, 2 * i + 1) };
                    let ang = pos as f64 * 10000f64.powf(-2.0 * i as f64 / dim as f64);
                    let (x0, x1) = (x[h * dim + a] as f64, x[h * dim + b] as f64);
                    let (w0, w1) = (x0 * ang.cos() - x1 * ang.sin(), x1 * ang.cos() + x0 * ang.sin());
                    prop_assert!((y[h * dim + a] as f64 - w0).abs() <= 1e-5 * 4.0);
                    prop_assert!((y[h * dim + b] as f64 - w1).abs() <= 1e-5 * 4.0);
                }
            }
        }
    }

    /// Subnormal floats cost a microcode assist each on x86: no activation
    /// makes one, wherever its input lies.
    #[test]
    fn activations_never_return_subnormals() {
        let mut v = -300.0f32;
        while v < 300.0 {
            for act in Act::ALL {
                assert!(!act.of(v).is_subnormal(), "{act:?}({v}) = {:e}", act.of(v));
            }
            v += 0.01;
        }
    }

    /// The cell against its definition in f64 (ONNX LSTM, gates i, o, f, c).
    #[test]
    fn lstm_cell_follows_the_onnx_equations() {
        for units in [1, 5, 16, 33] {
            let g: Vec<f32> = (0..4 * units)
                .map(|i| (i as f32 * 0.37).sin() * 3.0)
                .collect();
            let mut c: Vec<f32> = (0..units).map(|u| u as f32 * 0.1 - 0.8).collect();
            let c0 = c.clone();
            let mut h = vec![0f32; units];
            lstm_cell_f32(&g, &mut c, &mut h);
            let s = |x: f32| 1.0 / (1.0 + (-(x as f64)).exp());
            for u in 0..units {
                let (i, o, f) = (s(g[u]), s(g[units + u]), s(g[2 * units + u]));
                let z = (g[3 * units + u] as f64).tanh();
                let cn = f * c0[u] as f64 + i * z;
                assert!((c[u] as f64 - cn).abs() < 1e-6, "c[{u}]");
                assert!((h[u] as f64 - o * cn.tanh()).abs() < 1e-6, "h[{u}]");
            }
        }
    }

    #[test]
    fn position_zero_is_the_identity() {
        let rope = Rope::new(8, 4, 10000.0, RopeLayout::Half);
        let mut x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let before = x.clone();
        rope.apply(&mut x, 0);
        assert_eq!(x, before);
    }
}
