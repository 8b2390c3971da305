//! Packed int8 GEMV / small-batch GEMM on the shapes of real models, per ISA,
//! each in the layout its table packs (plus the row layout on tables that
//! prefer blocks, named `ISA-rows`, to show what the blocks gain).
//! `cargo bench -p ember-kernels --bench gemv`; throughput counts weight bytes
//! streamed (read once per call whatever the batch); multiply by
//! 2 · batch for int8 operations per second.
//!
//! The `dram` group runs the best ISA on a 512 MiB matrix, larger than any
//! last-level cache, on one thread and on two, to compare with
//! `--bench bandwidth`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ember_kernels::gemv::{gemm, gemm_par, PackedI8, QVec, Scoped};
use ember_kernels::quant::dynamic_quantize_u8;
use ember_kernels::{Kernels, Layout};

/// Deterministic pseudo-random i8 weights in `[-127, 127]` (onnxruntime's
/// symmetric int8 range, which real models have) with per-row scales.
fn matrix(layout: Layout, rows: usize, cols: usize) -> PackedI8 {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let q: Vec<i8> = (0..rows * cols)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 56) as u8 as i8).max(-127)
        })
        .collect();
    let scales: Vec<f32> = (0..rows).map(|r| 0.01 + (r % 7) as f32 * 1e-3).collect();
    PackedI8::with_layout(layout, &q, rows, cols, &scales)
}

/// Every table with each layout worth measuring on it, and a name.
fn variants() -> Vec<(String, Kernels, Layout)> {
    let mut v = Vec::new();
    for k in Kernels::all_available() {
        v.push((k.isa.name().to_string(), k, k.layout));
        if k.layout != Layout::Rows {
            v.push((format!("{}-rows", k.isa.name()), k, Layout::Rows));
        }
    }
    v
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
        (1024, 4096),
        (576, 49152),
        (896, 4864),
    ];
    let mut g = c.benchmark_group("gemm_u8i8");
    for (cols, rows) in shapes {
        g.throughput(Throughput::Bytes((rows * cols) as u64));
        for (name, k, layout) in variants() {
            let pw = matrix(layout, rows, cols);
            for batch in [1usize, 2, 4, 8, 16, 64] {
                let acts = activations(cols, batch);
                let xs = qvecs(&acts);
                let mut out = vec![0f32; batch * rows];
                let id = BenchmarkId::new(format!("{name}/{cols}x{rows}"), batch);
                g.bench_function(id, |b| {
                    b.iter(|| gemm(&k, &pw, std::hint::black_box(&xs), None, &mut out))
                });
            }
        }
    }
    g.finish();
}

/// The micro-kernels alone on L1-resident operands (64 rows × 4 activations ×
/// 256 columns, 16 KiB): the most int8 multiply-adds per second they reach,
/// reported as elements = MACs.
fn peak(c: &mut Criterion) {
    let (rows, cols) = (64, 256);
    let acts = activations(cols, 4);
    let xs = qvecs(&acts);
    let mut g = c.benchmark_group("tile_peak");
    g.throughput(Throughput::Elements((rows * 4 * cols) as u64));
    for (name, k, layout) in variants() {
        let pw = matrix(layout, rows, cols);
        let mut out = vec![0f32; 4 * rows];
        g.bench_function(name, |b| {
            b.iter(|| gemm(&k, &pw, std::hint::black_box(&xs), None, &mut out))
        });
    }
    g.finish();
}

fn dram(c: &mut Criterion) {
    let (rows, cols) = (65536usize, 8192usize);
    let k = *ember_kernels::kernels();
    let pw = matrix(k.layout, rows, cols);
    let mut g = c.benchmark_group("gemv_dram");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(pw.weight_bytes() as u64));
    let acts = activations(cols, 1);
    let xs = qvecs(&acts);
    let mut out = vec![0f32; rows];
    g.bench_function(format!("{}/{cols}x{rows}", k.isa.name()), |b| {
        b.iter(|| gemm(&k, &pw, std::hint::black_box(&xs), None, &mut out))
    });
    // Two threads, each streaming half the rows (a thread spawn per call is
    // microseconds against a call's milliseconds): the kernel's share of
    // `--bench bandwidth`'s two-thread figure.
    g.bench_function(format!("{}/{cols}x{rows}/2-threads", k.isa.name()), |b| {
        b.iter(|| {
            let xs = std::hint::black_box(&xs);
            gemm_par(&k, &pw, xs, None, &mut out, &Scoped(2))
        })
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
