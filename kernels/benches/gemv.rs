//! Packed int8 GEMV / small-batch GEMM on the shapes of real models, per ISA.
//! `cargo bench -p ember-kernels --bench gemv`; throughput counts weight bytes
//! streamed (read once per call whatever the batch); multiply by
//! 2 · batch for int8 operations per second.
//!
//! The `dram` group runs the best ISA on a 512 MiB matrix, larger than any
//! last-level cache, to compare with `--bench bandwidth`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ember_kernels::gemv::{gemm, PackedI8, QVec};
use ember_kernels::quant::dynamic_quantize_u8;
use ember_kernels::Kernels;

/// Deterministic pseudo-random i8 weights with per-row scales.
fn matrix(rows: usize, cols: usize) -> PackedI8 {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let q: Vec<i8> = (0..rows * cols)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 56) as u8 as i8
        })
        .collect();
    let scales: Vec<f32> = (0..rows).map(|r| 0.01 + (r % 7) as f32 * 1e-3).collect();
    PackedI8::from_quantized(&q, rows, cols, &scales)
}

fn activations(cols: usize, batch: usize) -> Vec<(Vec<u8>, f32, u8)> {
    (0..batch)
        .map(|b| {
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 17 + b * 5) % 23) as f32 / 7.0 - 1.5)
                .collect();
            let mut q = vec![0u8; cols];
            let (s, z) = dynamic_quantize_u8(&x, &mut q);
            (q, s, z)
        })
        .collect()
}

fn qvecs(acts: &[(Vec<u8>, f32, u8)]) -> Vec<QVec<'_>> {
    acts.iter()
        .map(|(q, s, z)| QVec {
            q,
            scale: *s,
            zero_point: *z,
        })
        .collect()
}

fn shapes(c: &mut Criterion) {
    // (input, output): demo GPT-2 MLP and head, SmolLM-135M MLP and head,
    // Qwen2.5-0.5B MLP.
    let shapes = [
        (256usize, 256usize),
        (256, 4096),
        (576, 1536),
        (576, 49152),
        (896, 4864),
    ];
    let mut g = c.benchmark_group("gemm_u8i8");
    for (cols, rows) in shapes {
        let pw = matrix(rows, cols);
        g.throughput(Throughput::Bytes(pw.weight_bytes() as u64));
        for batch in [1usize, 4, 8] {
            let acts = activations(cols, batch);
            let xs = qvecs(&acts);
            let mut out = vec![0f32; batch * rows];
            for k in Kernels::all_available() {
                let id = BenchmarkId::new(format!("{}/{cols}x{rows}", k.isa.name()), batch);
                g.bench_function(id, |b| {
                    b.iter(|| gemm(&k, &pw, std::hint::black_box(&xs), None, &mut out))
                });
            }
        }
    }
    g.finish();
}

/// The micro-kernel alone on L1-resident operands (4 rows × 4 activations ×
/// 4096 columns, 32 KiB): the most int8 multiply-adds per second it reaches,
/// reported as elements = MACs.
fn peak(c: &mut Criterion) {
    let cols = 4096;
    let pw = matrix(4, cols);
    let acts = activations(cols, 4);
    let xs = qvecs(&acts);
    let mut g = c.benchmark_group("tile_peak");
    g.throughput(Throughput::Elements((4 * 4 * cols) as u64));
    for k in Kernels::all_available() {
        let mut out = vec![0f32; 4 * 4];
        g.bench_function(k.isa.name(), |b| {
            b.iter(|| gemm(&k, &pw, std::hint::black_box(&xs), None, &mut out))
        });
    }
    g.finish();
}

fn dram(c: &mut Criterion) {
    let (rows, cols) = (65536usize, 8192usize);
    let pw = matrix(rows, cols);
    let k = *ember_kernels::kernels();
    let mut g = c.benchmark_group("gemv_dram");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(pw.weight_bytes() as u64));
    let acts = activations(cols, 1);
    let xs = qvecs(&acts);
    let mut out = vec![0f32; rows];
    g.bench_function(format!("{}/{cols}x{rows}", k.isa.name()), |b| {
        b.iter(|| gemm(&k, &pw, std::hint::black_box(&xs), None, &mut out))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = peak, shapes, dram
}
criterion_main!(benches);
