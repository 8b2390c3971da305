//! armv7 (32-bit Raspberry Pi OS) kernels: NEON.
//!
//! Stable Rust has neither the 32-bit Arm NEON intrinsics nor
//! `#[target_feature(enable = "neon")]` on this architecture (the
//! `armv7-unknown-linux-gnueabihf` baseline is VFPv3-D16 without NEON), so the
//! inner loops are inline assembly behind a `.fpu neon` directive, using only
//! `q0`–`q7` (the registers a D16 build knows about). They are private unsafe functions behind the
//! same `kernel!` wrappers as every other path, installed only when the kernel
//! reports NEON in `AT_HWCAP`. As on aarch64, activations are shifted to i8
//! (`x − 128`) and `128 · Σw` is added back.

//!
//! Clobbers of `q4`–`q7` are declared as their halves `d8`–`d15`. The
//! procedure call standard makes `d8`–`d15` callee-saved, and rustc (1.95,
//! LLVM) does not save them when an `asm!` block names them as `q`
//! registers: the kernels returned with the caller's floats overwritten (a
//! caller's activation scale held in `d8` came back with its upper half
//! replaced by accumulator bits, on boards as under qemu). Declared as `d`
//! registers, the prologue saves them (`vpush {d8-d15}`), which
//! `cargo test`'s GEMV proptest checks through a scale held across the calls.

use crate::dispatch::{Isa, Kernels};

/// `HWCAP_NEON` from Linux's `arch/arm/include/uapi/asm/hwcap.h`.
const HWCAP_NEON: libc::c_ulong = 1 << 12;

fn has_neon() -> bool {
    // SAFETY: getauxval has no preconditions; it returns 0 for an absent entry.
    let hwcap = unsafe { libc::getauxval(libc::AT_HWCAP) };
    hwcap & HWCAP_NEON != 0
}

/// Install the best kernels this CPU runs, as far as `limit` allows.
pub(crate) fn plug(k: &mut Kernels, limit: Isa) {
    if limit.allows(Isa::Neon) && has_neon() {
        k.isa = Isa::Neon;
        k.dot_u8i8 = dot_u8i8_neon;
        k.dot_i8i8 = dot_i8i8_neon;
        k.tile_u8i8 = tile_u8i8_neon;
    }
}

kernel! { dot_u8i8:
    /// u8·i8 dot product on armv7 NEON, 8 bytes a step: `vmull.s8` of the
    /// shifted activations, `vpadal.s16` into i32, `Σw` by `vpaddl`/`vpadal`.
    pub fn dot_u8i8_neon = neon::dot_u8i8, isa = "NEON", when = has_neon();
}

kernel! { dot_i8i8:
    /// i8·i8 dot product on armv7 NEON (`vmull.s8` + `vpadal.s16`).
    pub fn dot_i8i8_neon = neon::dot_i8i8, isa = "NEON", when = has_neon();
}

kernel! { tile_u8i8:
    /// The 4-row micro-kernel on armv7 NEON: per activation vector, one pass
    /// over 8-byte chunks of the four rows with four accumulators.
    pub fn tile_u8i8_neon = neon::tile_u8i8, isa = "NEON", when = has_neon();
}

mod neon {
    use core::arch::asm;

    use crate::dispatch::{Rows4, TILE_ACTS, TILE_ROWS};

    /// # Safety
    /// The CPU must support NEON; `a` and `b` must have equal lengths ≤ `MAX_DOT_LEN`.
    pub(super) unsafe fn dot_u8i8(a: &[u8], b: &[i8]) -> i32 {
        let blocks = a.len() / 8;
        let (mut acc, mut sum_b) = (0i32, 0i32);
        if blocks > 0 {
            // SAFETY: reads `8 · blocks` ≤ len bytes from each slice, writes only
            // the declared registers; NEON checked by the caller.
            unsafe {
                asm!(
                    ".fpu neon",
                    "vmov.i8 d1, #0x80",
                    "vmov.i32 q2, #0",
                    "vmov.i32 q3, #0",
                    "2:",
                    "vld1.8 {{d0}}, [{a}]!",
                    "vld1.8 {{d2}}, [{b}]!",
                    "veor d0, d0, d1",
                    "vmull.s8 q4, d0, d2",
                    "vpadal.s16 q2, q4",
                    "vpaddl.s8 d3, d2",
                    "vpadal.s16 d6, d3",
                    "subs {k}, {k}, #1",
                    "bne 2b",
                    "vpadd.i32 d4, d4, d5",
                    "vpadd.i32 d4, d4, d4",
                    "vpadd.i32 d6, d6, d6",
                    "vmov.32 {s}, d4[0]",
                    "vmov.32 {t}, d6[0]",
                    a = inout(reg) a.as_ptr() => _,
                    b = inout(reg) b.as_ptr() => _,
                    k = inout(reg) blocks => _,
                    s = out(reg) acc,
                    t = out(reg) sum_b,
                    out("q0") _, out("q1") _, out("q2") _, out("q3") _,
                    // q4 as its halves, which are callee-saved (module doc).
                    out("d8") _, out("d9") _,
                    options(nostack, readonly),
                )
            };
        }
        let i = blocks * 8;
        let tail: i32 = a[i..]
            .iter()
            .zip(&b[i..])
            .map(|(&x, &w)| x as i32 * w as i32)
            .sum();
        acc + 128 * sum_b + tail
    }

    /// # Safety
    /// The CPU must support NEON; `a` and `b` must have equal lengths ≤ `MAX_DOT_LEN`.
    pub(super) unsafe fn dot_i8i8(a: &[i8], b: &[i8]) -> i32 {
        let blocks = a.len() / 8;
        let mut acc = 0i32;
        if blocks > 0 {
            // SAFETY: reads `8 · blocks` ≤ len bytes from each slice, writes only
            // the declared registers; NEON checked by the caller.
            unsafe {
                asm!(
                    ".fpu neon",
                    "vmov.i32 q2, #0",
                    "2:",
                    "vld1.8 {{d0}}, [{a}]!",
                    "vld1.8 {{d2}}, [{b}]!",
                    "vmull.s8 q4, d0, d2",
                    "vpadal.s16 q2, q4",
                    "subs {k}, {k}, #1",
                    "bne 2b",
                    "vpadd.i32 d4, d4, d5",
                    "vpadd.i32 d4, d4, d4",
                    "vmov.32 {s}, d4[0]",
                    a = inout(reg) a.as_ptr() => _,
                    b = inout(reg) b.as_ptr() => _,
                    k = inout(reg) blocks => _,
                    s = out(reg) acc,
                    out("q0") _, out("q1") _, out("q2") _,
                    out("d8") _, out("d9") _,
                    options(nostack, readonly),
                )
            };
        }
        let i = blocks * 8;
        let tail: i32 = a[i..]
            .iter()
            .zip(&b[i..])
            .map(|(&x, &w)| x as i32 * w as i32)
            .sum();
        acc + tail
    }

    /// # Safety
    /// The CPU must support NEON; `xs` holds 1–4 vectors of length `n` ≤
    /// `w.stride`, and `w.data` holds four rows of `n` bytes at `r * w.stride`.
    pub(super) unsafe fn tile_u8i8(
        xs: &[&[u8]],
        n: usize,
        w: Rows4,
    ) -> [[i32; TILE_ROWS]; TILE_ACTS] {
        let blocks = n / 8;
        let mut out = [[0; TILE_ROWS]; TILE_ACTS];
        for (o, x) in out.iter_mut().zip(xs) {
            let mut lanes = [0i32; 4 * TILE_ROWS];
            if blocks > 0 {
                let wp = w.data.as_ptr();
                // SAFETY: reads `8 · blocks` ≤ n bytes of x and of each of the four
                // rows (inside w.data by the caller's check), writes the 64 bytes
                // of `lanes` and the declared registers; NEON checked by the caller.
                unsafe {
                    asm!(
                        ".fpu neon",
                        "vmov.i8 d1, #0x80",
                        "vmov.i32 q4, #0",
                        "vmov.i32 q5, #0",
                        "vmov.i32 q6, #0",
                        "vmov.i32 q7, #0",
                        "2:",
                        "vld1.8 {{d0}}, [{x}]!",
                        "vld1.8 {{d4}}, [{w0}]!",
                        "vld1.8 {{d5}}, [{w1}]!",
                        "vld1.8 {{d6}}, [{w2}]!",
                        "vld1.8 {{d7}}, [{w3}]!",
                        "veor d0, d0, d1",
                        "vmull.s8 q1, d0, d4",
                        "vpadal.s16 q4, q1",
                        "vmull.s8 q1, d0, d5",
                        "vpadal.s16 q5, q1",
                        "vmull.s8 q1, d0, d6",
                        "vpadal.s16 q6, q1",
                        "vmull.s8 q1, d0, d7",
                        "vpadal.s16 q7, q1",
                        "subs {k}, {k}, #1",
                        "bne 2b",
                        "vst1.32 {{d8, d9, d10, d11}}, [{o}]!",
                        "vst1.32 {{d12, d13, d14, d15}}, [{o}]",
                        x = inout(reg) x.as_ptr() => _,
                        w0 = inout(reg) wp => _,
                        w1 = inout(reg) wp.add(w.stride) => _,
                        w2 = inout(reg) wp.add(2 * w.stride) => _,
                        w3 = inout(reg) wp.add(3 * w.stride) => _,
                        k = inout(reg) blocks => _,
                        o = inout(reg) lanes.as_mut_ptr() => _,
                        out("q0") _, out("q1") _, out("q2") _, out("q3") _,
                        out("d8") _, out("d9") _, out("d10") _, out("d11") _,
                        out("d12") _, out("d13") _, out("d14") _, out("d15") _,
                        options(nostack),
                    )
                };
            }
            let i = blocks * 8;
            for (r, v) in o.iter_mut().enumerate() {
                let row = &w.data[r * w.stride + i..r * w.stride + n];
                let tail: i32 = x[i..n]
                    .iter()
                    .zip(row)
                    .map(|(&x, &w)| (x as i32 - 128) * w as i32)
                    .sum();
                *v = lanes[4 * r..4 * r + 4].iter().sum::<i32>() + tail + 128 * w.sums[r];
            }
        }
        out
    }
}
