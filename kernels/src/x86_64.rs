//! x86_64 kernels: AVX2, AVX-512 VNNI and AMX int8. The `#[target_feature]`
//! and inline-asm functions are private; `plug` installs their safe wrappers
//! after detection.

use crate::dispatch::{Isa, Kernels, Layout};

fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

fn has_f16c() -> bool {
    has_avx2() && is_x86_feature_detected!("f16c")
}

fn has_avx512vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// AMX int8 usable: the CPU has the tiles and their int8 product (CPUID leaf
/// 7: EDX bits 24 and 25) beside AVX-512 VNNI, and Linux granted this process
/// the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, Linux 5.16+;
/// without it the first tile instruction faults). Asked once per process; the
/// grant covers every thread. `is_x86_feature_detected!` has no stable AMX
/// names yet.
fn has_amx() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| {
        // CPUID leaf 7 exists on every x86_64 CPU with AVX-512, checked first.
        let leaf7 = has_avx512vnni().then(|| std::arch::x86_64::__cpuid_count(7, 0));
        let cpu = leaf7.is_some_and(|l| (l.edx >> 24) & 1 == 1 && (l.edx >> 25) & 1 == 1);
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes which xsave
        // features the kernel lets this process use; it reads no memory.
        cpu && unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        } == 0
    })
}

/// Install the best kernels this CPU runs, as far as `limit` allows.
pub(crate) fn plug(k: &mut Kernels, limit: Isa) {
    if limit.allows(Isa::Avx2) && has_avx2() {
        k.isa = Isa::Avx2;
        k.qk_f32 = qk_f32_avx2;
        k.pv_f32 = pv_f32_avx2;
        k.qk_q8 = qk_q8_avx2;
        k.pv_q8 = pv_q8_avx2;
        k.dequant_i32 = dequant_i32_avx2;
        k.panel_f32 = panel_f32_avx2;
        k.dynamic_params = dynamic_params_avx2;
        k.quantize_i8 = quantize_i8_avx2;
        k.layer_norm_f32 = layer_norm_f32_avx2;
        k.rms_norm_f32 = rms_norm_f32_avx2;
        k.quantize_u8 = quantize_u8_avx2;
        k.act_f32 = act_f32_avx2;
        k.softmax_f32 = softmax_f32_avx2;
        k.lstm_cell_f32 = lstm_cell_f32_avx2;
        k.dot_u8i8 = dot_u8i8_avx2;
        k.dot_i8i8 = dot_i8i8_avx2;
        k.tile_u8i8 = tile_u8i8_avx2;
        k.block_u8i8 = block_u8i8_avx2;
        k.layout = Layout::Blocks;
        if has_f16c() {
            k.f16_to_f32 = f16_to_f32_f16c;
        }
    }
    if limit.allows(Isa::Avx512Vnni) && has_avx512vnni() {
        k.isa = Isa::Avx512Vnni;
        k.dot_u8i8 = dot_u8i8_avx512vnni;
        k.dot_i8i8 = dot_i8i8_avx512vnni;
        k.tile_u8i8 = tile_u8i8_avx512vnni;
        k.block_u8i8 = block_u8i8_avx512vnni;
        k.layout = Layout::Blocks;
        k.qk_f32 = qk_f32_avx512;
        k.pv_f32 = pv_f32_avx512;
        k.qk_q8 = qk_q8_avx512vnni;
        k.dequant_i32 = dequant_i32_avx512;
        k.f16_to_f32 = f16_to_f32_avx512;
        k.panel_f32 = panel_f32_avx512;
        k.dynamic_params = dynamic_params_avx512;
        k.quantize_i8 = quantize_i8_avx512;
        k.layer_norm_f32 = layer_norm_f32_avx512;
        k.rms_norm_f32 = rms_norm_f32_avx512;
        k.quantize_u8 = quantize_u8_avx512;
        k.act_f32 = act_f32_avx512;
        k.softmax_f32 = softmax_f32_avx512;
        k.lstm_cell_f32 = lstm_cell_f32_avx512;
    }
    if limit.allows(Isa::Amx) && has_amx() {
        k.isa = Isa::Amx;
        k.block16_u8i8 = Some(block16_u8i8_amx);
    }
}

kernel! { dequant_i32:
    /// The quantization correction, the reference's code compiled for AVX2.
    pub fn dequant_i32_avx2 = float::dequant_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { dequant_i32:
    /// The quantization correction with 512-bit vectors.
    pub fn dequant_i32_avx512 = float::dequant_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { qk_f32:
    /// Attention scores with 256-bit vectors: the reference's code compiled for AVX2.
    pub fn qk_f32_avx2 = float::qk_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { pv_f32:
    /// Attention's weighted value sum, the reference's code compiled for AVX2.
    pub fn pv_f32_avx2 = float::pv_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { qk_f32:
    /// Attention scores with 512-bit vectors (one register per 16 lanes).
    pub fn qk_f32_avx512 = float::qk_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { pv_f32:
    /// Attention's weighted value sum with 512-bit vectors.
    pub fn pv_f32_avx512 = float::pv_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { qk_q8:
    /// Integer scores with `vpmaddwd`: 4 keys × 4 dimensions widened to i16
    /// per instruction, two partial sums per key added once at the end.
    pub fn qk_q8_avx2 = avx2::qk_q8, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { qk_q8:
    /// Integer scores with `vpdpbusd`: 16 keys × 4 dimensions per instruction.
    pub fn qk_q8_avx512vnni = avx512vnni::qk_q8, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { pv_q8:
    /// The integer weighted sum with `vpmaddwd`: 4 dimensions × 4 positions
    /// widened to i16 per instruction. AVX-512 machines use it too.
    pub fn pv_q8_avx2 = avx2::pv_q8, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { panel_f32:
    /// The panel product with 256-bit vectors, two rows at a time (16
    /// accumulators in the 16 ymm registers).
    pub fn panel_f32_avx2 = float::panel_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { panel_f32:
    /// The panel product with 512-bit vectors, four rows at a time (16 zmm
    /// accumulators, four weight loads per input).
    pub fn panel_f32_avx512 = float::panel_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { dynamic_params:
    /// Activation range with 256-bit `vminps`/`vmaxps`.
    pub fn dynamic_params_avx2 = quant::range_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { dynamic_params:
    /// Activation range with 512-bit `vminps`/`vmaxps`, two vectors a step.
    pub fn dynamic_params_avx512 = quant::range_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { quantize_i8:
    /// Int8 KV quantization with 256-bit vectors.
    pub fn quantize_i8_avx2 = quant::quantize_i8_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { quantize_i8:
    /// Int8 KV quantization with 512-bit vectors and masked tails.
    pub fn quantize_i8_avx512 = quant::quantize_i8_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { layer_norm_f32:
    /// LayerNorm with 256-bit vectors: the reference's code.
    pub fn layer_norm_f32_avx2 = float::layer_norm_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { layer_norm_f32:
    /// LayerNorm with 512-bit vectors: the reference's code.
    pub fn layer_norm_f32_avx512 = float::layer_norm_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { rms_norm_f32:
    /// RMS norm with 256-bit vectors: the reference's code.
    pub fn rms_norm_f32_avx2 = float::rms_norm_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { rms_norm_f32:
    /// RMS norm with 512-bit vectors: the reference's code.
    pub fn rms_norm_f32_avx512 = float::rms_norm_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { quantize_u8:
    /// u8 quantization with 256-bit vectors (eight divisions at once).
    pub fn quantize_u8_avx2 = float::quantize_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { quantize_u8:
    /// u8 quantization with 512-bit vectors (sixteen divisions at once).
    pub fn quantize_u8_avx512 = float::quantize_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { act_f32:
    /// Activations with 256-bit vectors: the reference's code compiled for AVX2.
    pub fn act_f32_avx2 = float::act_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { act_f32:
    /// Activations with 512-bit vectors.
    pub fn act_f32_avx512 = float::act_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { softmax_f32:
    /// Softmax numerators with 256-bit vectors.
    pub fn softmax_f32_avx2 = float::softmax_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { softmax_f32:
    /// Softmax numerators with 512-bit vectors.
    pub fn softmax_f32_avx512 = float::softmax_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { f16_to_f32:
    /// f16 widening with F16C: eight values per `vcvtph2ps`.
    pub fn f16_to_f32_f16c = float::f16_to_f32_f16c, isa = "AVX2, FMA and F16C", when = has_f16c();
}

kernel! { f16_to_f32:
    /// f16 widening with AVX-512 F: sixteen values per `vcvtph2ps`.
    pub fn f16_to_f32_avx512 = float::f16_to_f32_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { lstm_cell_f32:
    /// The LSTM cell with 256-bit vectors, eight units at a time.
    pub fn lstm_cell_f32_avx2 = float::lstm_cell_avx2, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { lstm_cell_f32:
    /// The LSTM cell with 512-bit vectors, sixteen units (a group) at a time.
    pub fn lstm_cell_f32_avx512 = float::lstm_cell_avx512, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

/// The float kernels: the generic lane-wise bodies, compiled with wider
/// vectors. No FMA contraction happens (Rust does not fuse `a * b + c`), so
/// results equal the reference bit for bit.
mod float {
    use crate::dispatch::Dequant;
    use crate::generic::{dequant_body, f16_to_f32_body, panel_rows, pv_body, qk_body};

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dequant_avx2(acc: &[i32], d: Dequant<'_>, out: &mut [f32]) {
        dequant_body(acc, d, out)
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dequant_avx512(acc: &[i32], d: Dequant<'_>, out: &mut [f32]) {
        dequant_body(acc, d, out)
    }
    use crate::nn::{act_body, layer_norm_body, lstm_cell_body, rms_norm_body, softmax_body, Act};

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn lstm_cell_avx2(g: &[f32], c: &mut [f32], h: &mut [f32]) {
        lstm_cell_body(g, c, h)
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn lstm_cell_avx512(g: &[f32], c: &mut [f32], h: &mut [f32]) {
        lstm_cell_body(g, c, h)
    }
    use crate::quant::quantize_u8_body;

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn act_avx2(act: Act, x: &mut [f32]) {
        act_body(act, x)
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn act_avx512(act: Act, x: &mut [f32]) {
        act_body(act, x)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_avx2(x: &mut [f32]) -> f32 {
        softmax_body(x)
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn softmax_avx512(x: &mut [f32]) -> f32 {
        softmax_body(x)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn layer_norm_avx2(x: &mut [f32], g: &[f32], b: &[f32], eps: f32) {
        layer_norm_body(x, g, b, eps)
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn layer_norm_avx512(x: &mut [f32], g: &[f32], b: &[f32], eps: f32) {
        layer_norm_body(x, g, b, eps)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rms_norm_avx2(x: &mut [f32], g: &[f32], eps: f32) {
        rms_norm_body(x, g, eps)
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn rms_norm_avx512(x: &mut [f32], g: &[f32], eps: f32) {
        rms_norm_body(x, g, eps)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_avx2(x: &[f32], scale: f32, zp: u8, q: &mut [u8]) {
        quantize_u8_body(x, scale, zp, q)
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn quantize_avx512(x: &[f32], scale: f32, zp: u8, q: &mut [u8]) {
        quantize_u8_body(x, scale, zp, q)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel_avx2(xs: &[&[f32]], panel: &[f32], out: &mut [f32]) {
        panel_rows(xs, panel, out, 2)
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn panel_avx512(xs: &[&[f32]], panel: &[f32], out: &mut [f32]) {
        panel_rows(xs, panel, out, 4)
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `src` and `dst` are equally long.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16_to_f32_f16c(src: &[u16], dst: &mut [f32]) {
        use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
        let n = src.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 ≤ n ≤ src.len() = dst.len(): 16 bytes read from
            // `src` and 32 written to `dst`, all in bounds (unaligned access).
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        f16_to_f32_body(&src[n..], &mut dst[n..])
    }

    /// # Safety
    /// The CPU must support AVX-512 F; `src` and `dst` are equally long.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn f16_to_f32_avx512(src: &[u16], dst: &mut [f32]) {
        use std::arch::x86_64::{_mm256_loadu_si256, _mm512_cvtph_ps, _mm512_storeu_ps};
        let n = src.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 ≤ n ≤ src.len() = dst.len(): 32 bytes read from
            // `src` and 64 written to `dst`, all in bounds (unaligned access).
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(i).cast());
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
        }
        f16_to_f32_body(&src[n..], &mut dst[n..])
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn qk_avx2(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        qk_body(q, keys, scale, out)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pv_avx2(p: &[f32], scale: f32, vals: &[f32], out: &mut [f32]) {
        pv_body(p, scale, vals, out)
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn qk_avx512(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        qk_body(q, keys, scale, out)
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn pv_avx512(p: &[f32], scale: f32, vals: &[f32], out: &mut [f32]) {
        pv_body(p, scale, vals, out)
    }
}

kernel! { dot_u8i8:
    /// u8·i8 dot product on AVX2: both operands widened to i16 and multiplied
    /// with `vpmaddwd`, which cannot saturate (unlike `vpmaddubsw`, whose
    /// i16 pair sums overflow at 255·127·2), so the result is exact.
    pub fn dot_u8i8_avx2 = avx2::dot_u8i8, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { dot_i8i8:
    /// i8·i8 dot product on AVX2 (sign-extended to i16, `vpmaddwd`).
    pub fn dot_i8i8_avx2 = avx2::dot_i8i8, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { tile_u8i8:
    /// The 4-row micro-kernel on AVX2: each weight chunk is widened once and
    /// used for two activation vectors at a time (16 ymm registers hold 8
    /// accumulators, 4 weight chunks and the activations).
    pub fn tile_u8i8_avx2 = avx2::tile_u8i8, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { block_u8i8:
    /// The block micro-kernel on AVX2, on the same interleaved blocks as
    /// AVX-512 VNNI: 16 bytes of a group are 4 columns of 4 rows, widened to
    /// i16 once and multiplied by `vpmaddwd` against each activation's 4
    /// values of those columns (widened once per call, broadcast), so every
    /// `vpmaddwd` does 16 useful multiply-adds, none can saturate, and the
    /// only horizontal step is one `vphaddd` per 8 rows at the end. Rows go
    /// 8 at a time against 2–4 activations (8 accumulators, 2 weight
    /// registers), 32 at a time against one (a GEMV: each pass then reads
    /// 128 contiguous bytes of every 256-byte group, which streams from
    /// memory better than 32). A GEMV on weights in `[-127, 127]` (the
    /// block comes with its row sums) takes `vpmaddubsw` on `x − 128` and
    /// sign-adjusted weights instead: 32 multiply-adds per instruction, all
    /// 64 rows in one front-to-back pass (`block1_signed`).
    pub fn block_u8i8_avx2 = avx2::block_u8i8, isa = "AVX2 and FMA", when = has_avx2();
}

kernel! { dot_u8i8:
    /// u8·i8 dot product on AVX-512 VNNI: `vpdpbusd` sums four u8·i8 products
    /// straight into i32 lanes (no intermediate saturation); the tail is a
    /// masked load, so no scalar remainder loop.
    pub fn dot_u8i8_avx512vnni = avx512vnni::dot_u8i8, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { dot_i8i8:
    /// i8·i8 dot product on AVX-512 VNNI: `vpdpbusd` on `a + 128` (as u8),
    /// minus `128 · Σb` accumulated by a second `vpdpbusd` against ones.
    pub fn dot_i8i8_avx512vnni = avx512vnni::dot_i8i8, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { tile_u8i8:
    /// The 4-row micro-kernel on AVX-512 VNNI: four 64-byte weight chunks
    /// loaded once per step feed up to 16 `vpdpbusd` accumulators (4 rows × 4
    /// activations); masked loads for the tail.
    pub fn tile_u8i8_avx512vnni = avx512vnni::tile_u8i8, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { block_u8i8:
    /// The block micro-kernel on AVX-512 VNNI: per group of 4 columns, four
    /// 64-byte loads hold the 64 rows, and one `vpdpbusd` per (16 rows,
    /// activation) against the activation's 4 bytes broadcast: 16 independent
    /// accumulators at 4 activations, no horizontal sums.
    pub fn block_u8i8_avx512vnni = avx512vnni::block_u8i8, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

kernel! { block16_u8i8:
    /// 16 activations × 64 rows per block on AMX tiles, 64 columns per step.
    pub fn block16_u8i8_amx = amx::block16, isa = "AMX int8 (and the kernel's tile grant)", when = has_amx();
}

/// Range and int8 quantization in intrinsics: LLVM does not vectorize a
/// min/max reduction over floats without fast-math (the reference's lanes
/// came out as 32 scalar `vminss`/`vmaxss`), nor the saturating casts of
/// the int8 rounding. Min and max are exact and order-free, and the
/// rounding is the reference's operation for operation, so each returns
/// the reference's bits.
mod quant {
    use std::arch::x86_64::*;

    use crate::quant::{i8_scale, params_of_range, to_i8};

    /// Mask of the low `k` ≤ 16 lanes.
    fn lanes16(k: usize) -> __mmask16 {
        (((1u32 << k) - 1) & 0xffff) as __mmask16
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn range_avx2(x: &[f32]) -> (f32, u8) {
        let (n, p) = (x.len(), x.as_ptr());
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 ≤ n: the 8 floats lie inside `x`.
            let v = unsafe { _mm256_loadu_ps(p.add(i)) };
            // (v < lo) ? v : lo, as the reference compares: a NaN loses.
            lo = _mm256_min_ps(v, lo);
            hi = _mm256_max_ps(v, hi);
            i += 8;
        }
        let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
        // SAFETY: each array holds the 8 floats stored.
        unsafe {
            _mm256_storeu_ps(l.as_mut_ptr(), lo);
            _mm256_storeu_ps(h.as_mut_ptr(), hi);
        }
        let (mut lo, mut hi) = (0f32, 0f32);
        for &v in l.iter().chain(&h).chain(&x[i..]) {
            lo = if v < lo { v } else { lo };
            hi = if v > hi { v } else { hi };
        }
        params_of_range(lo, hi)
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn range_avx512(x: &[f32]) -> (f32, u8) {
        let (n, p) = (x.len(), x.as_ptr());
        let z = _mm512_setzero_ps();
        let (mut lo0, mut hi0, mut lo1, mut hi1) = (z, z, z, z);
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: i + 32 ≤ n: both vectors lie inside `x`.
            let (a, b) = unsafe { (_mm512_loadu_ps(p.add(i)), _mm512_loadu_ps(p.add(i + 16))) };
            // (a < lo) ? a : lo, as the reference compares: a NaN loses.
            (lo0, hi0) = (_mm512_min_ps(a, lo0), _mm512_max_ps(a, hi0));
            (lo1, hi1) = (_mm512_min_ps(b, lo1), _mm512_max_ps(b, hi1));
            i += 32;
        }
        while i < n {
            // Lanes past the end load as 0, which the range holds anyway.
            // SAFETY: the mask covers only the n − i floats left in `x`.
            let a = unsafe { _mm512_maskz_loadu_ps(lanes16((n - i).min(16)), p.add(i)) };
            (lo0, hi0) = (_mm512_min_ps(a, lo0), _mm512_max_ps(a, hi0));
            i += 16;
        }
        let lo = _mm512_reduce_min_ps(_mm512_min_ps(lo0, lo1));
        let hi = _mm512_reduce_max_ps(_mm512_max_ps(hi0, hi1));
        params_of_range(lo, hi)
    }

    /// # Safety
    /// The CPU must support AVX2; `x` and `q` are equally long.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_i8_avx2(x: &[f32], q: &mut [i8]) -> f32 {
        let (n, p) = (x.len(), x.as_ptr());
        let (abs, inf) = (
            _mm256_set1_epi32(0x7fff_ffff),
            _mm256_set1_epi32(0x7f80_0000),
        );
        let mut m = _mm256_setzero_si256();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 ≤ n: the 8 floats lie inside `x`.
            let v = unsafe { _mm256_loadu_si256(p.add(i).cast()) };
            // |v| as bits, whose integer order is the float order; NaNs
            // (above infinity's bits) count as 0, as `f32::max` skips them.
            let a = _mm256_and_si256(v, abs);
            m = _mm256_max_epi32(m, _mm256_andnot_si256(_mm256_cmpgt_epi32(a, inf), a));
            i += 8;
        }
        let mut lanes = [0u32; 8];
        // SAFETY: the array holds the 8 lanes stored.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), m) };
        let max = lanes.iter().fold(0f32, |m, &b| m.max(f32::from_bits(b)));
        let scale = i8_scale(x[i..].iter().fold(max, |m, v| m.max(v.abs())));
        if scale == 0.0 {
            q.fill(0);
            return scale;
        }
        let (s, half, sign) = (
            _mm256_set1_ps(scale),
            _mm256_set1_ps(0.5),
            _mm256_set1_ps(-0.0),
        );
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        // The low byte of each dword, then dwords 0 and 4 side by side.
        let bytes = _mm256_setr_epi8(
            0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, //
            0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        );
        let pair = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
        let mut j = 0;
        while j + 8 <= n {
            // SAFETY: j + 8 ≤ n: the 8 floats lie inside `x`.
            let r = _mm256_div_ps(unsafe { _mm256_loadu_ps(p.add(j)) }, s);
            // r + copysign(0.5, r), clamped to ±127 where truncating does
            // the same, and a NaN (ordered compare false) to 0.
            let t = _mm256_add_ps(r, _mm256_or_ps(half, _mm256_and_ps(r, sign)));
            let c = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
            let c = _mm256_and_ps(c, _mm256_cmp_ps::<_CMP_ORD_Q>(t, t));
            let d = _mm256_permutevar8x32_epi32(
                _mm256_shuffle_epi8(_mm256_cvttps_epi32(c), bytes),
                pair,
            );
            // SAFETY: j + 8 ≤ n = q.len(): the 8 bytes stored lie inside `q`.
            unsafe { _mm_storel_epi64(q.as_mut_ptr().add(j).cast(), _mm256_castsi256_si128(d)) };
            j += 8;
        }
        for (q, &v) in q[j..].iter_mut().zip(&x[j..]) {
            *q = to_i8(v, scale);
        }
        scale
    }

    /// # Safety
    /// The CPU must support AVX-512 F; `x` and `q` are equally long.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn quantize_i8_avx512(x: &[f32], q: &mut [i8]) -> f32 {
        let (n, p) = (x.len(), x.as_ptr());
        let (abs, inf) = (
            _mm512_set1_epi32(0x7fff_ffff),
            _mm512_set1_epi32(0x7f80_0000),
        );
        let mut m = _mm512_setzero_si512();
        let mut i = 0;
        while i < n {
            let k = lanes16((n - i).min(16));
            // SAFETY: the mask covers only the floats left in `x`.
            let v = unsafe { _mm512_maskz_loadu_epi32(k, p.add(i).cast()) };
            // |v| as bits, whose integer order is the float order; NaNs
            // (above infinity's bits) count as 0, as `f32::max` skips them.
            let a = _mm512_and_si512(v, abs);
            m = _mm512_max_epu32(
                m,
                _mm512_maskz_mov_epi32(_mm512_cmple_epu32_mask(a, inf), a),
            );
            i += 16;
        }
        let scale = i8_scale(f32::from_bits(_mm512_reduce_max_epu32(m)));
        if scale == 0.0 {
            q.fill(0);
            return scale;
        }
        let s = _mm512_set1_ps(scale);
        let (half, sign) = (_mm512_set1_epi32(0x3f00_0000), _mm512_set1_epi32(i32::MIN));
        let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
        let mut j = 0;
        while j < n {
            let k = lanes16((n - j).min(16));
            // SAFETY: the mask covers only the floats left in `x`.
            let r = _mm512_div_ps(unsafe { _mm512_maskz_loadu_ps(k, p.add(j)) }, s);
            // r + copysign(0.5, r), clamped to ±127 where truncating does
            // the same, and a NaN (ordered compare false) to 0.
            let sh = _mm512_or_si512(half, _mm512_and_si512(_mm512_castps_si512(r), sign));
            let t = _mm512_add_ps(r, _mm512_castsi512_ps(sh));
            let c = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
            let d = _mm512_maskz_cvttps_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(t, t), c);
            // SAFETY: the mask stores only the bytes left in `q` (as long as `x`).
            unsafe { _mm512_mask_cvtepi32_storeu_epi8(q.as_mut_ptr().add(j), k, d) };
            j += 16;
        }
        scale
    }
}

mod avx2 {
    use std::arch::x86_64::*;

    use crate::dispatch::{Block64, Rows4, BLOCK_GROUP, BLOCK_ROWS, TILE_ACTS, TILE_ROWS};

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// The lane sums of four accumulators at once: `[Σa0, Σa1, Σa2, Σa3]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn reduce4(a: &[__m256i; 4]) -> [i32; 4] {
        let s = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let mut out = [0i32; 4];
        // SAFETY: `out` is 16 writable bytes.
        unsafe { _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, s) };
        out
    }

    /// `Σ a[i]·b[i]` over `n` bytes, `a` read as u8 or (`SIGNED_A`) as i8.
    ///
    /// # Safety
    /// The CPU must support AVX2; `a` and `b` point to `n` ≤ `MAX_DOT_LEN` readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot<const SIGNED_A: bool>(a: *const u8, b: *const i8, n: usize) -> i32 {
        let mut acc = _mm256_setzero_si256();
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n bytes remain behind both pointers; unaligned loads.
            let (va, vb) = unsafe {
                (
                    _mm_loadu_si128(a.add(i) as *const __m128i),
                    _mm_loadu_si128(b.add(i) as *const __m128i),
                )
            };
            let wa = if SIGNED_A {
                _mm256_cvtepi8_epi16(va)
            } else {
                _mm256_cvtepu8_epi16(va)
            };
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(wa, _mm256_cvtepi8_epi16(vb)));
            i += 16;
        }
        let mut tail = 0i32;
        for j in i..n {
            // SAFETY: j < n.
            let (x, w) = unsafe { (*a.add(j), *b.add(j)) };
            let x = if SIGNED_A { x as i8 as i32 } else { x as i32 };
            tail += x * w as i32;
        }
        hsum(acc) + tail
    }

    /// # Safety
    /// The CPU must support AVX2; `a` and `b` must have equal lengths ≤ `MAX_DOT_LEN`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_u8i8(a: &[u8], b: &[i8]) -> i32 {
        // SAFETY: both slices hold a.len() bytes; preconditions forwarded.
        unsafe { dot::<false>(a.as_ptr(), b.as_ptr(), a.len()) }
    }

    /// # Safety
    /// The CPU must support AVX2; `a` and `b` must have equal lengths ≤ `MAX_DOT_LEN`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_i8i8(a: &[i8], b: &[i8]) -> i32 {
        // SAFETY: both slices hold a.len() bytes; preconditions forwarded.
        unsafe { dot::<true>(a.as_ptr() as *const u8, b.as_ptr(), a.len()) }
    }

    /// # Safety
    /// The CPU must support AVX2; `xs` holds 1–4 vectors of length `n` ≤
    /// `w.stride`, and `w.data` holds four rows of `n` bytes at `r * w.stride`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_u8i8(
        xs: &[&[u8]],
        n: usize,
        w: Rows4,
    ) -> [[i32; TILE_ROWS]; TILE_ACTS] {
        let mut out = [[0; TILE_ROWS]; TILE_ACTS];
        let mut a = 0;
        while a < xs.len() {
            if a + 2 <= xs.len() {
                // SAFETY: forwarded preconditions; two vectors of length n.
                let r = unsafe { tile::<2>(&xs[a..a + 2], n, w) };
                out[a..a + 2].copy_from_slice(&r);
                a += 2;
            } else {
                // SAFETY: forwarded preconditions; one vector of length n.
                out[a] = unsafe { tile::<1>(&xs[a..a + 1], n, w) }[0];
                a += 1;
            }
        }
        out
    }

    /// # Safety
    /// As [`tile_u8i8`], with `xs.len() == B`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const B: usize>(xs: &[&[u8]], n: usize, w: Rows4) -> [[i32; TILE_ROWS]; B] {
        let mut acc = [[_mm256_setzero_si256(); TILE_ROWS]; B];
        let wp = w.data.as_ptr();
        let mut i = 0;
        while i + 16 <= n {
            let mut wr = [_mm256_setzero_si256(); TILE_ROWS];
            for (r, v) in wr.iter_mut().enumerate() {
                // SAFETY: row r holds n ≥ i + 16 bytes from r * stride, inside w.data.
                let c = unsafe { _mm_loadu_si128(wp.add(r * w.stride + i) as *const __m128i) };
                *v = _mm256_cvtepi8_epi16(c);
            }
            for (acc_a, x) in acc.iter_mut().zip(xs) {
                // SAFETY: x has n ≥ i + 16 bytes.
                let c = unsafe { _mm_loadu_si128(x.as_ptr().add(i) as *const __m128i) };
                let xv = _mm256_cvtepu8_epi16(c);
                for (acc_r, wv) in acc_a.iter_mut().zip(&wr) {
                    *acc_r = _mm256_add_epi32(*acc_r, _mm256_madd_epi16(xv, *wv));
                }
            }
            i += 16;
        }
        let mut out = [[0; TILE_ROWS]; B];
        for ((o, acc_a), x) in out.iter_mut().zip(&acc).zip(xs) {
            *o = reduce4(acc_a);
            for (r, v) in o.iter_mut().enumerate() {
                let row = &w.data[r * w.stride..r * w.stride + n];
                let tail: i32 = x[i..]
                    .iter()
                    .zip(&row[i..])
                    .map(|(&x, &w)| x as i32 * w as i32)
                    .sum();
                *v += tail;
            }
        }
        out
    }

    /// Columns of activations widened to i16 per pass over a block's rows.
    const CHUNK: usize = 256;
    /// Rows one pass of [`block`] computes (two registers of 4 rows × 2
    /// column pairs); [`block1`] takes 32.
    const SLICE: usize = 8;

    /// The next block, when `w.data` holds one past this block of `n`
    /// columns: each of its lines is asked for while the same line of this
    /// block is first read, a block's compute time before it is needed (the
    /// groups' 256-byte stride is one the hardware prefetcher picks up late).
    fn next_block(w: &Block64, n: usize) -> Option<*const i8> {
        let stride = n.div_ceil(4) * BLOCK_GROUP;
        (w.data.len() >= 2 * stride).then(|| w.data.as_ptr().wrapping_add(stride))
    }

    /// `x` (one chunk of an activation, at most [`CHUNK`] values) as i16 in
    /// `d`, zero up to the end of its last group of 4 (absent columns of that
    /// group then count nothing whatever their weights).
    #[inline]
    fn widen(x: &[u8], d: &mut [i16; CHUNK]) {
        for (d, &v) in d.iter_mut().zip(x) {
            *d = v as i16;
        }
        d[x.len()..x.len().div_ceil(4) * 4].fill(0);
    }

    /// # Safety
    /// The CPU must support AVX2; `xs` holds 1–4 vectors of length `n`, and
    /// `w.data` holds `n.div_ceil(4)` groups.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block_u8i8(
        xs: &[&[u8]],
        n: usize,
        w: Block64,
    ) -> [[i32; BLOCK_ROWS]; TILE_ACTS] {
        let mut out = [[0; BLOCK_ROWS]; TILE_ACTS];
        // The sums are stored straight into `out` (no 1 KiB copy per call).
        match xs.len() {
            // SAFETY (all arms): preconditions forwarded, xs.len() == B.
            1 => match w.sums {
                Some(sums) => unsafe { block1_signed(xs[0], n, w, sums, &mut out[0]) },
                None => unsafe { block1(xs[0], n, w, &mut out[0]) },
            },
            2 => unsafe { block::<2>(xs, n, w, &mut out) },
            3 => unsafe { block::<3>(xs, n, w, &mut out) },
            _ => unsafe { block::<4>(xs, n, w, &mut out) },
        }
        out
    }

    /// # Safety
    /// As [`block_u8i8`] with one activation `x` (a GEMV) whose weights'
    /// first `n` columns lie in `[-127, 127]`, with their row sums `sums`
    /// (see [`Block64::sums`]; wrong sums give wrong results, not UB).
    ///
    /// Each 32-byte load is 8 rows × 4 columns; the activation's 4 values
    /// go in as `x − 128` (i8), broadcast. `vpmaddubsw(|x − 128|,
    /// sign(w, x − 128))` is the products `(x − 128) · w` summed in pairs:
    /// `|x − 128| ≤ 128` and `|w| ≤ 127` keep a pair within `±32512`, so
    /// nothing saturates; `vpmaddwd` against ones finishes each row's 4
    /// columns as an i32 lane, and `128 · Σ w` restores `Σ x · w` at the end.
    /// 32 multiply-adds in 4 instructions against 16 in 3 (widening,
    /// `vpmaddwd`, add), no horizontal sums, and 8 accumulators cover all 64
    /// rows, so one pass reads the block front to back.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block1_signed(
        x: &[u8],
        n: usize,
        w: Block64,
        sums: &[i32; BLOCK_ROWS],
        out: &mut [i32; BLOCK_ROWS],
    ) {
        let mut acc = [_mm256_setzero_si256(); BLOCK_ROWS / 8];
        // The chunk's activations minus 128, zero past `n` to the end of
        // its last group (sign(w, 0) = 0: those columns count nothing).
        let mut xs = [0i8; CHUNK];
        let wp = w.data.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let mut c0 = 0;
        while c0 < n {
            let cols = (n - c0).min(CHUNK);
            let groups = cols.div_ceil(4);
            for (d, &v) in xs.iter_mut().zip(&x[c0..c0 + cols]) {
                *d = (v ^ 0x80) as i8;
            }
            xs[cols..groups * 4].fill(0);
            let g0 = c0 / 4;
            for g in 0..groups {
                // SAFETY: 4g + 4 ≤ groups · 4 ≤ CHUNK values of xs;
                // unaligned 4-byte read.
                let q = unsafe { (xs.as_ptr().add(4 * g) as *const i32).read_unaligned() };
                let xq = _mm256_set1_epi32(q);
                let xa = _mm256_abs_epi8(xq);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    // SAFETY: group g0 + g < n.div_ceil(4) lies inside
                    // w.data (the caller's precondition); its bytes
                    // 32r..32r + 32 (rows 8r..8r + 8), an unaligned load.
                    let wv = unsafe {
                        _mm256_loadu_si256(wp.add((g0 + g) * BLOCK_GROUP + 32 * r) as *const __m256i)
                    };
                    let p = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv, xq));
                    *acc_r = _mm256_add_epi32(*acc_r, _mm256_madd_epi16(p, ones));
                }
            }
            c0 += cols;
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: 8 readable i32 of `sums` and 8 writable of `out` at row
            // 8r ≤ 56; unaligned accesses.
            unsafe {
                let s = _mm256_loadu_si256(sums.as_ptr().add(8 * r) as *const __m256i);
                let v = _mm256_add_epi32(*a, _mm256_slli_epi32(s, 7));
                _mm256_storeu_si256(out.as_mut_ptr().add(8 * r) as *mut __m256i, v);
            }
        }
    }

    /// # Safety
    /// As [`block_u8i8`] with one activation `x` (a GEMV): slices of 32 rows,
    /// so a pass reads 128 contiguous bytes of each 256-byte group (two
    /// passes per block instead of eight) and the weights stream from memory
    /// more sequentially; 8 accumulators, as [`block`] has at 4 activations.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block1(x: &[u8], n: usize, w: Block64, out: &mut [i32; BLOCK_ROWS]) {
        const ROWS: usize = 32;
        let mut acc = [[_mm256_setzero_si256(); 8]; BLOCK_ROWS / ROWS];
        let mut x16 = [0i16; CHUNK];
        let wp = w.data.as_ptr();
        let next = next_block(&w, n);
        let mut c0 = 0;
        while c0 < n {
            let cols = (n - c0).min(CHUNK);
            let groups = cols.div_ceil(4);
            widen(&x[c0..c0 + cols], &mut x16);
            let g0 = c0 / 4;
            for (s, acc_s) in acc.iter_mut().enumerate() {
                let mut a = *acc_s;
                for g in 0..groups {
                    let at = (g0 + g) * BLOCK_GROUP + s * ROWS * 4;
                    if let Some(next) = next {
                        crate::mem::prefetch_line(next.wrapping_add(at));
                        crate::mem::prefetch_line(next.wrapping_add(at + 64));
                    }
                    // SAFETY: 4g + 4 ≤ groups · 4 ≤ CHUNK values of x16;
                    // unaligned 8-byte read.
                    let q = unsafe { (x16.as_ptr().add(4 * g) as *const i64).read_unaligned() };
                    let xq = _mm256_set1_epi64x(q);
                    for (r, acc_r) in a.iter_mut().enumerate() {
                        // SAFETY: group g0 + g < n.div_ceil(4) lies inside
                        // w.data (the caller's precondition); 16 of this
                        // slice's 128 bytes of it, an unaligned load.
                        let wv = unsafe {
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(
                                wp.add(at + 16 * r) as *const __m128i
                            ))
                        };
                        *acc_r = _mm256_add_epi32(*acc_r, _mm256_madd_epi16(wv, xq));
                    }
                }
                *acc_s = a;
            }
            c0 += cols;
        }
        for (s, a) in acc.iter().enumerate() {
            for j in 0..4 {
                let v = pairs8(a[2 * j], a[2 * j + 1]);
                // SAFETY: 8 writable i32 (32 bytes) at row s · 32 + 8j ≤ 56; unaligned store.
                unsafe {
                    _mm256_storeu_si256(out.as_mut_ptr().add(s * ROWS + 8 * j) as *mut __m256i, v)
                };
            }
        }
    }

    /// # Safety
    /// As [`block_u8i8`], with `xs.len() == B`; the sums go to `out[..B]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const B: usize>(
        xs: &[&[u8]],
        n: usize,
        w: Block64,
        out: &mut [[i32; BLOCK_ROWS]; TILE_ACTS],
    ) {
        const SLICES: usize = BLOCK_ROWS / SLICE;
        // Per slice and activation: rows 0–3 and 4–7 of the slice, each lane
        // the sum over one column pair of every group so far.
        let mut acc = [[[_mm256_setzero_si256(); 2]; B]; SLICES];
        // The chunk's activations as i16.
        let mut x16 = [[0i16; CHUNK]; B];
        let wp = w.data.as_ptr();
        let next = next_block(&w, n);
        let mut c0 = 0;
        while c0 < n {
            let cols = (n - c0).min(CHUNK);
            let groups = cols.div_ceil(4);
            for (d, x) in x16.iter_mut().zip(xs) {
                widen(&x[c0..c0 + cols], d);
            }
            let g0 = c0 / 4;
            for (s, acc_s) in acc.iter_mut().enumerate() {
                let mut a = *acc_s;
                for g in 0..groups {
                    // SAFETY: group g0 + g < n.div_ceil(4) lies inside w.data
                    // (the caller's precondition); this slice's 32 bytes of
                    // it, two unaligned 16-byte loads.
                    let (w0, w1) = unsafe {
                        let p = wp.add((g0 + g) * BLOCK_GROUP + s * SLICE * 4);
                        (
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i)),
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(16) as *const __m128i)),
                        )
                    };
                    if let Some(next) = next.filter(|_| s % 2 == 0) {
                        let at = (g0 + g) * BLOCK_GROUP + s * SLICE * 4;
                        crate::mem::prefetch_line(next.wrapping_add(at));
                    }
                    for (acc_a, x) in a.iter_mut().zip(&x16) {
                        // SAFETY: 4g + 4 ≤ groups · 4 ≤ CHUNK values of x;
                        // unaligned 8-byte read.
                        let q = unsafe { (x.as_ptr().add(4 * g) as *const i64).read_unaligned() };
                        let xq = _mm256_set1_epi64x(q);
                        acc_a[0] = _mm256_add_epi32(acc_a[0], _mm256_madd_epi16(w0, xq));
                        acc_a[1] = _mm256_add_epi32(acc_a[1], _mm256_madd_epi16(w1, xq));
                    }
                }
                *acc_s = a;
            }
            c0 += cols;
        }
        for (s, acc_s) in acc.iter().enumerate() {
            for (o, a) in out.iter_mut().zip(acc_s) {
                let v = pairs8(a[0], a[1]);
                // SAFETY: 8 writable i32 (32 bytes) at row s · SLICE; unaligned store.
                unsafe { _mm256_storeu_si256(o.as_mut_ptr().add(s * SLICE) as *mut __m256i, v) };
            }
        }
    }

    /// Four i16 as `vpmaddwd`'s second operand for a group of 4 widened
    /// bytes: `[a, b, c, d]` in every 64-bit lane.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn broadcast4(v: [i16; 4]) -> __m256i {
        let bits = v
            .iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 16) | x as u16 as u64);
        _mm256_set1_epi64x(bits as i64)
    }

    /// Eight sums in order from two `vpmaddwd` accumulators over groups of 4
    /// (`a`: items 0–3, `b`: items 4–7, two partial sums per item): the
    /// block kernels' rows, `qk_q8`'s keys, `pv_q8`'s dimensions.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn pairs8(a: __m256i, b: __m256i) -> __m256i {
        // [i0 i1 i4 i5 | i2 i3 i6 i7] -> items in order.
        _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), 0b11_01_10_00)
    }

    /// # Safety
    /// The CPU must support AVX2; `check_qk_q8`'s conditions hold (whole
    /// groups of 4 in `q`, as many 64-byte groups in `keys`, at most 16
    /// scores with a scale each).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn qk_q8(q: &[i8], keys: &[i8], ks: &[f32], scale: f32, out: &mut [f32]) {
        // Keys 0–3, 4–7, 8–11, 12–15: two partial sums per key.
        let mut acc = [_mm256_setzero_si256(); 4];
        let kp = keys.as_ptr();
        for (g, q4) in q.chunks_exact(4).enumerate() {
            let qv = broadcast4([q4[0] as i16, q4[1] as i16, q4[2] as i16, q4[3] as i16]);
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: `keys` holds a 64-byte group per 4 query values
                // (check_qk_q8); bytes 16i..16i + 16 of group g, unaligned.
                let k = unsafe { _mm_loadu_si128(kp.add(64 * g + 16 * i) as *const __m128i) };
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(_mm256_cvtepi8_epi16(k), qv));
            }
        }
        let mut sums = [0i32; 16];
        for (h, s) in sums.chunks_exact_mut(8).enumerate() {
            // SAFETY: 8 writable i32 (32 bytes); unaligned store.
            unsafe {
                _mm256_storeu_si256(
                    s.as_mut_ptr() as *mut __m256i,
                    pairs8(acc[2 * h], acc[2 * h + 1]),
                )
            };
        }
        for ((o, &a), &s) in out.iter_mut().zip(&sums).zip(ks) {
            *o = a as f32 * scale * s;
        }
    }

    /// # Safety
    /// The CPU must support AVX2; `check_pv_q8`'s conditions hold (at most
    /// 16 weights, `vals` a whole block of out.len() dimensions).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pv_q8(w: &[f32], scale: f32, vals: &[i8], out: &mut [f32]) {
        let (wq, ws) = crate::generic::weights_u8(w);
        if ws == 0.0 {
            return;
        }
        let (d, c) = (out.len(), ws * scale);
        let groups = w.len().div_ceil(4);
        // Each group's 4 weights (u8, so positive as i16) against 4 dimensions'
        // 4 positions widened to i16: two partial sums per dimension.
        let mut wv = [_mm256_setzero_si256(); 4];
        for (g, v) in wv.iter_mut().enumerate().take(groups) {
            let w4 = &wq[4 * g..4 * g + 4];
            *v = broadcast4([w4[0] as i16, w4[1] as i16, w4[2] as i16, w4[3] as i16]);
        }
        let (vp, cv) = (vals.as_ptr(), _mm256_set1_ps(c));
        let full = d / 8 * 8;
        for c0 in (0..full).step_by(8) {
            let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for (g, &wg) in wv.iter().enumerate().take(groups) {
                // SAFETY: group g is 4d bytes at 4dg inside the block of 16d
                // (check_pv_q8, g < 4); its bytes 4c0..4c0 + 32 with c0 + 8 ≤ d.
                let (a, b) = unsafe {
                    let p = vp.add(4 * d * g + 4 * c0);
                    (
                        _mm_loadu_si128(p as *const __m128i),
                        _mm_loadu_si128(p.add(16) as *const __m128i),
                    )
                };
                lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_cvtepi8_epi16(a), wg));
                hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_cvtepi8_epi16(b), wg));
            }
            let s = _mm256_cvtepi32_ps(pairs8(lo, hi));
            // SAFETY: out[c0..c0 + 8] is in bounds (c0 + 8 ≤ d); unaligned.
            unsafe {
                let o = out.as_mut_ptr().add(c0);
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_mul_ps(s, cv)));
            }
        }
        // The last d mod 8 dimensions, as the reference sums them.
        for (dim, o) in out.iter_mut().enumerate().skip(full) {
            let mut a = 0i32;
            for (g, w4) in wq.chunks_exact(4).enumerate().take(groups) {
                let v = &vals[4 * d * g + 4 * dim..][..4];
                a += (0..4).map(|t| w4[t] as i32 * v[t] as i32).sum::<i32>();
            }
            *o += a as f32 * c;
        }
    }
}

mod avx512vnni {
    use std::arch::x86_64::*;

    use crate::dispatch::{Block64, Rows4, BLOCK_GROUP, BLOCK_ROWS, TILE_ACTS, TILE_ROWS};

    /// Mask of the low `k` < 64 bytes.
    fn tail_mask(k: usize) -> __mmask64 {
        (1u64 << k) - 1
    }

    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI; `check_qk_q8`'s
    /// conditions hold (whole groups of 4 in `q`, as many 64-byte groups in
    /// `keys`, a scale for each of the ≤ 16 scores).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn qk_q8(q: &[i8], keys: &[i8], ks: &[f32], scale: f32, out: &mut [f32]) {
        // `vpdpbusd` multiplies u8 by i8: the query goes in as q + 128 (its
        // bytes with the top bit flipped), and 128 · Σk comes off again,
        // Σk from a second `vpdpbusd` against ones. Exact in i32 (|q|, |k|
        // ≤ 127). Two chains of each (even and odd groups), in registers, so
        // they do not wait on each other.
        let ones = _mm512_set1_epi8(1);
        let z = _mm512_setzero_si512();
        let (mut acc0, mut acc1, mut sum0, mut sum1) = (z, z, z, z);
        let word = |q4: &[i8]| {
            let w = u32::from_le_bytes([q4[0] as u8, q4[1] as u8, q4[2] as u8, q4[3] as u8]);
            _mm512_set1_epi32((w ^ 0x8080_8080) as i32)
        };
        let kp = keys.as_ptr();
        let pairs = q.chunks_exact(8);
        let last = pairs.remainder();
        for (g, q8) in pairs.enumerate() {
            // SAFETY: groups 2g and 2g + 1 (64 bytes each) lie inside `keys`
            // (2g + 1 < q.len()/4 and keys.len() = 16 · q.len(), checked by
            // the caller).
            let (k0, k1) = unsafe {
                (
                    _mm512_loadu_si512(kp.add(g * 128).cast()),
                    _mm512_loadu_si512(kp.add(g * 128 + 64).cast()),
                )
            };
            acc0 = _mm512_dpbusd_epi32(acc0, word(&q8[..4]), k0);
            sum0 = _mm512_dpbusd_epi32(sum0, ones, k0);
            acc1 = _mm512_dpbusd_epi32(acc1, word(&q8[4..]), k1);
            sum1 = _mm512_dpbusd_epi32(sum1, ones, k1);
        }
        if !last.is_empty() {
            // SAFETY: the last group's 64 bytes end `keys` (checked as above).
            let k0 = unsafe { _mm512_loadu_si512(kp.add((q.len() / 8) * 128).cast()) };
            acc0 = _mm512_dpbusd_epi32(acc0, word(last), k0);
            sum0 = _mm512_dpbusd_epi32(sum0, ones, k0);
        }
        let dot = _mm512_sub_epi32(
            _mm512_add_epi32(acc0, acc1),
            _mm512_slli_epi32::<7>(_mm512_add_epi32(sum0, sum1)),
        );
        let m: __mmask16 = ((1u32 << out.len()) - 1) as __mmask16;
        // SAFETY: the mask covers out.len() ≤ 16 lanes, and ks holds at
        // least that many scales (checked by the caller).
        let kscale = unsafe { _mm512_maskz_loadu_ps(m, ks.as_ptr()) };
        let r = _mm512_mul_ps(
            _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(scale)),
            kscale,
        );
        // SAFETY: the mask stores only the out.len() lanes `out` holds.
        unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr(), m, r) };
    }

    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI; `a` and `b` must have
    /// equal lengths ≤ `MAX_DOT_LEN`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_u8i8(a: &[u8], b: &[i8]) -> i32 {
        let n = a.len();
        let mut acc = _mm512_setzero_si512();
        let mut i = 0;
        while i + 64 <= n {
            // SAFETY: i + 64 <= n bytes remain in both slices; unaligned loads.
            let (va, vb) = unsafe {
                (
                    _mm512_loadu_si512(a.as_ptr().add(i) as *const _),
                    _mm512_loadu_si512(b.as_ptr().add(i) as *const _),
                )
            };
            acc = _mm512_dpbusd_epi32(acc, va, vb);
            i += 64;
        }
        if i < n {
            let mask = tail_mask(n - i);
            // SAFETY: the mask enables only the n - i < 64 bytes left in each slice;
            // masked-off bytes are not read (no fault past the end).
            let (va, vb) = unsafe {
                (
                    _mm512_maskz_loadu_epi8(mask, a.as_ptr().add(i) as *const i8),
                    _mm512_maskz_loadu_epi8(mask, b.as_ptr().add(i)),
                )
            };
            acc = _mm512_dpbusd_epi32(acc, va, vb);
        }
        _mm512_reduce_add_epi32(acc)
    }

    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI; `a` and `b` must have
    /// equal lengths ≤ `MAX_DOT_LEN`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_i8i8(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len();
        let flip = _mm512_set1_epi8(-128);
        let ones = _mm512_set1_epi8(1);
        let (mut acc, mut sum_b) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let mut i = 0;
        while i < n {
            let mask = if n - i >= 64 { !0 } else { tail_mask(n - i) };
            // SAFETY: the mask enables at most the n - i bytes left in each slice.
            let (va, vb) = unsafe {
                (
                    _mm512_maskz_loadu_epi8(mask, a.as_ptr().add(i)),
                    _mm512_maskz_loadu_epi8(mask, b.as_ptr().add(i)),
                )
            };
            // a + 128 as u8 (masked-off lanes stay 0: their b is 0 anyway).
            let ua = _mm512_xor_si512(va, flip);
            acc = _mm512_dpbusd_epi32(acc, ua, vb);
            sum_b = _mm512_dpbusd_epi32(sum_b, ones, vb);
            i += 64;
        }
        _mm512_reduce_add_epi32(acc) - 128 * _mm512_reduce_add_epi32(sum_b)
    }

    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI; `xs` holds 1–4 vectors of
    /// length `n` ≤ `w.stride`, and `w.data` holds four rows of `n` bytes at
    /// `r * w.stride`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_u8i8(
        xs: &[&[u8]],
        n: usize,
        w: Rows4,
    ) -> [[i32; TILE_ROWS]; TILE_ACTS] {
        // SAFETY: preconditions forwarded.
        unsafe { by_batch!(tile, xs, n, w) }
    }

    /// # Safety
    /// As [`tile_u8i8`], with `xs.len() == B`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const B: usize>(xs: &[&[u8]], n: usize, w: Rows4) -> [[i32; TILE_ROWS]; B] {
        let mut acc = [[_mm512_setzero_si512(); TILE_ROWS]; B];
        let wp = w.data.as_ptr();
        let mut i = 0;
        while i < n {
            let mask = if n - i >= 64 { !0 } else { tail_mask(n - i) };
            let mut wr = [_mm512_setzero_si512(); TILE_ROWS];
            for (r, v) in wr.iter_mut().enumerate() {
                // SAFETY: the mask enables at most the n - i bytes left in row r,
                // which lies inside w.data.
                *v = unsafe { _mm512_maskz_loadu_epi8(mask, wp.add(r * w.stride + i)) };
            }
            for (acc_a, x) in acc.iter_mut().zip(xs) {
                // SAFETY: the mask enables at most the n - i bytes left in x.
                let xv = unsafe { _mm512_maskz_loadu_epi8(mask, x.as_ptr().add(i) as *const i8) };
                for (acc_r, wv) in acc_a.iter_mut().zip(&wr) {
                    *acc_r = _mm512_dpbusd_epi32(*acc_r, xv, *wv);
                }
            }
            i += 64;
        }
        let mut out = [[0; TILE_ROWS]; B];
        for (o, acc_a) in out.iter_mut().zip(&acc) {
            // Fold each 512-bit accumulator to 256 bits, then the AVX2 tree.
            let mut half = [_mm256_setzero_si256(); TILE_ROWS];
            for (h, a) in half.iter_mut().zip(acc_a) {
                *h = _mm256_add_epi32(_mm512_castsi512_si256(*a), _mm512_extracti64x4_epi64(*a, 1));
            }
            *o = super::avx2::reduce4(&half);
        }
        out
    }

    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI; `xs` holds 1–4 vectors of
    /// length `n`, and `w.data` holds `n.div_ceil(4)` groups.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn block_u8i8(
        xs: &[&[u8]],
        n: usize,
        w: Block64,
    ) -> [[i32; BLOCK_ROWS]; TILE_ACTS] {
        let mut out = [[0; BLOCK_ROWS]; TILE_ACTS];
        match xs.len() {
            // SAFETY (all arms): preconditions forwarded, xs.len() == B.
            1 => out[..1].copy_from_slice(&unsafe { block::<1>(xs, n, w) }),
            2 => out[..2].copy_from_slice(&unsafe { block::<2>(xs, n, w) }),
            3 => out[..3].copy_from_slice(&unsafe { block::<3>(xs, n, w) }),
            _ => out.copy_from_slice(&unsafe { block::<4>(xs, n, w) }),
        }
        out
    }

    /// The last `n % 4` bytes of `x` (`n` = its length) as one little-endian
    /// lane, zero-extended (so the weights of absent columns count nothing).
    fn tail4(x: &[u8]) -> i32 {
        let mut b = [0u8; 4];
        let tail = &x[x.len() / 4 * 4..];
        b[..tail.len()].copy_from_slice(tail);
        i32::from_le_bytes(b)
    }

    /// # Safety
    /// As [`block_u8i8`], with `xs.len() == B`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn block<const B: usize>(xs: &[&[u8]], n: usize, w: Block64) -> [[i32; BLOCK_ROWS]; B] {
        const REGS: usize = BLOCK_ROWS / 16;
        let mut acc = [[_mm512_setzero_si512(); REGS]; B];
        let wp = w.data.as_ptr();
        let mut xp = [std::ptr::null::<u8>(); B];
        for (p, x) in xp.iter_mut().zip(xs) {
            *p = x.as_ptr();
        }
        // One group: 4 columns of the 64 rows against each activation's
        // 4 bytes of those columns, broadcast.
        let step = |acc: &mut [[__m512i; REGS]; B], g: usize, x4: [i32; B]| {
            let mut wv = [_mm512_setzero_si512(); REGS];
            for (i, v) in wv.iter_mut().enumerate() {
                // SAFETY: group g < n.div_ceil(4) lies inside w.data (checked by
                // the caller); unaligned 64-byte load of its i-th quarter.
                *v = unsafe { _mm512_loadu_si512(wp.add(g * BLOCK_GROUP + i * 64) as *const _) };
            }
            for (acc_a, &x) in acc.iter_mut().zip(&x4) {
                let xb = _mm512_set1_epi32(x);
                for (a, v) in acc_a.iter_mut().zip(&wv) {
                    *a = _mm512_dpbusd_epi32(*a, xb, *v);
                }
            }
        };
        let full = n / 4;
        for g in 0..full {
            let mut x4 = [0i32; B];
            for (v, p) in x4.iter_mut().zip(&xp) {
                // SAFETY: 4g + 4 ≤ n bytes are readable behind every activation
                // pointer; unaligned 4-byte read.
                *v = unsafe { (p.add(4 * g) as *const i32).read_unaligned() };
            }
            step(&mut acc, g, x4);
        }
        if !n.is_multiple_of(4) {
            let mut x4 = [0i32; B];
            for (v, x) in x4.iter_mut().zip(xs) {
                *v = tail4(x);
            }
            step(&mut acc, full, x4);
        }
        let mut out = [[0; BLOCK_ROWS]; B];
        for (o, acc_a) in out.iter_mut().zip(&acc) {
            for (chunk, a) in o.chunks_exact_mut(16).zip(acc_a) {
                // SAFETY: `chunk` is 16 writable i32 (64 bytes); unaligned store.
                unsafe { _mm512_storeu_si512(chunk.as_mut_ptr() as *mut _, *a) };
            }
        }
        out
    }
}

/// AMX int8 through inline asm: the AMX intrinsics and target features are
/// not stable Rust yet, but the assembler knows the instructions.
///
/// A [`Layout::Blocks`] block is already AMX's B-tile layout: group `g` (4
/// columns of 64 rows, 256 bytes) holds row `r`'s 4 bytes at `4r`, so the
/// tile of 16 groups × rows `16i..16i+16` is 16 rows of 64 bytes at a stride
/// of 256 from `g · 256 + 64i`. Per step of 64 columns: one A tile (16
/// activations × 64 bytes), four B tiles, four `tdpbusd` into the four C
/// tiles of the block's 64 rows.
mod amx {
    use std::arch::asm;

    use crate::dispatch::{Acc16, Acts16, Blocks, BLOCK_GROUP, BLOCK_ROWS};

    /// `ldtilecfg`'s 64-byte operand: palette 1; tmm0–7 all 16 rows × 64
    /// bytes (C: tmm0–3, A: tmm4, B: tmm5–7).
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    /// Zero the C tiles, tmm0–3.
    ///
    /// # Safety
    /// Tiles configured with `CONFIG`.
    #[inline(always)]
    unsafe fn zero_c() {
        // SAFETY: zeroing tiles touches no memory (the caller configured them).
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            )
        };
    }

    /// 16 activations × one block: per step one A tile and four B tiles
    /// (rows 16i..16i+16), four `tdpbusd` into C tiles tmm0–3.
    ///
    /// # Safety
    /// Tiles configured with `CONFIG`; `a` satisfies `check_block16` with
    /// one group, and `wp` is a block of `w` that did too.
    #[inline(always)]
    unsafe fn one_group(a: Acts16, wp: *const i8, acc: &mut Acc16) {
        // SAFETY: tiles configured (this function's precondition).
        unsafe { zero_c() };
        for s in 0..a.n.div_ceil(64) {
            // SAFETY: check_block16 proved 16 rows of `steps · 64` bytes at
            // a.stride inside a.data, and the block's groups up to 16 · steps
            // inside w.data, so the A tile (16 × 64 bytes from column 64s)
            // and the four B tiles (16 groups from 16s, 64 bytes each at a
            // stride of 256) are in bounds.
            unsafe {
                asm!(
                    "tileloadd tmm4, [{a} + {sa}*1]",
                    "tileloadd tmm5, [{w} + {sw}*1]",
                    "tileloadd tmm6, [{w} + {sw}*1 + 64]",
                    "tileloadd tmm7, [{w} + {sw}*1 + 128]",
                    "tdpbusd tmm0, tmm4, tmm5",
                    "tileloadd tmm5, [{w} + {sw}*1 + 192]",
                    "tdpbusd tmm1, tmm4, tmm6",
                    "tdpbusd tmm2, tmm4, tmm7",
                    "tdpbusd tmm3, tmm4, tmm5",
                    a = in(reg) a.data.as_ptr().add(s * 64),
                    sa = in(reg) a.stride,
                    w = in(reg) wp.add(s * 16 * BLOCK_GROUP),
                    sw = in(reg) BLOCK_GROUP,
                    options(nostack, readonly)
                )
            };
        }
        // SAFETY: `acc` is 16 rows of 256 bytes; C tile i goes to bytes 64i..
        // of each row (rows 16i..16i+16 of the block).
        unsafe {
            asm!(
                "tilestored [{o} + {so}*1], tmm0",
                "tilestored [{o} + {so}*1 + 64], tmm1",
                "tilestored [{o} + {so}*1 + 128], tmm2",
                "tilestored [{o} + {so}*1 + 192], tmm3",
                o = in(reg) acc.as_mut_ptr() as *mut u8,
                so = in(reg) BLOCK_ROWS * 4,
                options(nostack)
            )
        };
    }

    /// 32 activations × one block, a half (32 rows) at a time: per step two
    /// A tiles (tmm4–5) and two B tiles (tmm6–7), each tile loaded serving
    /// two `tdpbusd` (C: tmm0–1 group 0, tmm2–3 group 1).
    ///
    /// # Safety
    /// Tiles configured with `CONFIG`; `a` satisfies `check_block16` with
    /// two groups, `wp` is a block of `w` that did too, `acc` holds two.
    #[inline(always)]
    unsafe fn two_groups(a: Acts16, wp: *const i8, acc: &mut [Acc16]) {
        assert_eq!(acc.len(), 2);
        for half in 0..2 {
            // SAFETY: tiles configured (this function's precondition).
            unsafe { zero_c() };
            for s in 0..a.n.div_ceil(64) {
                // SAFETY: as in `one_group`, with 32 activation rows proved
                // inside a.data (A1 starts 16 rows after A0), and B tiles
                // 2·half and 2·half + 1 of the step.
                unsafe {
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm6, [{w} + {sw}*1]",
                        "tdpbusd tmm0, tmm4, tmm6",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tdpbusd tmm2, tmm5, tmm6",
                        "tileloadd tmm7, [{w} + {sw}*1 + 64]",
                        "tdpbusd tmm1, tmm4, tmm7",
                        "tdpbusd tmm3, tmm5, tmm7",
                        a0 = in(reg) a.data.as_ptr().add(s * 64),
                        a1 = in(reg) a.data.as_ptr().add(16 * a.stride + s * 64),
                        sa = in(reg) a.stride,
                        w = in(reg) wp.add(s * 16 * BLOCK_GROUP + half * 128),
                        sw = in(reg) BLOCK_GROUP,
                        options(nostack, readonly)
                    )
                };
            }
            // SAFETY: acc[0] and acc[1] are 16 rows of 256 bytes each; this
            // half's two C tiles per group go to bytes 128·half.. of each row.
            unsafe {
                let (g0, g1) = acc.split_at_mut(1);
                asm!(
                    "tilestored [{o0} + {so}*1], tmm0",
                    "tilestored [{o0} + {so}*1 + 64], tmm1",
                    "tilestored [{o1} + {so}*1], tmm2",
                    "tilestored [{o1} + {so}*1 + 64], tmm3",
                    o0 = in(reg) (g0[0].as_mut_ptr() as *mut u8).add(half * 128),
                    o1 = in(reg) (g1[0].as_mut_ptr() as *mut u8).add(half * 128),
                    so = in(reg) BLOCK_ROWS * 4,
                    options(nostack)
                )
            };
        }
    }

    const CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
            t += 1;
        }
        TileConfig(c)
    };

    /// # Safety
    /// The CPU runs AMX int8 and the process has the tile grant; `a` and `w`
    /// satisfy [`crate::generic::check_block16`].
    pub(super) unsafe fn block16(a: Acts16, w: Blocks, out: &mut [Acc16]) {
        // SAFETY: CONFIG is a valid palette-1 configuration, 64-byte aligned.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        for (b, acc) in out.chunks_exact_mut(a.tiles).enumerate() {
            // b < w.count and acc has one entry per group (checked: out.len()
            // = count · tiles).
            let wp = w.data.as_ptr().wrapping_add(b * w.stride);
            if a.tiles == 1 {
                // SAFETY: as this function's, for block b and 16 activations.
                unsafe { one_group(a, wp, &mut acc[0]) };
            } else {
                // SAFETY: as this function's, for block b and 32 activations.
                unsafe { two_groups(a, wp, acc) };
            }
        }
        // SAFETY: returns the tile state to its initial state (cheaper
        // context switches); touches no memory.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}
