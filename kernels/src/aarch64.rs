//! aarch64 kernels: NEON (every aarch64 core: Cortex-A53/A72 on the Raspberry
//! Pi 3/4) and NEON with the Armv8.2 dot product (`sdot`: Cortex-A76 on the
//! Pi 5, Jetson Orin).
//!
//! Arm has no u8·i8 multiply outside i8mm, so both paths shift the
//! activations to i8 (`x − 128`, one `eor`), multiply signed, and add
//! `128 · Σw` back (the packed matrices carry their row sums). `sdot` has no
//! stable intrinsic yet, so it is one instruction of inline assembly; the
//! `#[target_feature]` functions stay private behind the `kernel!` wrappers.

use crate::dispatch::{Isa, Kernels};

fn has_neon() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

fn has_dotprod() -> bool {
    has_neon() && std::arch::is_aarch64_feature_detected!("dotprod")
}

/// Install the best kernels this CPU runs, as far as `limit` allows.
pub(crate) fn plug(k: &mut Kernels, limit: Isa) {
    if limit.allows(Isa::Neon) && has_neon() {
        k.isa = Isa::Neon;
        k.dot_u8i8 = dot_u8i8_neon;
        k.dot_i8i8 = dot_i8i8_neon;
        k.tile_u8i8 = tile_u8i8_neon;
        k.panel_f32 = panel_f32_neon;
        k.f16_to_f32 = f16_to_f32_neon;
    }
    if limit.allows(Isa::NeonDot) && has_dotprod() {
        k.isa = Isa::NeonDot;
        k.dot_u8i8 = dot_u8i8_dotprod;
        k.dot_i8i8 = dot_i8i8_dotprod;
        k.tile_u8i8 = tile_u8i8_dotprod;
        k.qk_q8 = qk_q8_dotprod;
    }
}

kernel! { qk_q8:
    /// Integer attention scores with `sdot`: four registers of four keys ×
    /// four dimensions against the query's four bytes, per group.
    pub fn qk_q8_dotprod = dotprod::qk_q8, isa = "NEON dotprod", when = has_dotprod();
}

kernel! { panel_f32:
    /// The panel product on NEON, one row at a time: 16 q-register
    /// accumulators and 16 for the weights fill the 32 (the generic
    /// four-row body would spill).
    pub fn panel_f32_neon = float::panel, isa = "NEON", when = has_neon();
}

kernel! { f16_to_f32:
    /// f16 widening on NEON: eight values per `fcvtl`/`fcvtl2` pair (base
    /// ARMv8; the half-precision arithmetic extension is not needed).
    pub fn f16_to_f32_neon = float::f16_to_f32, isa = "NEON", when = has_neon();
}

/// The float kernels: the generic lane-wise bodies with NEON's register budget.
mod float {
    use crate::generic::{f16_to_f32_body, panel_rows};

    /// # Safety
    /// The CPU must support NEON; `src` and `dst` are equally long.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
        let n = src.len() / 8 * 8;
        if n > 0 {
            // SAFETY: the loop runs n / 8 times, reading 16 bytes of `src` and
            // writing 32 of `dst` each: n ≤ src.len() = dst.len() values, all
            // in bounds. It touches only the named registers and v0–v2.
            unsafe {
                std::arch::asm!(
                    "2:",
                    "ld1 {{v0.8h}}, [{s}], #16",
                    "fcvtl v1.4s, v0.4h",
                    "fcvtl2 v2.4s, v0.8h",
                    "st1 {{v1.4s, v2.4s}}, [{d}], #32",
                    "subs {n}, {n}, #8",
                    "b.ne 2b",
                    s = inout(reg) src.as_ptr() => _,
                    d = inout(reg) dst.as_mut_ptr() => _,
                    n = inout(reg) n => _,
                    out("v0") _,
                    out("v1") _,
                    out("v2") _,
                    options(nostack),
                );
            }
        }
        f16_to_f32_body(&src[n..], &mut dst[n..])
    }

    /// # Safety
    /// The CPU must support NEON.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn panel(xs: &[&[f32]], panel: &[f32], out: &mut [f32]) {
        panel_rows(xs, panel, out, 1)
    }
}

kernel! { dot_u8i8:
    /// u8·i8 dot product on NEON: `smull`/`smull2` of the shifted activations
    /// into i16 (|(x−128)·w| ≤ 2¹⁴, no overflow), pairwise-accumulated into
    /// i32 with `sadalp`; `128 · Σw` accumulated alongside.
    pub fn dot_u8i8_neon = neon::dot_u8i8, isa = "NEON", when = has_neon();
}

kernel! { dot_i8i8:
    /// i8·i8 dot product on NEON (`smull` + `sadalp`).
    pub fn dot_i8i8_neon = neon::dot_i8i8, isa = "NEON", when = has_neon();
}

kernel! { tile_u8i8:
    /// The 4-row micro-kernel on NEON: four 16-byte weight chunks per step
    /// shared by up to four shifted activation vectors (16 accumulators).
    pub fn tile_u8i8_neon = neon::tile_u8i8, isa = "NEON", when = has_neon();
}

kernel! { dot_u8i8:
    /// u8·i8 dot product with `sdot` on the shifted activations, `Σw` by a
    /// second `sdot` against ones.
    pub fn dot_u8i8_dotprod = dotprod::dot_u8i8, isa = "NEON dotprod", when = has_dotprod();
}

kernel! { dot_i8i8:
    /// i8·i8 dot product with `sdot`.
    pub fn dot_i8i8_dotprod = dotprod::dot_i8i8, isa = "NEON dotprod", when = has_dotprod();
}

kernel! { tile_u8i8:
    /// The 4-row micro-kernel with `sdot`: 16 accumulators, one `sdot` per
    /// (activation, row) per 16 bytes.
    pub fn tile_u8i8_dotprod = dotprod::tile_u8i8, isa = "NEON dotprod", when = has_dotprod();
}

/// The scalar remainder of a shifted dot product: `Σ (x − 128)·w`.
fn shifted_tail(x: &[u8], w: &[i8]) -> i32 {
    x.iter()
        .zip(w)
        .map(|(&x, &w)| (x as i32 - 128) * w as i32)
        .sum()
}

/// The scalar remainder of a u8·i8 dot product.
fn tail_u8(x: &[u8], w: &[i8]) -> i32 {
    x.iter().zip(w).map(|(&x, &w)| x as i32 * w as i32).sum()
}

/// The scalar remainder of an i8·i8 dot product.
fn tail(x: &[i8], w: &[i8]) -> i32 {
    x.iter().zip(w).map(|(&x, &w)| x as i32 * w as i32).sum()
}

/// The 4-row tile loop on shifted activations, for one multiply-accumulate
/// (`mla` on NEON, `sdot` on dotprod): four 16-byte weight chunks per step
/// shared by the B activation vectors, 4·B accumulators.
macro_rules! shifted_tile {
    ($features:literal, $mac:ident) => {
        /// # Safety
        /// As [`tile_u8i8`], with `xs.len() == B`.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn tile<const B: usize>(xs: &[&[u8]], n: usize, w: Rows4) -> [[i32; TILE_ROWS]; B] {
            let flip = vdupq_n_u8(0x80);
            let mut acc = [[vdupq_n_s32(0); TILE_ROWS]; B];
            let wp = w.data.as_ptr();
            let mut i = 0;
            while i + 16 <= n {
                let mut wr = [vdupq_n_s8(0); TILE_ROWS];
                for (r, v) in wr.iter_mut().enumerate() {
                    // SAFETY: row r holds n ≥ i + 16 bytes from r * stride, inside w.data.
                    *v = unsafe { vld1q_s8(wp.add(r * w.stride + i)) };
                }
                for (acc_a, x) in acc.iter_mut().zip(xs) {
                    // SAFETY: x has n ≥ i + 16 bytes.
                    let xv = unsafe { vld1q_u8(x.as_ptr().add(i)) };
                    let sx = vreinterpretq_s8_u8(veorq_u8(xv, flip));
                    for (acc_r, wv) in acc_a.iter_mut().zip(&wr) {
                        *acc_r = $mac(*acc_r, sx, *wv);
                    }
                }
                i += 16;
            }
            super::finish(&acc.map(|a| a.map(|v| vaddvq_s32(v))), xs, i, n, w)
        }
    };
}

mod neon {
    use std::arch::aarch64::*;

    use super::{tail, tail_u8};
    use crate::dispatch::{Rows4, TILE_ACTS, TILE_ROWS};

    /// `acc + Σ a·b` over 16 i8 lanes (two widening multiplies, two pairwise adds).
    #[inline]
    #[target_feature(enable = "neon")]
    fn mla(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
        vpadalq_s16(acc, vmull_high_s8(a, b))
    }

    /// # Safety
    /// The CPU must support NEON; `a` and `b` must have equal lengths ≤ `MAX_DOT_LEN`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_u8i8(a: &[u8], b: &[i8]) -> i32 {
        let n = a.len();
        let flip = vdupq_n_u8(0x80);
        let (mut acc, mut sum_b) = (vdupq_n_s32(0), vdupq_n_s32(0));
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n bytes remain in both slices.
            let (va, vb) = unsafe { (vld1q_u8(a.as_ptr().add(i)), vld1q_s8(b.as_ptr().add(i))) };
            acc = mla(acc, vreinterpretq_s8_u8(veorq_u8(va, flip)), vb);
            sum_b = vpadalq_s16(sum_b, vpaddlq_s8(vb));
            i += 16;
        }
        vaddvq_s32(acc) + 128 * vaddvq_s32(sum_b) + tail_u8(&a[i..], &b[i..])
    }

    /// # Safety
    /// The CPU must support NEON; `a` and `b` must have equal lengths ≤ `MAX_DOT_LEN`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_i8i8(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len();
        let mut acc = vdupq_n_s32(0);
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n bytes remain in both slices.
            let (va, vb) = unsafe { (vld1q_s8(a.as_ptr().add(i)), vld1q_s8(b.as_ptr().add(i))) };
            acc = mla(acc, va, vb);
            i += 16;
        }
        vaddvq_s32(acc) + tail(&a[i..], &b[i..])
    }

    /// # Safety
    /// The CPU must support NEON; `xs` holds 1–4 vectors of length `n` ≤
    /// `w.stride`, and `w.data` holds four rows of `n` bytes at `r * w.stride`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn tile_u8i8(
        xs: &[&[u8]],
        n: usize,
        w: Rows4,
    ) -> [[i32; TILE_ROWS]; TILE_ACTS] {
        // SAFETY: preconditions forwarded.
        unsafe { by_batch!(tile, xs, n, w) }
    }

    shifted_tile!("neon", mla);
}

/// Lane sums of the SIMD part (columns `..i`, shifted activations) plus the
/// shifted scalar tail (columns `i..n`) plus `128 · Σw` per row.
fn finish<const B: usize>(
    simd: &[[i32; crate::dispatch::TILE_ROWS]; B],
    xs: &[&[u8]],
    i: usize,
    n: usize,
    w: crate::dispatch::Rows4,
) -> [[i32; crate::dispatch::TILE_ROWS]; B] {
    let mut out = *simd;
    for (o, x) in out.iter_mut().zip(xs) {
        for (r, v) in o.iter_mut().enumerate() {
            let row = &w.data[r * w.stride + i..r * w.stride + n];
            *v += shifted_tail(&x[i..n], row) + 128 * w.sums[r];
        }
    }
    out
}

mod dotprod {
    use std::arch::aarch64::*;

    use super::{tail, tail_u8};
    use crate::dispatch::{Rows4, TILE_ACTS, TILE_ROWS};

    /// `acc + sdot(a, b)`: four lanes of four i8·i8 products each (no stable
    /// intrinsic yet, so one instruction of inline assembly).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: `sdot` reads and writes these three registers only, and this
        // function is compiled for (and only callable with) dotprod.
        unsafe {
            core::arch::asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            )
        };
        acc
    }

    /// # Safety
    /// The CPU must support NEON dotprod; `a` and `b` must have equal lengths ≤ `MAX_DOT_LEN`.
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn dot_u8i8(a: &[u8], b: &[i8]) -> i32 {
        let n = a.len();
        let flip = vdupq_n_u8(0x80);
        let ones = vdupq_n_s8(1);
        let (mut acc, mut sum_b) = (vdupq_n_s32(0), vdupq_n_s32(0));
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n bytes remain in both slices.
            let (va, vb) = unsafe { (vld1q_u8(a.as_ptr().add(i)), vld1q_s8(b.as_ptr().add(i))) };
            acc = sdot(acc, vreinterpretq_s8_u8(veorq_u8(va, flip)), vb);
            sum_b = sdot(sum_b, ones, vb);
            i += 16;
        }
        vaddvq_s32(acc) + 128 * vaddvq_s32(sum_b) + tail_u8(&a[i..], &b[i..])
    }

    /// # Safety
    /// The CPU must support NEON dotprod; `check_qk_q8`'s conditions hold
    /// (whole groups of 4 in `q`, as many 64-byte groups in `keys`, a scale
    /// for each of the ≤ 16 scores).
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn qk_q8(q: &[i8], keys: &[i8], ks: &[f32], scale: f32, out: &mut [f32]) {
        // Register i holds keys 4i..4i+4, four dimensions each: `sdot`
        // against the query's four bytes repeated gives each key's sum of
        // the group's products in its lane. Exact in i32.
        let mut acc = [vdupq_n_s32(0); 4];
        for (g, q4) in q.chunks_exact(4).enumerate() {
            let qv = vreinterpretq_s8_s32(vdupq_n_s32(i32::from_le_bytes([
                q4[0] as u8,
                q4[1] as u8,
                q4[2] as u8,
                q4[3] as u8,
            ])));
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: group g's 64 bytes lie inside `keys` (g < q.len()/4
                // and keys.len() = 16 · q.len(), checked by the caller).
                let kv = unsafe { vld1q_s8(keys.as_ptr().add(g * 64 + 16 * i)) };
                *a = sdot(*a, kv, qv);
            }
        }
        let mut dots = [0i32; 16];
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: 4 lanes stored at 4i, inside the 16 of `dots`.
            unsafe { vst1q_s32(dots.as_mut_ptr().add(4 * i), *a) };
        }
        for ((o, &d), &s) in out.iter_mut().zip(&dots).zip(ks) {
            *o = d as f32 * scale * s;
        }
    }

    /// # Safety
    /// The CPU must support NEON dotprod; `a` and `b` must have equal lengths ≤ `MAX_DOT_LEN`.
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn dot_i8i8(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len();
        let (mut acc0, mut acc1) = (vdupq_n_s32(0), vdupq_n_s32(0));
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: i + 32 <= n bytes remain in both slices.
            let (a0, b0, a1, b1) = unsafe {
                (
                    vld1q_s8(a.as_ptr().add(i)),
                    vld1q_s8(b.as_ptr().add(i)),
                    vld1q_s8(a.as_ptr().add(i + 16)),
                    vld1q_s8(b.as_ptr().add(i + 16)),
                )
            };
            acc0 = sdot(acc0, a0, b0);
            acc1 = sdot(acc1, a1, b1);
            i += 32;
        }
        vaddvq_s32(vaddq_s32(acc0, acc1)) + tail(&a[i..], &b[i..])
    }

    /// # Safety
    /// The CPU must support NEON dotprod; `xs` holds 1–4 vectors of length
    /// `n` ≤ `w.stride`, and `w.data` holds four rows of `n` bytes at `r * w.stride`.
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn tile_u8i8(
        xs: &[&[u8]],
        n: usize,
        w: Rows4,
    ) -> [[i32; TILE_ROWS]; TILE_ACTS] {
        // SAFETY: preconditions forwarded.
        unsafe { by_batch!(tile, xs, n, w) }
    }

    shifted_tile!("neon,dotprod", sdot);
}
