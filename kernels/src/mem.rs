//! Cache hints. A sequence's KV blocks are scattered over the arena (that is
//! what paging means), so the hardware prefetcher, which follows sequential
//! streams within a 4 KiB page, starts cold on every block: at 8 sequences
//! the attention loop waited on L3 for each one. [`prefetch`] asks for the
//! next block while the current one is computed.

/// Bytes per cache line on every CPU Ember targets.
pub const LINE: usize = 64;

/// Hint that `data` will be read soon: one prefetch per cache line into L1.
/// A hint only: it never faults, changes no value, and is a no-op where the
/// architecture has no instruction for it.
#[inline]
pub fn prefetch<T>(data: &[T]) {
    let bytes = std::mem::size_of_val(data);
    let base = data.as_ptr().cast::<u8>();
    let mut at = 0;
    while at < bytes {
        // `wrapping_add` stays inside (or one past) the slice: no UB even
        // for a zero-sized read, and the address is only a hint.
        line(base.wrapping_add(at));
        at += LINE;
    }
}

/// Hint that the cache line holding `p` will be read soon. Any address is
/// fine (a prefetch never faults); like [`prefetch`], a no-op where the
/// architecture has no instruction for it.
#[inline(always)]
pub fn prefetch_line<T>(p: *const T) {
    line(p.cast())
}

#[inline(always)]
fn line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` is in SSE, which every x86_64 CPU has; a prefetch
    // does not access memory architecturally and never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `prfm` is a hint in the base A64 instruction set; it never
    // faults and reads or writes no register but its address operand.
    unsafe {
        std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
    }
    #[cfg(target_arch = "arm")]
    // SAFETY: `pld` is a hint in ARMv7-A; it never faults.
    unsafe {
        std::arch::asm!("pld [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefetch_takes_any_slice() {
        let v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        super::prefetch(&v);
        super::prefetch(&v[999..]);
        super::prefetch::<f32>(&[]);
        assert_eq!(v[999], 999.0, "a hint changes nothing");
    }
}
