//! Packed int8 GEMV / small-batch GEMM on the shapes of real models, per ISA.
//! `cargo bench -p ember-kernels --bench gemv`; throughput counts weight bytes
//! streamed (read once per call whatever the batch).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ember_kernels::gemv::{gemm, PackedI8, QVec};
use ember_kernels::quant::dynamic_quantize_u8;
use ember_kernels::{Isa, Kernels};

fn bench(c: &mut Criterion) {
    // (input, output): demo GPT-2 MLP and head, SmolLM-135M, Qwen2.5-0.5B.
    let shapes = [(256usize, 256usize), (256, 4096), (576, 1536), (896, 4864)];
    let mut g = c.benchmark_group("gemm_u8i8");
    for (cols, rows) in shapes {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
            .collect();
        let pw = PackedI8::quantize(&w, rows, cols);
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 17 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut q = vec![0u8; cols];
        let (scale, zero_point) = dynamic_quantize_u8(&x, &mut q);
        g.throughput(Throughput::Bytes((rows * cols) as u64));
        for batch in [1usize, 4, 8] {
            let xs = vec![
                QVec {
                    q: &q,
                    scale,
                    zero_point
                };
                batch
            ];
            let mut out = vec![0f32; batch * rows];
            for isa in [Isa::Generic, Isa::Avx2, Isa::Avx512Vnni] {
                let k = Kernels::detect(isa);
                if k.isa != isa {
                    continue;
                }
                let id = BenchmarkId::new(format!("{}/{cols}x{rows}", isa.name()), batch);
                g.bench_function(id, |b| {
                    b.iter(|| gemm(&k, &pw, std::hint::black_box(&xs), None, &mut out))
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
