//! Cache hints. A sequence's KV blocks are scattered over the arena (that is
//! what paging means), so the hardware prefetcher, which follows sequential
//! streams within a 4 KiB page, starts cold on every block: at 8 sequences
//! the attention loop waited on L3 for each one. [`prefetch_l2`] asks for
//! the block a few on while the current one is computed.

/// Bytes per cache line on every CPU Ember targets.
pub const LINE: usize = 64;

/// Hint that `data` will be read a little later: one prefetch per cache line
/// into L2, not L1. For reads issued several blocks ahead: on the Zen 4
/// EPYC, KV slabs prefetched four blocks ahead into L1 (`prefetcht0`)
/// decoded the SmolLM-135M-shaped model at 960 positions no faster than one
/// block ahead (~78 tok/s), and into L2 (`prefetcht1`) at 89–102: L1
/// prefetches hold the few L1 miss buffers that the loads being computed
/// also need. A hint only: it never faults, changes no value, and is a
/// no-op where the architecture has no instruction for it; where the
/// instruction has no level (armv7's `pld`), the one it has.
#[inline]
pub fn prefetch_l2<T>(data: &[T]) {
    let bytes = std::mem::size_of_val(data);
    let base = data.as_ptr().cast::<u8>();
    let mut at = 0;
    while at < bytes {
        // `wrapping_add` stays inside (or one past) the slice: no UB even
        // for a zero-sized read, and the address is only a hint.
        hint::<true>(base.wrapping_add(at));
        at += LINE;
    }
}

/// Hint that the cache line holding `p` will be read soon, into L1. Any
/// address is fine (a prefetch never faults); like [`prefetch_l2`], a no-op where the
/// architecture has no instruction for it.
#[inline(always)]
pub fn prefetch_line<T>(p: *const T) {
    hint::<false>(p.cast())
}

/// Read every byte of `bytes` once, as a plain sequential loop does, and
/// return their wrapping sum as 8-byte words (so the reads cannot be
/// optimized away). With eight independent accumulators the loop is bound
/// by memory, not by its adds: what it reaches over a model's packed
/// weights is the read bandwidth a decode step streaming those same bytes
/// is held against (`emberd bench` reports the share). Bytes past the last
/// whole 64 are added one by one.
pub fn read_sum(bytes: &[i8]) -> u64 {
    let mut acc = [0u64; 8];
    let lines = bytes.chunks_exact(64);
    let tail = lines.remainder();
    for line in lines {
        for (a, word) in acc.iter_mut().zip(line.chunks_exact(8)) {
            let w: [u8; 8] = std::array::from_fn(|i| word[i] as u8);
            *a = a.wrapping_add(u64::from_ne_bytes(w));
        }
    }
    let tail = tail
        .iter()
        .fold(0u64, |s, &b| s.wrapping_add(b as u8 as u64));
    acc.iter().fold(tail, |s, &a| s.wrapping_add(a))
}

/// A prefetch of the line holding `p`: into L2 only when `L2`, else into L1.
#[inline(always)]
fn hint<const L2: bool>(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0`/`prefetcht1` are in SSE, which every x86_64 CPU
    // has; a prefetch does not access memory architecturally and never faults.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        if L2 {
            _mm_prefetch::<_MM_HINT_T1>(p.cast())
        } else {
            _mm_prefetch::<_MM_HINT_T0>(p.cast())
        }
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `prfm` is a hint in the base A64 instruction set; it never
    // faults and reads or writes no register but its address operand.
    unsafe {
        if L2 {
            std::arch::asm!("prfm pldl2keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
        } else {
            std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
        }
    }
    #[cfg(target_arch = "arm")]
    // SAFETY: `pld` is a hint in ARMv7-A (which has no level in it); it
    // never faults.
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
        super::prefetch_l2(&v);
        super::prefetch_l2(&v[999..]);
        super::prefetch_l2::<f32>(&[]);
        super::prefetch_line(v[500..].as_ptr());
        assert_eq!(v[999], 999.0, "a hint changes nothing");
    }

    /// The words' sum, whatever the length and wherever the slice starts.
    #[test]
    fn read_sum_adds_every_word() {
        let v: Vec<i8> = (0..1000).map(|i| (i * 37 % 256) as u8 as i8).collect();
        for (start, end) in [(0, 1000), (3, 1000), (0, 64), (5, 70), (7, 7), (0, 13)] {
            let s = &v[start..end];
            let whole = s.len() / 64 * 64;
            let words = s[..whole].chunks_exact(8).fold(0u64, |acc, w| {
                let w: [u8; 8] = std::array::from_fn(|i| w[i] as u8);
                acc.wrapping_add(u64::from_ne_bytes(w))
            });
            let tail = s[whole..]
                .iter()
                .fold(0u64, |acc, &b| acc.wrapping_add(b as u8 as u64));
            assert_eq!(
                super::read_sum(s),
                words.wrapping_add(tail),
                "{start}..{end}"
            );
        }
    }
}
