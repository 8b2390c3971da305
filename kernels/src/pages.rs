//! Large, long-lived arrays (packed weights, the KV cache arena) on memory
//! the kernel may back with 2 MiB pages.
//!
//! Why: a decode step streams every weight once and attention reads KV
//! slabs scattered over the arena. With 4 KiB pages that is a TLB miss per
//! 4 KiB of weights and one per KV slab, and the hardware prefetcher stops
//! at each page boundary. On the 2-core AMD EPYC (Zen 4), one stream read
//! 1 GiB at 18.4 GiB/s on 4 KiB pages and at 28 on 2 MiB pages (`cargo bench
//! -p ember-kernels --bench bandwidth`), and the SmolLM-135M-shaped model
//! decoded at 91–101 tok/s before, 117–135 with weights and KV arena here.
//!
//! Linux backs anonymous memory with transparent huge pages where
//! `/sys/kernel/mm/transparent_hugepage/enabled` says `always`, or
//! `madvise` (Debian's default) for ranges advised `MADV_HUGEPAGE`, and only
//! for 2 MiB-aligned 2 MiB ranges. So [`Pages`] of at least [`POOL_MIN`]
//! bytes come from 2 MiB-aligned anonymous mappings advised so: one of
//! their own from [`CHUNK`] up, otherwise bump-allocated from a shared
//! 32 MiB chunk (a model's hundreds of sub-MiB matrices then share huge
//! pages). A chunk is unmapped when its last array is dropped; its space is
//! never reused before that, which suits arrays that live as long as a
//! model. Where the kernel has no huge pages the advice is ignored and the
//! memory is ordinary; elsewhere than Linux, and below [`POOL_MIN`], a
//! [`Pages`] is a `Vec`.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Types for which all-zero bytes are a valid value (fresh mappings are
/// zeroed, and that is how a [`Pages`] starts).
///
/// # Safety
/// An implementor must be `Copy`, without padding or invalid bit patterns
/// for zero, and aligned to at most 64 bytes.
pub unsafe trait Zeroed: Copy + 'static {}

// SAFETY: plain integers and IEEE floats: zero bytes are 0 / +0.0, alignment ≤ 8.
unsafe impl Zeroed for i8 {}
// SAFETY: as above.
unsafe impl Zeroed for u8 {}
// SAFETY: as above.
unsafe impl Zeroed for u16 {}
// SAFETY: as above.
unsafe impl Zeroed for i32 {}
// SAFETY: as above.
unsafe impl Zeroed for u64 {}
// SAFETY: as above.
unsafe impl Zeroed for f32 {}

/// Arrays smaller than this are a plain `Vec`.
pub const POOL_MIN: usize = 64 << 10;
/// Arrays of this many bytes or more get a mapping of their own; smaller
/// ones share chunks of this size.
pub const CHUNK: usize = 32 << 20;
/// The huge page size mappings are aligned to (x86_64, and arm64 with 4 KiB
/// base pages; with other page sizes the alignment is harmless).
const HUGE: usize = 2 << 20;
/// Alignment of arrays inside a chunk: a cache line.
const ALIGN: usize = 64;

/// A fixed-length, zero-initialized array of plain values, from huge-page
/// advised memory when it is large (see the module docs). Derefs to a slice.
pub struct Pages<T: Zeroed>(Inner<T>);

enum Inner<T> {
    Vec(Vec<T>),
    #[cfg(target_os = "linux")]
    Map {
        ptr: NonNull<T>,
        len: usize,
        /// Keeps the mapping holding `ptr..ptr + len` alive.
        _map: std::sync::Arc<map::Mapping>,
    },
}

// SAFETY: a Pages owns its elements like a Vec does (a shared chunk hands
// out disjoint ranges, and a chunk is only unmapped when every array in it
// is gone), so it is Send/Sync exactly when T is.
unsafe impl<T: Zeroed + Send> Send for Pages<T> {}
// SAFETY: as above; &Pages only gives &[T].
unsafe impl<T: Zeroed + Sync> Sync for Pages<T> {}

impl<T: Zeroed> Pages<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Pages<T> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .expect("array size overflows");
        #[cfg(target_os = "linux")]
        if bytes >= POOL_MIN {
            if let Some((map, at)) = map::take(bytes) {
                // SAFETY: a mapping's base is non-null (mmap succeeded) and `at`
                // lies inside it, 64-byte aligned (so aligned for T).
                let ptr = unsafe { NonNull::new_unchecked(map.base.wrapping_add(at).cast::<T>()) };
                return Pages(Inner::Map {
                    ptr,
                    len,
                    _map: map,
                });
            }
        }
        let _ = bytes;
        Pages(Inner::Vec(vec![zero::<T>(); len]))
    }

    /// Whether the array lives in a huge-page advised mapping.
    pub fn is_mapped(&self) -> bool {
        !matches!(self.0, Inner::Vec(_))
    }
}

/// The all-zero value of `T`.
fn zero<T: Zeroed>() -> T {
    // SAFETY: `Zeroed` promises all-zero bytes are a valid T.
    unsafe { std::mem::zeroed() }
}

impl<T: Zeroed> Deref for Pages<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.0 {
            Inner::Vec(v) => v,
            #[cfg(target_os = "linux")]
            // SAFETY: `ptr` points at `len` initialized, aligned T that this
            // array alone owns, for as long as `_map` is held.
            Inner::Map { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), *len)
            },
        }
    }
}

impl<T: Zeroed> DerefMut for Pages<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.0 {
            Inner::Vec(v) => v,
            #[cfg(target_os = "linux")]
            // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
            Inner::Map { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), *len)
            },
        }
    }
}

impl<T: Zeroed> Clone for Pages<T> {
    fn clone(&self) -> Pages<T> {
        let mut p = Pages::zeroed(self.len());
        p.copy_from_slice(self);
        p
    }
}

impl<T: Zeroed + fmt::Debug> fmt::Debug for Pages<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: Zeroed + PartialEq> PartialEq for Pages<T> {
    fn eq(&self, other: &Pages<T>) -> bool {
        **self == **other
    }
}

#[cfg(target_os = "linux")]
mod map {
    use std::sync::{Arc, Mutex, Weak};

    use super::{ALIGN, CHUNK, HUGE};

    /// One anonymous, 2 MiB-aligned, huge-page advised mapping.
    #[derive(Debug)]
    pub(super) struct Mapping {
        pub(super) base: *mut u8,
        bytes: usize,
    }

    // SAFETY: the mapping is plain memory; who may touch which bytes is
    // decided by the `Pages` that hold it.
    unsafe impl Send for Mapping {}
    // SAFETY: as above.
    unsafe impl Sync for Mapping {}

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: base..base + bytes is a mapping this value alone made and
            // no array uses any more (the last Arc is being dropped).
            unsafe { libc::munmap(self.base.cast(), self.bytes) };
        }
    }

    impl Mapping {
        /// `bytes` (rounded up to whole base pages) of zeroed memory at a
        /// 2 MiB boundary, or None if the system refuses the mapping.
        fn new(bytes: usize) -> Option<Mapping> {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
            let bytes = bytes.checked_next_multiple_of(page)?;
            let raw_len = bytes.checked_add(HUGE)?;
            // SAFETY: a new private anonymous mapping; no existing memory is affected.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    raw_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if raw == libc::MAP_FAILED {
                return None;
            }
            let raw = raw.cast::<u8>();
            let head = (raw as usize).next_multiple_of(HUGE) - raw as usize;
            let tail = raw_len - head - bytes;
            let base = raw.wrapping_add(head);
            // SAFETY: the head and tail trimmed are page-aligned ranges inside the
            // mapping just made (head, bytes and raw_len are multiples of the page
            // size), which nothing else refers to. The advice only changes how the
            // range is backed; an error (no THP in this kernel) leaves it ordinary.
            unsafe {
                if head > 0 {
                    libc::munmap(raw.cast(), head);
                }
                if tail > 0 {
                    libc::munmap(base.wrapping_add(bytes).cast(), tail);
                }
                libc::madvise(base.cast(), bytes, libc::MADV_HUGEPAGE);
            }
            Some(Mapping { base, bytes })
        }
    }

    /// The chunk small arrays are cut from, and the first free offset in it.
    /// Weak: once every array cut from it is dropped (a model unloaded), the
    /// chunk is unmapped at once rather than held, touched, until the next
    /// allocation moves on.
    static POOL: Mutex<Option<(Weak<Mapping>, usize)>> = Mutex::new(None);

    /// `bytes` of fresh zeroed memory: the mapping holding it and the offset.
    pub(super) fn take(bytes: usize) -> Option<(Arc<Mapping>, usize)> {
        if bytes >= CHUNK {
            return Mapping::new(bytes).map(|m| (Arc::new(m), 0));
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((chunk, free)) = pool.as_mut() {
            if let Some(chunk) = chunk.upgrade().filter(|c| *free + bytes <= c.bytes) {
                let at = *free;
                *free = (at + bytes).next_multiple_of(ALIGN);
                return Some((chunk, at));
            }
        }
        // The old chunk (if any) lives on in the arrays cut from it.
        let chunk = Arc::new(Mapping::new(CHUNK)?);
        *pool = Some((Arc::downgrade(&chunk), bytes.next_multiple_of(ALIGN)));
        Some((chunk, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_zeroed_and_holds_what_is_written() {
        for len in [
            0,
            1,
            1000,
            POOL_MIN,
            3 * POOL_MIN + 7,
            CHUNK / 4 + 1,
            CHUNK / 4 + 3,
        ] {
            let mut p = Pages::<f32>::zeroed(len);
            assert_eq!(p.len(), len);
            assert!(p.iter().all(|&v| v == 0.0));
            for (i, v) in p.iter_mut().enumerate() {
                *v = i as f32;
            }
            let q = p.clone();
            assert_eq!(p, q);
            assert!(q.iter().enumerate().all(|(i, &v)| v == i as f32));
        }
    }

    #[test]
    fn arrays_sharing_a_chunk_do_not_overlap() {
        let mut arrays: Vec<Pages<u8>> = (0..40)
            .map(|i| Pages::zeroed(POOL_MIN + i * 4099))
            .collect();
        for (i, a) in arrays.iter_mut().enumerate() {
            a.fill(i as u8);
        }
        for (i, a) in arrays.iter().enumerate() {
            assert!(a.iter().all(|&v| v == i as u8), "array {i} was overwritten");
            assert!((a.as_ptr() as usize).is_multiple_of(ALIGN));
        }
        // Dropping some (their chunk stays mapped for the others) and making more.
        arrays.truncate(10);
        let more: Vec<Pages<u8>> = (0..20).map(|_| Pages::zeroed(CHUNK / 8)).collect();
        assert!(more.iter().all(|a| a.iter().all(|&v| v == 0)));
        for (i, a) in arrays.iter().enumerate() {
            assert!(a.iter().all(|&v| v == i as u8), "array {i} changed");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn large_arrays_are_mapped_at_huge_page_boundaries() {
        let own = Pages::<i8>::zeroed(CHUNK + 1);
        assert!(own.is_mapped() && (own.as_ptr() as usize).is_multiple_of(HUGE));
        assert!(Pages::<i32>::zeroed(POOL_MIN).is_mapped());
        assert!(!Pages::<i32>::zeroed(16).is_mapped());
    }
}
