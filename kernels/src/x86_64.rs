//! x86_64 kernels: AVX2 and AVX-512 VNNI. The `#[target_feature]` functions
//! are private; `plug` installs their safe wrappers after detection.

use crate::dispatch::{Isa, Kernels};

fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

fn has_avx512vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Install the best kernels this CPU runs, up to `limit`.
pub(crate) fn plug(k: &mut Kernels, limit: Isa) {
    if limit >= Isa::Avx2 && has_avx2() {
        k.isa = Isa::Avx2;
        k.dot_u8i8 = dot_u8i8_avx2;
    }
    if limit >= Isa::Avx512Vnni && has_avx512vnni() {
        k.isa = Isa::Avx512Vnni;
        k.dot_u8i8 = dot_u8i8_avx512vnni;
    }
}

dot_kernel! {
    /// u8·i8 dot product on AVX2: both operands widened to i16 and multiplied
    /// with `vpmaddwd`, which cannot saturate (unlike `vpmaddubsw`, whose
    /// i16 pair sums overflow at 255·127·2), so the result is exact.
    pub fn dot_u8i8_avx2 = avx2::dot_u8i8, isa = "AVX2 and FMA", when = has_avx2();
}

dot_kernel! {
    /// u8·i8 dot product on AVX-512 VNNI: `vpdpbusd` sums four u8·i8 products
    /// straight into i32 lanes (no intermediate saturation); the tail is a
    /// masked load, so no scalar remainder loop.
    pub fn dot_u8i8_avx512vnni = avx512vnni::dot_u8i8, isa = "AVX-512 F, BW and VNNI", when = has_avx512vnni();
}

mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2; `a` and `b` must have equal lengths ≤ `MAX_DOT_LEN`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_u8i8(a: &[u8], b: &[i8]) -> i32 {
        assert!(a.len() <= crate::generic::MAX_DOT_LEN);
        let n = a.len();
        let mut acc = _mm256_setzero_si256();
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n bytes remain in both slices; unaligned loads.
            let (va, vb) = unsafe {
                (
                    _mm_loadu_si128(a.as_ptr().add(i) as *const __m128i),
                    _mm_loadu_si128(b.as_ptr().add(i) as *const __m128i),
                )
            };
            let prod = _mm256_madd_epi16(_mm256_cvtepu8_epi16(va), _mm256_cvtepi8_epi16(vb));
            acc = _mm256_add_epi32(acc, prod);
            i += 16;
        }
        let mut lanes = [0i32; 8];
        // SAFETY: `lanes` is 32 writable bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc) };
        let tail: i32 = a[i..]
            .iter()
            .zip(&b[i..])
            .map(|(&x, &w)| x as i32 * w as i32)
            .sum();
        lanes.iter().sum::<i32>() + tail
    }
}

mod avx512vnni {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI; `a` and `b` must have
    /// equal lengths ≤ `MAX_DOT_LEN`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_u8i8(a: &[u8], b: &[i8]) -> i32 {
        assert!(a.len() <= crate::generic::MAX_DOT_LEN);
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
            let mask: __mmask64 = (1u64 << (n - i)) - 1;
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
}
