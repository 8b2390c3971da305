//! Attention's kernels per instruction set, on one KV block of one head
//! (16 positions, head dimension 64 as in GPT-2 and SmolLM), f32 and an int8
//! cache's (`qk_q8`, `pv_q8`): `cargo bench -p ember-kernels --bench
//! attention`. Throughput is the block's keys or values read.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ember_kernels::generic::KEY_BLOCK;
use ember_kernels::nn::Act;
use ember_kernels::Kernels;
use std::hint::black_box;

fn block(c: &mut Criterion) {
    let d = 64;
    let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
    let kv: Vec<f32> = (0..d * KEY_BLOCK)
        .map(|i| (i as f32 * 0.11).cos())
        .collect();
    let p: Vec<f32> = (0..KEY_BLOCK).map(|i| 1.0 / (i + 1) as f32).collect();
    let mut g = c.benchmark_group("attention_block");
    g.throughput(Throughput::Bytes((d * KEY_BLOCK * 4) as u64));
    for k in Kernels::all_available() {
        g.bench_function(BenchmarkId::new("qk", k.isa.name()), |b| {
            let mut out = [0f32; KEY_BLOCK];
            b.iter(|| (k.qk_f32)(black_box(&q), black_box(&kv), 0.125, &mut out))
        });
        g.bench_function(BenchmarkId::new("pv", k.isa.name()), |b| {
            let mut out = vec![0f32; d];
            b.iter(|| (k.pv_f32)(black_box(&p), 0.5, black_box(&kv), &mut out))
        });
    }
    g.finish();
    let q8: Vec<i8> = q.iter().map(|&x| (x * 127.0) as i8).collect();
    let kv8: Vec<i8> = kv.iter().map(|&x| (x * 127.0) as i8).collect();
    let scales = [0.01f32; KEY_BLOCK];
    let mut g = c.benchmark_group("attention_block_i8");
    g.throughput(Throughput::Bytes((d * KEY_BLOCK) as u64));
    for k in Kernels::all_available() {
        g.bench_function(BenchmarkId::new("qk_q8", k.isa.name()), |b| {
            let mut out = [0f32; KEY_BLOCK];
            b.iter(|| (k.qk_q8)(black_box(&q8), black_box(&kv8), &scales, 0.125, &mut out))
        });
        g.bench_function(BenchmarkId::new("pv_q8", k.isa.name()), |b| {
            let mut out = vec![0f32; d];
            b.iter(|| (k.pv_q8)(black_box(&p), 0.5, black_box(&kv8), &mut out))
        });
    }
    g.finish();
    // Per-row float work of a layer: softmax over 256 scores, GELU over a
    // 1024-wide MLP row.
    let mut g = c.benchmark_group("row_float");
    for k in Kernels::all_available() {
        let x: Vec<f32> = (0..1024).map(|i| (i as f32 * 0.013).sin() * 4.0).collect();
        g.bench_function(BenchmarkId::new("softmax256", k.isa.name()), |b| {
            let mut y = x[..256].to_vec();
            b.iter(|| {
                y.copy_from_slice(&x[..256]);
                (k.softmax_f32)(black_box(&mut y))
            })
        });
        g.bench_function(BenchmarkId::new("gelu_tanh1024", k.isa.name()), |b| {
            let mut y = x.clone();
            b.iter(|| {
                y.copy_from_slice(&x);
                (k.act_f32)(Act::GeluTanh, black_box(&mut y))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, block);
criterion_main!(benches);
