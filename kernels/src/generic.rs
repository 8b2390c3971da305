//! Scalar reference implementations. Always compiled; every SIMD kernel is
//! tested against these.

use crate::dispatch::{
    Acc16, Acts16, Block64, Blocks, Rows4, BLOCK_GROUP, BLOCK_ROWS, TILE16_ACTS, TILE_ACTS,
    TILE_ROWS,
};

/// Longest dot product whose i32 sum cannot overflow (255 · 128 · 2^16 < 2^31).
pub const MAX_DOT_LEN: usize = 1 << 16;

/// Panics unless `a` and `b` are operands of a dot product: equal lengths, at
/// most [`MAX_DOT_LEN`]. Every dot kernel's safe wrapper calls it.
pub fn check_dot<A, B>(a: &[A], b: &[B]) {
    assert_eq!(a.len(), b.len(), "dot product of unequal lengths");
    assert!(
        a.len() <= MAX_DOT_LEN,
        "dot product longer than MAX_DOT_LEN"
    );
}

/// Panics unless `xs` and `w` are operands of a [`TileFn`](crate::TileFn):
/// 1–4 activation vectors of equal length `n` ≤ `min(stride, MAX_DOT_LEN)`,
/// and four rows present (`3 · stride + n` bytes). Returns `n`.
pub fn check_tile(xs: &[&[u8]], w: &Rows4) -> usize {
    let n = check_acts(xs);
    assert!(
        n <= w.stride && n <= MAX_DOT_LEN,
        "activation length {n} exceeds the row stride {} or MAX_DOT_LEN",
        w.stride
    );
    assert!(
        w.data.len() >= 3 * w.stride + n,
        "a tile needs four rows of weights"
    );
    n
}

/// `Σ a[i]·b[i]` of u8 activations and i8 weights, exact in i32.
pub fn dot_u8i8(a: &[u8], b: &[i8]) -> i32 {
    check_dot(a, b);
    a.iter().zip(b).map(|(&x, &w)| x as i32 * w as i32).sum()
}

/// `Σ a[i]·b[i]` of i8 operands, exact in i32.
pub fn dot_i8i8(a: &[i8], b: &[i8]) -> i32 {
    check_dot(a, b);
    a.iter().zip(b).map(|(&x, &w)| x as i32 * w as i32).sum()
}

/// The reference micro-kernel: one [`dot_u8i8`] per (activation, row).
pub fn tile_u8i8(xs: &[&[u8]], w: Rows4) -> [[i32; TILE_ROWS]; TILE_ACTS] {
    let n = check_tile(xs, &w);
    let mut out = [[0; TILE_ROWS]; TILE_ACTS];
    for (o, x) in out.iter_mut().zip(xs) {
        for (r, v) in o.iter_mut().enumerate() {
            *v = dot_u8i8(x, &w.data[r * w.stride..r * w.stride + n]);
        }
    }
    out
}

/// Panics unless `xs` are 1–4 activation vectors of equal length; returns it.
fn check_acts(xs: &[&[u8]]) -> usize {
    assert!(
        (1..=TILE_ACTS).contains(&xs.len()),
        "a micro-kernel takes 1 to {TILE_ACTS} activation vectors, got {}",
        xs.len()
    );
    let n = xs[0].len();
    assert!(
        xs.iter().all(|x| x.len() == n),
        "activation vectors of unequal lengths"
    );
    n
}

/// Panics unless `xs` and `w` are operands of a [`BlockFn`](crate::BlockFn):
/// 1–4 activation vectors of equal length `n` ≤ `MAX_DOT_LEN`, and the
/// block's first `n.div_ceil(4)` groups present. Returns `n`.
pub fn check_block(xs: &[&[u8]], w: &Block64) -> usize {
    let n = check_acts(xs);
    assert!(
        n <= MAX_DOT_LEN,
        "activation length {n} exceeds MAX_DOT_LEN"
    );
    assert!(
        w.data.len() >= n.div_ceil(4) * BLOCK_GROUP,
        "a block of {n} columns needs {} bytes of weights, got {}",
        n.div_ceil(4) * BLOCK_GROUP,
        w.data.len()
    );
    n
}

/// The reference block micro-kernel: each (activation, row) summed column by
/// column from the interleaved layout.
pub fn block_u8i8(xs: &[&[u8]], w: Block64) -> [[i32; BLOCK_ROWS]; TILE_ACTS] {
    check_block(xs, &w);
    let mut out = [[0; BLOCK_ROWS]; TILE_ACTS];
    for (o, x) in out.iter_mut().zip(xs) {
        for (c, &xc) in x.iter().enumerate() {
            let group = &w.data[(c / 4) * BLOCK_GROUP..];
            for (r, v) in o.iter_mut().enumerate() {
                *v += xc as i32 * group[r * 4 + c % 4] as i32;
            }
        }
    }
    out
}

/// Panics unless `a` and `w` are operands of a [`Block16Fn`](crate::Block16Fn)
/// that reads 64 columns at a time: 1 or 2 groups; `1 ≤ n ≤ MAX_DOT_LEN`; 16 rows per group of
/// `n.next_multiple_of(64)` bytes inside `a.data`, zero past column `n`; block
/// strides of whole groups holding `n` columns; and the last block's
/// `n.next_multiple_of(64) / 4` groups inside `w.data`; one output per block
/// and group of 16 activations.
pub fn check_block16(a: &Acts16, w: &Blocks, out: &[Acc16]) {
    assert!(
        a.tiles == 1 || a.tiles == crate::dispatch::MAX_TILES16,
        "{} groups of activations",
        a.tiles
    );
    assert_eq!(
        out.len(),
        w.count * a.tiles,
        "one output per block and group"
    );
    let rows = TILE16_ACTS * a.tiles;
    let n = a.n;
    assert!(
        (1..=MAX_DOT_LEN).contains(&n),
        "activation length {n} out of range"
    );
    let wide = n.next_multiple_of(64);
    assert!(
        a.stride >= wide,
        "activation stride {} under {wide}",
        a.stride
    );
    assert!(
        a.data.len() >= (rows - 1) * a.stride + wide,
        "{rows} activation rows need {} bytes, got {}",
        (rows - 1) * a.stride + wide,
        a.data.len()
    );
    for t in 0..rows {
        assert!(
            a.data[t * a.stride + n..t * a.stride + wide]
                .iter()
                .all(|&v| v == 0),
            "activation row {t} is not zero past column {n}"
        );
    }
    assert!(
        w.stride.is_multiple_of(BLOCK_GROUP) && w.stride >= n.div_ceil(4) * BLOCK_GROUP,
        "block stride {} does not hold {n} columns in whole groups",
        w.stride
    );
    if w.count > 0 {
        let need = (w.count - 1) * w.stride + wide / 4 * BLOCK_GROUP;
        assert!(
            w.data.len() >= need,
            "{} blocks read 64 columns at a time need {need} bytes, got {}",
            w.count,
            w.data.len()
        );
    }
}

/// The reference matrix micro-kernel: [`block_u8i8`] on four groups of four
/// activations, block by block.
pub fn block16_u8i8(a: Acts16, w: Blocks, out: &mut [Acc16]) {
    check_block16(&a, &w, out);
    let n = a.n;
    for (i, acc) in out.iter_mut().enumerate() {
        let (b, g) = (i / a.tiles, i % a.tiles);
        let block = Block64 {
            data: &w.data[b * w.stride..b * w.stride + n.div_ceil(4) * BLOCK_GROUP],
            sums: None,
        };
        for (q, quarter) in acc.chunks_mut(TILE_ACTS).enumerate() {
            let rows: [&[u8]; TILE_ACTS] = std::array::from_fn(|j| {
                &a.data[(g * TILE16_ACTS + q * TILE_ACTS + j) * a.stride..][..n]
            });
            quarter.copy_from_slice(&block_u8i8(&rows, block));
        }
    }
}

/// Index of the largest value, the lowest index on ties; 0 for an empty slice.
/// NaNs are never selected unless every value is NaN.
///
/// Greedy decoding calls it on every logit row (a batch of 8 sequences on a
/// 4096-token vocabulary: 32K values a step), so it is written to vectorize
/// on every target without `unsafe`: the largest non-NaN value first, in
/// 32 independent lanes (a comparison with NaN is false, so
/// NaN never enters a lane), then the first index holding it. A loop that
/// carries the best index from element to element runs at its compare's
/// latency instead (6 % of a batched step in `perf` before this).
pub fn argmax(x: &[f32]) -> usize {
    let mut lanes = [f32::NEG_INFINITY; ARGMAX_LANES];
    let chunks = x.chunks_exact(ARGMAX_LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    for (m, &v) in lanes.iter_mut().zip(tail) {
        *m = if v > *m { v } else { *m };
    }
    let best = lanes
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    // `==` also matches -0.0 to 0.0: the first of either, as the running
    // comparison `v > best` would keep. No match: all NaN (or empty).
    x.iter().position(|&v| v == best).unwrap_or(0)
}

/// Independent maxima [`argmax`] keeps: two AVX-512 registers, four of AVX2,
/// eight of NEON, so the comparisons do not wait on each other.
const ARGMAX_LANES: usize = 32;

/// (max, Σ exp(x - max)), the sum accumulated in f64.
fn max_and_sum(x: &[f32]) -> (f32, f64) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return (max, 0.0);
    }
    (max, x.iter().map(|&v| ((v - max) as f64).exp()).sum())
}

/// `(max, ln Σ exp(x))`, computed stably (accumulated in f64).
pub fn log_sum_exp(x: &[f32]) -> (f32, f32) {
    let (max, sum) = max_and_sum(x);
    if sum == 0.0 {
        return (max, max);
    }
    (max, max + sum.ln() as f32)
}

/// Replace logits by probabilities.
pub fn softmax_inplace(x: &mut [f32]) {
    let (max, sum) = max_and_sum(x);
    for v in x.iter_mut() {
        *v = (((*v - max) as f64).exp() / sum) as f32;
    }
}

/// Replace logits by log-probabilities.
pub fn log_softmax_inplace(x: &mut [f32]) {
    let (max, sum) = max_and_sum(x);
    let ln = sum.ln() as f32;
    for v in x.iter_mut() {
        *v = (*v - max) - ln;
    }
}

/// Panics unless `keys` is a transposed block, `q.len()` rows of
/// [`KEY_BLOCK`], and `out` asks for at most [`KEY_BLOCK`] scores (for [`qk_f32`]).
pub fn check_qk<T>(q: &[f32], keys: &[T], out: &[f32]) {
    assert_eq!(
        keys.len(),
        q.len() * KEY_BLOCK,
        "keys are not q.len() rows of KEY_BLOCK"
    );
    assert!(out.len() <= KEY_BLOCK, "more scores than keys in a block");
}

/// Panics unless the correction's row slices (and bias) are as long as
/// `acc` and `out` (for [`dequant_i32`]).
pub fn check_dequant(acc: &[i32], d: &crate::dispatch::Dequant<'_>, out: &[f32]) {
    let n = out.len();
    assert!(
        acc.len() == n && d.row_sums.len() == n && d.row_scales.len() == n,
        "sums, row sums and row scales differ in length from the output"
    );
    if let Some(b) = d.bias {
        assert_eq!(b.len(), n, "one bias per output row");
    }
}

/// The quantization correction of a product's exact sums, per row `t`:
/// `out[t] = (acc[t] − zp · row_sums[t]) as f32 · (scale · row_scales[t]) (+ bias[t])`.
/// Every GEMV/GEMM result goes through it (for each block of 64 rows and
/// activation), so it is dispatched like the products: a decode step of the
/// SmolLM-135M-shaped model corrects ~200K values, and compiled for baseline
/// x86_64 the 32-bit multiply alone takes SSE2's two-step `pmuludq`. The
/// same lane-wise code on every ISA (no FMA contraction in Rust), so results
/// agree bit for bit.
pub fn dequant_i32(acc: &[i32], d: crate::dispatch::Dequant<'_>, out: &mut [f32]) {
    check_dequant(acc, &d, out);
    dequant_body(acc, d, out)
}

/// The body of [`dequant_i32`], shared with the ISA copies.
#[inline(always)]
pub(crate) fn dequant_body(acc: &[i32], d: crate::dispatch::Dequant<'_>, out: &mut [f32]) {
    let n = out.len();
    let (acc, sums, scales) = (&acc[..n], &d.row_sums[..n], &d.row_scales[..n]);
    for t in 0..n {
        let a = acc[t] - d.zero_point * sums[t];
        out[t] = a as f32 * (d.scale * scales[t]);
    }
    if let Some(b) = d.bias {
        let b = &b[..n];
        for t in 0..n {
            out[t] += b[t];
        }
    }
}

/// Panics unless `vals` holds `p.len()` rows of `out.len()` (for [`pv_f32`]).
pub fn check_pv(p: &[f32], vals: &[f32], out: &[f32]) {
    assert_eq!(
        vals.len(),
        p.len() * out.len(),
        "values are not p.len() rows of out.len()"
    );
}

/// Panics unless `src` and `dst` have one length (for [`f16_to_f32`]).
pub fn check_f16(src: &[u16], dst: &[f32]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "f16 source and f32 destination differ in length"
    );
}

/// Columns of a float panel ([`panel_f32`]): four groups of 16 lanes.
pub const PANEL: usize = 64;

/// Panics unless `xs` holds 1–4 rows of one length `n`, `panel` is
/// `n × PANEL` and `out` is `xs.len() × PANEL` (for [`panel_f32`]). Returns `n`.
pub fn check_panel(xs: &[&[f32]], panel: &[f32], out: &[f32]) -> usize {
    assert!((1..=4).contains(&xs.len()), "1 to 4 rows");
    let n = xs[0].len();
    assert!(xs.iter().all(|x| x.len() == n), "rows of different lengths");
    assert_eq!(panel.len(), n * PANEL, "panel is not n × PANEL");
    assert_eq!(out.len(), xs.len() * PANEL, "out is not rows × PANEL");
    n
}

/// A float matrix product on a panel of [`PANEL`] columns stored row after
/// row (`panel[k]` holds column weights for input `k`):
/// `out[b][j] += Σ_k xs[b][k] · panel[k][j]`, added to `out` in `k` order.
/// Each weight row is read once for all of `xs` (up to 4 rows), with no
/// horizontal sums: the product of a recurrent layer's weights, packed by
/// unit group.
pub fn panel_f32(xs: &[&[f32]], panel: &[f32], out: &mut [f32]) {
    check_panel(xs, panel, out);
    panel_rows(xs, panel, out, 4)
}

/// [`panel_body`] over `xs` in groups of at most `most` rows (as many
/// accumulators as an ISA's registers hold); rows are independent, so the
/// grouping does not change results.
#[inline(always)]
pub(crate) fn panel_rows(xs: &[&[f32]], panel: &[f32], out: &mut [f32], most: usize) {
    for (xs, out) in xs.chunks(most).zip(out.chunks_mut(most * PANEL)) {
        match xs.len() {
            1 => panel_body::<1>(xs, panel, out),
            2 => panel_body::<2>(xs, panel, out),
            3 => panel_body::<3>(xs, panel, out),
            _ => panel_body::<4>(xs, panel, out),
        }
    }
}

/// The body of [`panel_f32`] for `B` rows: `B × PANEL` accumulators, one
/// multiply and one add per weight and row (never fused, so every ISA's copy
/// gives the same bits).
#[inline(always)]
pub(crate) fn panel_body<const B: usize>(xs: &[&[f32]], panel: &[f32], out: &mut [f32]) {
    let n = panel.len() / PANEL;
    let xs: [&[f32]; B] = std::array::from_fn(|b| &xs[b][..n]);
    let mut acc = [[0f32; PANEL]; B];
    for (a, o) in acc.iter_mut().zip(out.chunks_exact(PANEL)) {
        a.copy_from_slice(o);
    }
    for (k, w) in panel.chunks_exact(PANEL).enumerate() {
        let w: &[f32; PANEL] = w.try_into().expect("chunks_exact");
        for b in 0..B {
            let x = xs[b][k];
            for j in 0..PANEL {
                acc[b][j] += x * w[j];
            }
        }
    }
    for (a, o) in acc.iter().zip(out.chunks_exact_mut(PANEL)) {
        o.copy_from_slice(a);
    }
}

/// Lanes of the float kernels' accumulators. Every ISA runs the same
/// lane-wise code (Rust never fuses or reorders float operations), so the
/// results are bit-identical across ISAs, like the integer kernels'.
pub(crate) const LANES: usize = 16;

/// Keys in one block of the attention cache: [`qk_f32`] reads them
/// transposed, `[head_dim][KEY_BLOCK]`.
pub const KEY_BLOCK: usize = 16;

/// Attention scores for a block of keys stored transposed:
/// `out[j] = scale · Σ_d q[d] · keys[d · KEY_BLOCK + j]` for the first
/// `out.len()` (≤ [`KEY_BLOCK`]) keys. One vector holds the scores of all 16
/// keys, so there is no horizontal sum per key.
pub fn qk_f32(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    check_qk(q, keys, out);
    qk_body(q, keys, scale, out)
}

/// Dimensions of one group of an int8 key block ([`qk_q8`]): each key's
/// 4 consecutive dimensions lie side by side, as `vpdpbusd` and `sdot` read
/// them.
pub const KEY_GROUP: usize = 4;

/// Attention scores in integers, for an int8 cache: the query quantized
/// like the keys (`quantize_i8`, its scale folded into `scale` by the
/// caller) against a block of int8 keys in groups of [`KEY_GROUP`]
/// dimensions: byte `g·64 + j·4 + t` is dimension `4g + t` of key `j`.
/// `out[j] = (Σ_d q[d]·k_j[d]) · scale · key_scales[j]` for the first
/// `out.len()` keys, the sum exact in i32, so every ISA gives the same bits.
/// At 8 sequences of the demo GPT-2 the float score kernel on int8 keys
/// (each byte widened to f32 before its multiply and add) was 13 % of a
/// step; here one `vpdpbusd` does 64 of its multiply-adds.
pub fn qk_q8(q: &[i8], keys: &[i8], key_scales: &[f32], scale: f32, out: &mut [f32]) {
    check_qk_q8(q, keys, key_scales, out);
    qk_q8_body(q, keys, key_scales, scale, out)
}

/// Panics unless `q` is whole groups of [`KEY_GROUP`], `keys` a block of
/// as many groups, and there are at most [`KEY_BLOCK`] scores with a
/// scale each (for [`qk_q8`]).
pub fn check_qk_q8(q: &[i8], keys: &[i8], key_scales: &[f32], out: &[f32]) {
    assert!(
        q.len().is_multiple_of(KEY_GROUP),
        "query length {} is not whole groups of {KEY_GROUP}",
        q.len()
    );
    assert_eq!(
        keys.len(),
        q.len() * KEY_BLOCK,
        "keys are not a block of q.len() dimensions"
    );
    assert!(
        out.len() <= KEY_BLOCK && key_scales.len() >= out.len(),
        "more scores than keys in a block, or than scales"
    );
}

/// The body of [`qk_q8`], inlined into the copies that have no integer
/// dot product of their own.
#[inline(always)]
pub(crate) fn qk_q8_body(q: &[i8], keys: &[i8], key_scales: &[f32], scale: f32, out: &mut [f32]) {
    const G: usize = KEY_GROUP;
    let mut acc = [0i32; KEY_BLOCK];
    for (q4, k) in q.chunks_exact(G).zip(keys.chunks_exact(G * KEY_BLOCK)) {
        for j in 0..KEY_BLOCK {
            for t in 0..G {
                acc[j] += q4[t] as i32 * k[j * G + t] as i32;
            }
        }
    }
    for ((o, &a), &s) in out.iter_mut().zip(&acc).zip(key_scales) {
        *o = a as f32 * scale * s;
    }
}

/// The body of [`qk_f32`], inlined into each ISA's copy: four
/// accumulators (dimensions `d mod 4`, so the adds do not wait on each
/// other), summed as `(a0 + a1) + (a2 + a3)`. The accumulators are four
/// named arrays rather than one indexed by a loop: with fat LTO and one
/// codegen unit LLVM left that loop rolled and kept them on the stack, a
/// store and a reload on every add, and the release build's score kernel
/// ran 2–4× slower than the same source built without LTO.
#[inline(always)]
pub(crate) fn qk_body(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    const K: usize = KEY_BLOCK;
    let (mut a0, mut a1, mut a2, mut a3) = ([0f32; K], [0f32; K], [0f32; K], [0f32; K]);
    let (q4, k4) = (q.chunks_exact(4), keys.chunks_exact(4 * K));
    for (&x, k) in q4.remainder().iter().zip(k4.remainder().chunks_exact(K)) {
        axpy(&mut a0, x, k);
    }
    for (x, k) in q4.zip(k4) {
        let (k0, k) = k.split_at(K);
        let (k1, k) = k.split_at(K);
        let (k2, k3) = k.split_at(K);
        axpy(&mut a0, x[0], k0);
        axpy(&mut a1, x[1], k1);
        axpy(&mut a2, x[2], k2);
        axpy(&mut a3, x[3], k3);
    }
    let mut s = [0f32; K];
    for j in 0..K {
        s[j] = ((a0[j] + a1[j]) + (a2[j] + a3[j])) * scale;
    }
    out.copy_from_slice(&s[..out.len()]);
}

/// `acc[j] += x · v[j]` over one register's worth of lanes (a multiply,
/// then an add: no fused multiply-add, so every ISA rounds alike).
#[inline(always)]
fn axpy<const N: usize>(acc: &mut [f32; N], x: f32, v: &[f32]) {
    let v: &[f32; N] = v[..N].try_into().expect("N values");
    for j in 0..N {
        acc[j] += x * v[j];
    }
}

/// Attention output: `out += scale · Σ_s p[s] · vals[s]` over value rows.
pub fn pv_f32(p: &[f32], scale: f32, vals: &[f32], out: &mut [f32]) {
    check_pv(p, vals, out);
    pv_body(p, scale, vals, out)
}

/// Attention's weighted sum in integers, for an int8 cache: `w` holds the
/// block's weights (`p[s]` times position `s`'s value scale, ≥ 0; at most
/// [`KEY_BLOCK`]), `vals` the whole block of int8 values in groups of
/// [`KEY_GROUP`] positions: byte `g·4d + c·4 + t` is dimension `c` of
/// position `4g + t` (`d = out.len()`). The weights are quantized to u8 at
/// the block's largest (`weights_u8`), then
/// `out[c] += (Σ_s wq[s]·v[s][c]) · (ws · scale)`, the sum exact in i32, so
/// every ISA gives the same bits. Positions from `w.len()` on weigh 0,
/// whatever the block holds there. At 8 sequences of the demo GPT-2 the
/// float kernel on int8 values (each byte widened before its multiply and
/// add) was 11 % of a step.
pub fn pv_q8(w: &[f32], scale: f32, vals: &[i8], out: &mut [f32]) {
    check_pv_q8(w, vals, out);
    pv_q8_body(w, scale, vals, out)
}

/// Panics unless `vals` is a whole block of `out.len()` dimensions and
/// there are at most [`KEY_BLOCK`] weights (for [`pv_q8`]).
pub fn check_pv_q8(w: &[f32], vals: &[i8], out: &[f32]) {
    assert!(
        w.len() <= KEY_BLOCK,
        "more weights than positions in a block"
    );
    assert_eq!(
        vals.len(),
        KEY_BLOCK * out.len(),
        "values are not a block of out.len() dimensions"
    );
}

/// [`pv_q8`]'s weights as u8 and their scale: `ws = max w / 255`,
/// `wq = round_even(w / ws)` clamped to [0, 255] (a NaN to 0); all zeros
/// and scale 0 when no weight is positive.
#[inline(always)]
pub(crate) fn weights_u8(w: &[f32]) -> ([u8; KEY_BLOCK], f32) {
    let mut wq = [0u8; KEY_BLOCK];
    let max = w.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    let ws = max / 255.0;
    if ws > 0.0 {
        for (q, &v) in wq.iter_mut().zip(w) {
            let r = crate::quant::round_even(v / ws).clamp(0.0, 255.0);
            // Integral in [0, 255]: the low byte of its bits once 2²³ is
            // added (a NaN gives 0), as in `quantize_u8`.
            *q = (r + 8_388_608.0).to_bits() as u8;
        }
    }
    (wq, ws)
}

/// The body of [`pv_q8`], inlined into the copies that have no integer
/// dot product of their own: 64 dimensions at a time, group after group.
#[inline(always)]
pub(crate) fn pv_q8_body(w: &[f32], scale: f32, vals: &[i8], out: &mut [f32]) {
    const G: usize = KEY_GROUP;
    let (wq, ws) = weights_u8(w);
    if ws == 0.0 {
        return;
    }
    let (d, c) = (out.len(), ws * scale);
    let groups = w.len().div_ceil(G);
    for (chunk, o) in out.chunks_mut(64).enumerate() {
        let mut acc = [0i32; 64];
        for g in 0..groups {
            let v = &vals[g * G * d + chunk * 64 * G..][..o.len() * G];
            for (a, v) in acc.iter_mut().zip(v.chunks_exact(G)) {
                for t in 0..G {
                    *a += wq[g * G + t] as i32 * v[t] as i32;
                }
            }
        }
        for (o, &a) in o.iter_mut().zip(&acc) {
            *o += a as f32 * c;
        }
    }
}

/// Widen IEEE 754 half-precision values, given as their bit patterns, to
/// f32. Exact: every f16 is an f32 (and a NaN stays a NaN; its payload bits
/// are not compared across ISAs). A 16-bit KV cache reads its blocks
/// through this, so attention then runs the f32 kernels on the same values
/// on every ISA.
pub fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
    check_f16(src, dst);
    f16_to_f32_body(src, dst)
}

/// The body of [`f16_to_f32`], also the ISA copies' tail.
#[inline(always)]
pub(crate) fn f16_to_f32_body(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_bits(s).to_f32();
    }
}

/// Narrow f32 values to f16 bit patterns, rounding to nearest, ties to even,
/// and saturating: beyond f16's range to ±65504, its largest finite value
/// (an infinite key would turn attention's softmax into NaN). Not
/// dispatched: a cache is written by this one function on every ISA, so
/// every machine stores the same bits.
pub fn f32_to_f16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "f32 source and f16 destination differ in length"
    );
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_f16(s);
    }
}

/// One value of [`f32_to_f16`].
#[inline]
pub fn to_f16(x: f32) -> u16 {
    const MAX: f32 = 65504.0;
    half::f16::from_f32(x.clamp(-MAX, MAX)).to_bits()
}

/// The body of [`pv_f32`]: the output is held in registers, up to four
/// [`LANES`]-wide chunks (64 values, a whole attention head) at a time, while
/// the value rows stream by once; each output lane sums its rows in order.
#[inline(always)]
pub(crate) fn pv_body(p: &[f32], scale: f32, vals: &[f32], out: &mut [f32]) {
    let d = out.len();
    let mut c = 0;
    while c + 4 * LANES <= d {
        pv_cols4(p, scale, vals, d, c, out);
        c += 4 * LANES;
    }
    while c + LANES <= d {
        pv_cols1(p, scale, vals, d, c, out);
        c += LANES;
    }
    if c < d {
        for (s, &ps) in p.iter().enumerate() {
            let ps = ps * scale;
            for (o, v) in out[c..].iter_mut().zip(&vals[s * d + c..(s + 1) * d]) {
                *o += ps * v;
            }
        }
    }
}

/// Columns `c..c + 4·LANES` of [`pv_body`], accumulated in 8 registers:
/// even and odd value rows apart (so consecutive rows' adds do not wait on
/// each other, which otherwise bounds a block by the add latency), summed
/// at the end as `even + odd`. Named accumulators, as in [`qk_body`]: held
/// in an array indexed by a loop over the column chunks, the LTO build
/// kept them in memory.
#[inline(always)]
fn pv_cols4(p: &[f32], scale: f32, vals: &[f32], d: usize, c: usize, out: &mut [f32]) {
    const L: usize = LANES;
    let z = [0f32; L];
    let (mut e0, mut e1, mut e2, mut e3) = (z, z, z, z);
    let (mut o0, mut o1, mut o2, mut o3) = (z, z, z, z);
    for i in 0..p.len() / 2 {
        let (p0, p1) = (p[2 * i] * scale, p[2 * i + 1] * scale);
        let v0 = &vals[2 * i * d + c..][..4 * L];
        let v1 = &vals[(2 * i + 1) * d + c..][..4 * L];
        axpy(&mut e0, p0, &v0[..L]);
        axpy(&mut o0, p1, &v1[..L]);
        axpy(&mut e1, p0, &v0[L..]);
        axpy(&mut o1, p1, &v1[L..]);
        axpy(&mut e2, p0, &v0[2 * L..]);
        axpy(&mut o2, p1, &v1[2 * L..]);
        axpy(&mut e3, p0, &v0[3 * L..]);
        axpy(&mut o3, p1, &v1[3 * L..]);
    }
    if p.len() % 2 == 1 {
        let s = p.len() - 1;
        let ps = p[s] * scale;
        let v = &vals[s * d + c..][..4 * L];
        axpy(&mut e0, ps, &v[..L]);
        axpy(&mut e1, ps, &v[L..]);
        axpy(&mut e2, ps, &v[2 * L..]);
        axpy(&mut e3, ps, &v[3 * L..]);
    }
    let out: &mut [f32] = &mut out[c..c + 4 * L];
    for (o, (e, od)) in out
        .chunks_exact_mut(L)
        .zip([(e0, o0), (e1, o1), (e2, o2), (e3, o3)])
    {
        for l in 0..L {
            o[l] += e[l] + od[l];
        }
    }
}

/// [`pv_cols4`] for one chunk of `LANES` columns.
#[inline(always)]
fn pv_cols1(p: &[f32], scale: f32, vals: &[f32], d: usize, c: usize, out: &mut [f32]) {
    const L: usize = LANES;
    let (mut e, mut od) = ([0f32; L], [0f32; L]);
    for i in 0..p.len() / 2 {
        let (p0, p1) = (p[2 * i] * scale, p[2 * i + 1] * scale);
        axpy(&mut e, p0, &vals[2 * i * d + c..]);
        axpy(&mut od, p1, &vals[(2 * i + 1) * d + c..]);
    }
    if p.len() % 2 == 1 {
        let s = p.len() - 1;
        axpy(&mut e, p[s] * scale, &vals[s * d + c..]);
    }
    for (o, l) in out[c..c + L].iter_mut().zip(0..L) {
        *o += e[l] + od[l];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widens_exactly_and_narrows_back() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut wide = vec![0f32; all.len()];
        f16_to_f32(&all, &mut wide);
        let mut back = vec![0u16; all.len()];
        f32_to_f16(&wide, &mut back);
        for ((&h, &w), &b) in all.iter().zip(&wide).zip(&back) {
            if w.is_nan() {
                assert!(half::f16::from_bits(b).is_nan(), "{h:#06x}");
            } else if w.is_infinite() {
                assert_eq!(b, h - 1, "±infinity saturates to the largest finite");
            } else {
                assert_eq!(b, h, "{h:#06x} -> {w} -> {b:#06x}");
            }
        }
        assert_eq!(wide[0x3c00], 1.0);
        assert_eq!(wide[0x0001], 2f32.powi(-24), "smallest subnormal");
        assert_eq!(wide[0xfc00], f32::NEG_INFINITY);
    }

    #[test]
    fn f16_narrowing_rounds_to_nearest_even() {
        let ulp = 2f32.powi(-10); // of f16 at 1.0
        let cases = [
            (1.0 + ulp / 2.0, 0x3c00),       // tie, to the even 1.0
            (1.0 + 3.0 * ulp / 2.0, 0x3c02), // tie, to the even 1 + 2 ulp
            (1.0 + ulp * 0.51, 0x3c01),      // above the tie
            (65519.0, 0x7bff),               // rounds down to the largest
            (65520.0, 0x7bff),               // would round to infinity: saturates
            (f32::NEG_INFINITY, 0xfbff),
            (-0.0, 0x8000),
            (2f32.powi(-25), 0x0000), // tie with zero, to even
            (3.0 * 2f32.powi(-25), 0x0002),
        ];
        for (x, want) in cases {
            let mut h = [0u16];
            f32_to_f16(&[x], &mut h);
            assert_eq!(h[0], want, "{x:e}");
        }
    }

    #[test]
    fn argmax_prefers_lowest_index_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, 0.5]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
        assert_eq!(argmax(&[-0.0, 0.0]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    /// The running scan `argmax` replaced: one comparison per element
    /// against the best so far.
    fn argmax_scan(x: &[f32]) -> usize {
        let mut best = 0usize;
        for (i, &v) in x.iter().enumerate() {
            if v > x[best] || x[best].is_nan() && !v.is_nan() {
                best = i;
            }
        }
        best
    }

    proptest::proptest! {
        /// The same index as the running scan, with many ties, NaNs,
        /// infinities and signed zeros, at lengths around the lanes.
        #[test]
        fn argmax_equals_the_running_scan(
            v in proptest::collection::vec(0u8..12, 0..200),
        ) {
            let specials = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, -0.0, 0.0];
            let x: Vec<f32> = v
                .iter()
                .map(|&b| specials.get(b as usize).copied().unwrap_or(b as f32 - 8.0))
                .collect();
            proptest::prop_assert_eq!(argmax(&x), argmax_scan(&x));
        }
    }

    #[test]
    fn qk_reads_keys_transposed() {
        let d = 67; // a tail past the groups of four
        let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let keys: Vec<f32> = (0..d * KEY_BLOCK)
            .map(|i| (i as f32 * 0.11).cos())
            .collect();
        for m in [0, 1, 5, KEY_BLOCK] {
            let mut out = vec![0f32; m];
            qk_f32(&q, &keys, 0.5, &mut out);
            for (j, &o) in out.iter().enumerate() {
                let want: f64 = (0..d)
                    .map(|c| q[c] as f64 * keys[c * KEY_BLOCK + j] as f64)
                    .sum::<f64>()
                    * 0.5;
                assert!((o as f64 - want).abs() < 1e-5, "key {j}: {o} vs {want}");
            }
        }
    }

    #[test]
    fn softmax_sums_to_one_even_for_huge_logits() {
        let mut x = vec![1000.0f32, 999.0, -1000.0, 0.0];
        softmax_inplace(&mut x);
        let s: f32 = x.iter().sum();
        assert!((s - 1.0).abs() < 1e-6, "{s}");
        assert!((x[0] / x[1] - 1f32.exp()).abs() < 1e-4);
        let mut y = vec![1000.0f32, 999.0, -1000.0, 0.0];
        log_softmax_inplace(&mut y);
        assert!((y[0].exp() - x[0]).abs() < 1e-6);
    }

    #[test]
    fn log_sum_exp_of_all_minus_infinity_is_minus_infinity() {
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]).1, f32::NEG_INFINITY);
    }
}
