//! This core's memory read bandwidth, the bound a weight-streaming GEMV
//! cannot beat: `cargo bench -p ember-kernels --bench bandwidth`.
//!
//! Sums buffers of u64 with eight independent accumulators (vectorized by
//! LLVM; with AVX2 where the CPU has it) at sizes that live in L1, L2, the
//! last-level cache, and main memory (1 GiB, larger than any LLC), as one
//! sequential stream and as four side by side (how the GEMV tile reads),
//! in [`Pages`], the memory the weights and the KV cache are kept in.
//!
//! Also at the size of the SmolLM-135M-shaped model's packed weights
//! (160 MiB), the bound its decode is compared with: a VM can report a
//! last-level cache of hundreds of MiB (an Intel Xeon here: 480 MiB) that
//! holds part of such a buffer, so the 1 GiB figure would understate it.
//! And on 2 threads (each summing its half), as `--threads 2` reads.

use std::time::Duration;

use ember_kernels::pages::Pages;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Four sequential streams at once (a quarter of the buffer each), the access
/// pattern of the GEMV tile, which reads four weight rows side by side.
#[inline(always)]
fn sum4(buf: &[u64]) -> u64 {
    let q = buf.len() / 4;
    let (a, rest) = buf.split_at(q);
    let (b, rest) = rest.split_at(q);
    let (c, d) = rest.split_at(q);
    let mut acc = [0u64; 8];
    for (((a, b), c), d) in a
        .chunks_exact(2)
        .zip(b.chunks_exact(2))
        .zip(c.chunks_exact(2))
        .zip(d.chunks_exact(2))
    {
        for (i, v) in a.iter().chain(b).chain(c).chain(d).enumerate() {
            acc[i] = acc[i].wrapping_add(*v);
        }
    }
    acc.iter().fold(0, |s, v| s.wrapping_add(*v))
}

#[inline(always)]
fn sum(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in buf.chunks_exact(8) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*v);
        }
    }
    acc.iter().fold(0, |s, v| s.wrapping_add(*v))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(buf: &[u64], streams: usize) -> u64 {
    if streams == 4 {
        sum4(buf)
    } else {
        sum(buf)
    }
}

fn read(buf: &[u64], streams: usize) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just above.
        return unsafe { sum_avx2(buf, streams) };
    }
    if streams == 4 {
        sum4(buf)
    } else {
        sum(buf)
    }
}

fn bandwidth(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_bandwidth");
    for (label, bytes) in [
        ("l1-32KiB", 32usize << 10),
        ("l2-1MiB", 1 << 20),
        ("llc-24MiB", 24 << 20),
        ("model-160MiB", 160 << 20),
        ("dram-1GiB", 1 << 30),
    ] {
        // The memory packed weights and the KV arena live in (huge-page
        // advised from 64 KiB up), so the bound is the one they can reach.
        let mut buf = Pages::<u64>::zeroed(bytes / 8);
        for (i, v) in buf.iter_mut().enumerate() {
            *v = i as u64;
        }
        g.throughput(Throughput::Bytes(bytes as u64));
        if bytes >= 128 << 20 {
            g.sample_size(10);
        }
        for streams in [1, 4] {
            let id = BenchmarkId::new(label, format!("{streams}-stream"));
            g.bench_with_input(id, &buf, |b, buf| {
                b.iter(|| read(std::hint::black_box(buf), streams))
            });
        }
        if bytes >= 128 << 20 {
            let id = BenchmarkId::new(label, "2-threads");
            g.bench_with_input(id, &buf, |b, buf| {
                b.iter(|| {
                    let (x, y) = buf.split_at(buf.len() / 2);
                    std::thread::scope(|s| {
                        let other = s.spawn(|| read(std::hint::black_box(y), 1));
                        let mine = read(std::hint::black_box(x), 1);
                        mine.wrapping_add(other.join().expect("the reader panicked"))
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bandwidth
}
criterion_main!(benches);
