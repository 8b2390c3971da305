//! u8·i8 dot product per instruction set, on row lengths of real models.
//! `cargo bench -p ember-kernels --bench dot`; throughput is weight bytes streamed.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ember_kernels::Kernels;

fn dot(c: &mut Criterion) {
    let mut g = c.benchmark_group("dot_u8i8");
    for n in [256usize, 576, 896, 4096] {
        let a: Vec<u8> = (0..n).map(|i| (i * 7 % 256) as u8).collect();
        let b: Vec<i8> = (0..n).map(|i| (i * 13 % 256) as u8 as i8).collect();
        g.throughput(Throughput::Bytes(n as u64));
        for k in Kernels::all_available() {
            g.bench_with_input(BenchmarkId::new(k.isa.name(), n), &n, |bch, _| {
                bch.iter(|| (k.dot_u8i8)(std::hint::black_box(&a), std::hint::black_box(&b)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, dot);
criterion_main!(benches);
