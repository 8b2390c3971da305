//! Property tests shared by every kernel of a signature (the `kernel!` macro
//! calls them): random operands around every block size and tail, values at
//! the extremes, worst-case magnitudes; results must equal the scalar
//! reference exactly. `PROPTEST_CASES` sets the number of cases (qemu runs
//! lower it).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::dispatch::{Block64, Rows4, BLOCK_GROUP, BLOCK_ROWS, TILE_ACTS, TILE_ROWS};
use crate::generic;

fn u8s(n: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof![Just(0u8), Just(255u8), any::<u8>()], n)
}

fn i8s(n: usize) -> impl Strategy<Value = Vec<i8>> {
    proptest::collection::vec(
        prop_oneof![Just(i8::MIN), Just(i8::MAX), Just(0i8), any::<i8>()],
        n,
    )
}

fn run<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config::default());
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

/// Lengths crossing 16-, 32- and 64-byte blocks.
const MAX_LEN: usize = 600;
/// Lengths for the worst-case (saturation) check.
const WORST_LENS: [usize; 8] = [1, 15, 16, 63, 64, 65, 4096, 4097];

pub(crate) fn dot_u8i8(f: fn(&[u8], &[i8]) -> i32) {
    run(
        (0usize..MAX_LEN).prop_flat_map(|n| (u8s(n), i8s(n))),
        |(a, b)| {
            prop_assert_eq!(f(&a, &b), generic::dot_u8i8(&a, &b));
            Ok(())
        },
    );
    for n in WORST_LENS {
        let a = vec![255u8; n];
        assert_eq!(f(&a, &vec![i8::MIN; n]), -255 * 128 * n as i32);
        assert_eq!(f(&a, &vec![i8::MAX; n]), 255 * 127 * n as i32);
    }
}

pub(crate) fn dot_i8i8(f: fn(&[i8], &[i8]) -> i32) {
    run(
        (0usize..MAX_LEN).prop_flat_map(|n| (i8s(n), i8s(n))),
        |(a, b)| {
            prop_assert_eq!(f(&a, &b), generic::dot_i8i8(&a, &b));
            Ok(())
        },
    );
    for n in WORST_LENS {
        let a = vec![i8::MIN; n];
        assert_eq!(f(&a, &vec![i8::MIN; n]), 128 * 128 * n as i32);
        assert_eq!(f(&a, &vec![i8::MAX; n]), -128 * 127 * n as i32);
    }
}

/// A packed block of four rows whose padding (past `n`, up to `stride`, and a
/// few bytes past the fourth row) holds garbage a kernel must not count.
#[derive(Debug, Clone)]
struct Block {
    xs: Vec<Vec<u8>>,
    data: Vec<i8>,
    stride: usize,
}

impl Block {
    fn rows4(&self) -> Rows4<'_> {
        let n = self.xs[0].len();
        let mut sums = [0; TILE_ROWS];
        for (r, s) in sums.iter_mut().enumerate() {
            let row = &self.data[r * self.stride..r * self.stride + n];
            *s = row.iter().map(|&v| v as i32).sum();
        }
        Rows4 {
            data: &self.data,
            stride: self.stride,
            sums,
        }
    }
}

fn block() -> impl Strategy<Value = Block> {
    (0usize..300, 0usize..3, 1..=TILE_ACTS, 0usize..3).prop_flat_map(|(n, pad, acts, slack)| {
        let stride = n.div_ceil(64) * 64 + pad * 16;
        let len = 3 * stride + n + slack;
        (
            proptest::collection::vec(u8s(n), acts),
            proptest::collection::vec(any::<i8>(), len),
        )
            .prop_map(move |(xs, mut data)| {
                // Extremes in the rows themselves, garbage in the padding.
                for (i, v) in data.iter_mut().enumerate() {
                    if i % 7 == 3 && i % stride.max(1) < n {
                        *v = i8::MIN;
                    }
                }
                Block { xs, data, stride }
            })
    })
}

type Tile = fn(&[&[u8]], Rows4) -> [[i32; TILE_ROWS]; TILE_ACTS];

pub(crate) fn tile_u8i8(f: Tile) {
    run(block(), |b| {
        let xs: Vec<&[u8]> = b.xs.iter().map(|x| &x[..]).collect();
        prop_assert_eq!(
            f(&xs, b.rows4()),
            generic::tile_u8i8(&xs, b.rows4()),
            "n {} stride {} acts {}",
            b.xs[0].len(),
            b.stride,
            xs.len()
        );
        Ok(())
    });
    for n in WORST_LENS {
        let stride = n.div_ceil(64) * 64;
        for w in [i8::MIN, i8::MAX] {
            let b = Block {
                xs: vec![vec![255u8; n]; TILE_ACTS],
                data: vec![w; 3 * stride + n],
                stride,
            };
            let xs: Vec<&[u8]> = b.xs.iter().map(|x| &x[..]).collect();
            let want = 255 * w as i32 * n as i32;
            assert_eq!(f(&xs, b.rows4()), [[want; TILE_ROWS]; TILE_ACTS], "n {n}");
        }
    }
}

type BlockKernel = fn(&[&[u8]], Block64) -> [[i32; BLOCK_ROWS]; TILE_ACTS];

/// Interleaved blocks: random weights everywhere, so the columns past `n` in
/// the last group and any slack after it hold garbage a kernel must not count.
pub(crate) fn block_u8i8(f: BlockKernel) {
    let case = (0usize..300, 1..=TILE_ACTS, 0usize..300).prop_flat_map(|(n, acts, slack)| {
        (
            proptest::collection::vec(u8s(n), acts),
            i8s(n.div_ceil(4) * BLOCK_GROUP + slack),
        )
    });
    run(case, |(xs, data)| {
        let xs: Vec<&[u8]> = xs.iter().map(|x| &x[..]).collect();
        let n = xs[0].len();
        let w = Block64 {
            data: &data,
            sums: None,
        };
        prop_assert_eq!(
            f(&xs, w),
            generic::block_u8i8(&xs, w),
            "n {} acts {}",
            n,
            xs.len()
        );
        // The same block with -128 raised to -127 in its first n columns
        // (the padding keeps its garbage), given its row sums.
        let mut narrow = data.clone();
        for c in 0..n {
            for r in 0..BLOCK_ROWS {
                let v = &mut narrow[(c / 4) * BLOCK_GROUP + r * 4 + c % 4];
                *v = (*v).max(-127);
            }
        }
        let sums = narrow_sums(&narrow, n);
        let w = Block64 {
            data: &narrow,
            sums: Some(&sums),
        };
        prop_assert_eq!(
            f(&xs, w),
            generic::block_u8i8(&xs, w),
            "narrow: n {} acts {}",
            n,
            xs.len()
        );
        Ok(())
    });
    for n in WORST_LENS {
        let groups = n.div_ceil(4) * BLOCK_GROUP;
        for w in [i8::MIN, i8::MAX] {
            let xs = vec![vec![255u8; n]; TILE_ACTS];
            let xs: Vec<&[u8]> = xs.iter().map(|x| &x[..]).collect();
            let data = vec![w; groups];
            let want = 255 * w as i32 * n as i32;
            let block = Block64 {
                data: &data,
                sums: None,
            };
            assert_eq!(f(&xs, block), [[want; BLOCK_ROWS]; TILE_ACTS], "n {n}");
        }
        // The sign-adjusted path at its extremes: |x − 128| = 128 (x = 0)
        // and 127 (x = 255) against ±127, one activation and four.
        for (x, w) in [(0u8, -127i8), (0, 127), (255, -127), (255, 127)] {
            let data = vec![w; groups];
            let sums = narrow_sums(&data, n);
            let block = Block64 {
                data: &data,
                sums: Some(&sums),
            };
            let want = x as i32 * w as i32 * n as i32;
            for acts in [1, TILE_ACTS] {
                let xs = vec![vec![x; n]; acts];
                let xs: Vec<&[u8]> = xs.iter().map(|x| &x[..]).collect();
                let got = f(&xs, block);
                assert!(
                    got[..acts].iter().all(|o| *o == [want; BLOCK_ROWS]),
                    "n {n} x {x} w {w} acts {acts}"
                );
            }
        }
    }
}

/// The 64 row sums over the first `n` columns of an interleaved block.
fn narrow_sums(data: &[i8], n: usize) -> [i32; BLOCK_ROWS] {
    std::array::from_fn(|r| {
        (0..n)
            .map(|c| data[(c / 4) * BLOCK_GROUP + r * 4 + c % 4] as i32)
            .sum()
    })
}

type Block16Kernel = fn(crate::Acts16, crate::Blocks, &mut [crate::Acc16]);

/// Every block's sums through `f` (outputs start as garbage to overwrite).
fn block16_sums(f: Block16Kernel, a: crate::Acts16, w: crate::Blocks) -> Vec<crate::Acc16> {
    let mut out = vec![[[7; BLOCK_ROWS]; crate::TILE16_ACTS]; w.count * a.tiles];
    f(a, w, &mut out);
    out
}

/// 16 or 32 activations against 1–3 blocks: random weights everywhere, so
/// the columns past `n` (which a 64-column kernel multiplies by the
/// activations' zero padding) and the slack after the last block hold
/// garbage; rows of random length up to 300 at a padded stride.
pub(crate) fn block16_u8i8(f: Block16Kernel) {
    let case = (1usize..300, 1usize..4, 0usize..2, 0usize..2, 1usize..=2).prop_flat_map(
        |(n, count, extra_groups, extra_cols, tiles)| {
            let stride = (n.div_ceil(4) + extra_groups) * BLOCK_GROUP;
            let wide = n.next_multiple_of(64);
            let a_stride = wide + 64 * extra_cols;
            let rows = crate::TILE16_ACTS * tiles;
            (
                u8s((rows - 1) * a_stride + wide),
                i8s((count - 1) * stride + wide / 4 * BLOCK_GROUP),
            )
                .prop_map(move |(mut a, w)| {
                    for t in 0..rows {
                        a[t * a_stride + n..t * a_stride + wide].fill(0);
                    }
                    (n, a_stride, a, stride, count, w, tiles)
                })
        },
    );
    run(case, |(n, a_stride, a, stride, count, w, tiles)| {
        let acts = crate::Acts16 {
            data: &a,
            stride: a_stride,
            n,
            tiles,
        };
        let blocks = crate::Blocks {
            data: &w,
            stride,
            count,
        };
        let want = block16_sums(generic::block16_u8i8, acts, blocks);
        prop_assert_eq!(want.len(), count * tiles);
        prop_assert_eq!(
            block16_sums(f, acts, blocks),
            want,
            "n {} stride {} count {} tiles {}",
            n,
            stride,
            count,
            tiles
        );
        Ok(())
    });
    for n in WORST_LENS {
        let wide = n.next_multiple_of(64);
        for (w, tiles) in [(i8::MIN, 1), (i8::MAX, 1), (i8::MIN, 2)] {
            let mut a = vec![255u8; 16 * tiles * wide];
            for t in 0..16 * tiles {
                a[t * wide + n..(t + 1) * wide].fill(0);
            }
            let mut data = vec![w; wide / 4 * BLOCK_GROUP];
            // Columns past n: garbage the zero activations must cancel.
            for g in n.div_ceil(4)..wide / 4 {
                data[g * BLOCK_GROUP..(g + 1) * BLOCK_GROUP].fill(i8::MIN);
            }
            for c in n..n.div_ceil(4) * 4 {
                for r in 0..BLOCK_ROWS {
                    data[(c / 4) * BLOCK_GROUP + r * 4 + c % 4] = i8::MIN;
                }
            }
            let acts = crate::Acts16 {
                data: &a,
                stride: wide,
                n,
                tiles,
            };
            let blocks = crate::Blocks {
                data: &data,
                stride: n.div_ceil(4) * BLOCK_GROUP,
                count: 1,
            };
            let want = 255 * w as i32 * n as i32;
            assert_eq!(
                block16_sums(f, acts, blocks),
                vec![[[want; BLOCK_ROWS]; crate::TILE16_ACTS]; tiles],
                "n {n}"
            );
        }
    }
}

fn f32s(n: usize) -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(-4f32..4.0, n)
}

/// Float kernels run the reference's lane-wise code: equal bit for bit.
pub(crate) fn qk_f32(f: fn(&[f32], &[f32], f32, &mut [f32])) {
    run(
        (0usize..80, 0..=generic::KEY_BLOCK)
            .prop_flat_map(|(d, n)| (f32s(d), f32s(d * generic::KEY_BLOCK), Just(n))),
        |(q, keys, n)| {
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            f(&q, &keys, 0.125, &mut a);
            generic::qk_f32(&q, &keys, 0.125, &mut b);
            prop_assert_eq!(a, b);
            Ok(())
        },
    );
}

/// Integer scores on int8 keys: equal to the reference, and to the plain
/// per-key sum of products in i64 (the layout's meaning), scaled.
pub(crate) fn qk_q8(f: crate::dispatch::QkQ8Fn) {
    const G: usize = generic::KEY_GROUP;
    let ks = proptest::collection::vec(prop_oneof![Just(0f32), 1e-4f32..0.5], generic::KEY_BLOCK);
    // The cache and the query hold ±127 at most (quantize_i8 clamps).
    let q8 = |n| proptest::collection::vec(prop_oneof![Just(-127i8), Just(127i8), -127i8..=127], n);
    run(
        (0usize..40, 0..=generic::KEY_BLOCK).prop_flat_map(move |(g, n)| {
            (
                q8(g * G),
                q8(g * G * generic::KEY_BLOCK),
                ks.clone(),
                Just(n),
            )
        }),
        |(q, keys, ks, n)| {
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            f(&q, &keys, &ks, 0.125, &mut a);
            generic::qk_q8(&q, &keys, &ks, 0.125, &mut b);
            prop_assert_eq!(&a, &b);
            for (j, &got) in a.iter().enumerate() {
                let dot: i64 = (0..q.len())
                    .map(|d| {
                        q[d] as i64 * keys[(d / G) * G * generic::KEY_BLOCK + j * G + d % G] as i64
                    })
                    .sum();
                prop_assert_eq!(got, dot as f32 * 0.125 * ks[j]);
            }
            Ok(())
        },
    );
}

/// The integer weighted sum on int8 values: equal to the reference, and to
/// the plain per-dimension sum of the quantized weights' products in i64
/// (the layout's meaning), scaled and added.
pub(crate) fn pv_q8(f: fn(&[f32], f32, &[i8], &mut [f32])) {
    const G: usize = generic::KEY_GROUP;
    let w = |n| {
        proptest::collection::vec(
            prop_oneof![Just(0f32), Just(1f32), 0f32..1.0, 0f32..1e-3],
            n,
        )
    };
    let v8 = |n| proptest::collection::vec(prop_oneof![Just(-127i8), Just(127i8), -127i8..=127], n);
    run(
        (0usize..80, 0..=generic::KEY_BLOCK)
            .prop_flat_map(move |(d, n)| (w(n), v8(d * generic::KEY_BLOCK), f32s(d))),
        |(w, vals, out)| {
            let (mut a, mut b) = (out.clone(), out.clone());
            f(&w, 0.5, &vals, &mut a);
            generic::pv_q8(&w, 0.5, &vals, &mut b);
            prop_assert_eq!(&a, &b);
            let (wq, ws) = generic::weights_u8(&w);
            let d = out.len();
            for (c, (&got, &o)) in a.iter().zip(&out).enumerate() {
                let dot: i64 = (0..w.len())
                    .map(|s| wq[s] as i64 * vals[(s / G) * G * d + c * G + s % G] as i64)
                    .sum();
                let want = if ws == 0.0 {
                    o
                } else {
                    o + dot as f32 * (ws * 0.5)
                };
                prop_assert_eq!(got, want);
            }
            Ok(())
        },
    );
}

/// f16 widening: every bit pattern in one sweep, then random lengths around
/// the vector widths; bits equal the reference's (NaNs: both NaN).
pub(crate) fn f16_to_f32(f: fn(&[u16], &mut [f32])) {
    let same = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    };
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let (mut a, mut b) = (vec![0f32; all.len()], vec![0f32; all.len()]);
    f(&all, &mut a);
    generic::f16_to_f32(&all, &mut b);
    assert!(same(&a, &b), "the sweep of all 65536 values differs");
    run(
        proptest::collection::vec(
            prop_oneof![
                Just(0x7c00u16),
                Just(0x0001u16),
                Just(0x7e01u16),
                any::<u16>()
            ],
            0..80,
        ),
        |src| {
            let (mut a, mut b) = (vec![0f32; src.len()], vec![0f32; src.len()]);
            f(&src, &mut a);
            generic::f16_to_f32(&src, &mut b);
            prop_assert!(same(&a, &b), "{:?} != {:?}", a, b);
            Ok(())
        },
    );
}

/// The correction: bit-identical to the reference, with and without bias,
/// at every length up to a block and past it, at the i32 extremes a
/// product can reach (zero points 0–255 against sums of ±128·4096).
pub(crate) fn dequant_i32(f: fn(&[i32], crate::dispatch::Dequant<'_>, &mut [f32])) {
    use crate::dispatch::Dequant;
    run(
        (0usize..150, 0i32..256).prop_flat_map(|(n, zp)| {
            let sums = proptest::collection::vec(-(1i32 << 19)..(1 << 19), n);
            let acc = proptest::collection::vec(-(1i32 << 27)..(1 << 27), n);
            let bias = proptest::option::of(f32s(n));
            (acc, sums, f32s(n), bias, Just(zp), -4f32..4.0)
        }),
        |(acc, sums, scales, bias, zp, scale)| {
            let d = Dequant {
                row_sums: &sums,
                row_scales: &scales,
                bias: bias.as_deref(),
                zero_point: zp,
                scale,
            };
            let (mut a, mut b) = (vec![0f32; acc.len()], vec![1f32; acc.len()]);
            f(&acc, d, &mut a);
            generic::dequant_i32(&acc, d, &mut b);
            prop_assert_eq!(a, b);
            Ok(())
        },
    );
}

pub(crate) fn pv_f32(f: fn(&[f32], f32, &[f32], &mut [f32])) {
    run(
        (0usize..80, 0usize..20).prop_flat_map(|(d, n)| (f32s(n), f32s(d * n), f32s(d))),
        |(p, vals, out)| {
            let (mut a, mut b) = (out.clone(), out);
            f(&p, 0.5, &vals, &mut a);
            generic::pv_f32(&p, 0.5, &vals, &mut b);
            prop_assert_eq!(a, b);
            Ok(())
        },
    );
}

/// The panel product: every ISA equals the reference bit for bit, for 1–4
/// rows (the AVX2 copy takes them two at a time).
pub(crate) fn panel_f32(f: fn(&[&[f32]], &[f32], &mut [f32])) {
    use crate::generic::PANEL;
    run(
        (0usize..40, 1usize..5)
            .prop_flat_map(|(n, b)| (f32s(n * b), f32s(n * PANEL), f32s(b * PANEL), Just((n, b)))),
        |(x, panel, out, (n, b))| {
            let xs: Vec<&[f32]> = (0..b).map(|i| &x[i * n..(i + 1) * n]).collect();
            let (mut a, mut b) = (out.clone(), out);
            f(&xs, &panel, &mut a);
            generic::panel_f32(&xs, &panel, &mut b);
            prop_assert_eq!(a, b);
            Ok(())
        },
    );
}

/// Activation ranges with the extremes, zero-crossing or not, and empty.
fn activations() -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![
        proptest::collection::vec(-50f32..50.0, 0..300),
        proptest::collection::vec(0.5f32..8.0, 1..100),
        proptest::collection::vec(-8f32..-0.5, 1..100),
        proptest::collection::vec(Just(0f32), 0..40),
    ]
}

/// Floats with the cases an order or a cast could get wrong: NaNs (both
/// signs), infinities, signed zeros, subnormals, the largest finite values.
fn special_floats() -> impl Strategy<Value = Vec<f32>> {
    let v = prop_oneof![
        Just(f32::NAN),
        Just(-f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(0.0f32),
        Just(-0.0f32),
        Just(1e-40f32),
        Just(-1e-45f32),
        Just(f32::MAX),
        Just(f32::MIN),
        -1e3f32..1e3,
        -1f32..1.0,
    ];
    proptest::collection::vec(v, 0..100)
}

/// Quantization parameters: equal to the reference's, bit for bit, also
/// with NaNs, infinities and signed zeros in the tensor.
pub(crate) fn dynamic_params(f: fn(&[f32]) -> (f32, u8)) {
    let xs = prop_oneof![
        activations(),
        special_floats().prop_filter("finite range", |x| x
            .iter()
            .all(|v| v.is_nan() || v.abs() < 1e30)),
    ];
    run(xs, |x| {
        let (a, b) = (f(&x), crate::quant::dynamic_params(&x));
        prop_assert_eq!(a.0.to_bits(), b.0.to_bits());
        prop_assert_eq!(a.1, b.1);
        Ok(())
    });
}

/// Quantized values: equal to the reference's, with the input's own
/// parameters and with a wider tensor's (values outside clamp).
pub(crate) fn quantize_u8(f: fn(&[f32], f32, u8, &mut [u8])) {
    run((activations(), any::<bool>()), |(x, wide)| {
        let (mut s, mut z) = crate::quant::dynamic_params(&x);
        if wide {
            (s, z) = (s * 0.5, z / 2);
        }
        let (mut a, mut b) = (vec![0u8; x.len()], vec![0u8; x.len()]);
        f(&x, s, z, &mut a);
        crate::quant::quantize_u8(&x, s, z, &mut b);
        prop_assert_eq!(a, b);
        Ok(())
    });
}

/// Int8 KV quantization: the reference's scale bits and bytes, over plain
/// rows, rows whose values fall on the rounding's halves, and rows of NaNs,
/// infinities, zeros and subnormals.
pub(crate) fn quantize_i8(f: fn(&[f32], &mut [i8]) -> f32) {
    let halves = (1usize..100).prop_flat_map(|n| {
        proptest::collection::vec((-254i32..=254).prop_map(|h| h as f32 * 0.5), n).prop_map(
            |mut x| {
                // 127 · 2 halves: the largest sets the scale to exactly 1.
                x[0] = 127.0;
                x
            },
        )
    });
    let xs = prop_oneof![
        proptest::collection::vec(-50f32..50.0, 0..300),
        special_floats(),
        halves,
        proptest::collection::vec(Just(0f32), 0..40),
    ];
    run(xs, |x| {
        let (mut a, mut b) = (vec![0i8; x.len()], vec![0i8; x.len()]);
        let (sa, sb) = (f(&x, &mut a), crate::quant::quantize_i8(&x, &mut b));
        prop_assert_eq!(sa.to_bits(), sb.to_bits());
        prop_assert_eq!(a, b);
        Ok(())
    });
}

/// LayerNorm: the reference's bits, rows of every length around the lanes.
pub(crate) fn layer_norm_f32(f: fn(&mut [f32], &[f32], &[f32], f32)) {
    let case = (0usize..300).prop_flat_map(|n| {
        (
            proptest::collection::vec(-20f32..20.0, n),
            proptest::collection::vec(-2f32..2.0, n),
            proptest::collection::vec(-1f32..1.0, n),
        )
    });
    run(case, |(x, g, b)| {
        let (mut a, mut r) = (x.clone(), x);
        f(&mut a, &g, &b, 1e-5);
        crate::nn::layer_norm(&mut r, &g, &b, 1e-5);
        prop_assert_eq!(bits(&a), bits(&r));
        Ok(())
    });
}

/// RMS norm: the reference's bits.
pub(crate) fn rms_norm_f32(f: fn(&mut [f32], &[f32], f32)) {
    let case = (0usize..300).prop_flat_map(|n| {
        (
            proptest::collection::vec(-20f32..20.0, n),
            proptest::collection::vec(-2f32..2.0, n),
        )
    });
    run(case, |(x, g)| {
        let (mut a, mut r) = (x.clone(), x);
        f(&mut a, &g, 1e-6);
        crate::nn::rms_norm(&mut r, &g, 1e-6);
        prop_assert_eq!(bits(&a), bits(&r));
        Ok(())
    });
}

/// The bit patterns of floats, for comparisons that must be exact (NaN
/// and signed zeros included).
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Activations: every ISA's copy gives the reference's bits, for each kind,
/// over ranges that reach the clamps of `exp` and `tanh`.
pub(crate) fn act_f32(f: fn(crate::nn::Act, &mut [f32])) {
    let xs = prop_oneof![
        proptest::collection::vec(-12f32..12.0, 0..200),
        proptest::collection::vec(-200f32..200.0, 0..200),
    ];
    run(xs, |x| {
        for act in crate::nn::Act::ALL {
            let (mut a, mut b) = (x.clone(), x.clone());
            f(act, &mut a);
            crate::nn::act_f32(act, &mut b);
            prop_assert_eq!(bits(&a), bits(&b), "{:?}", act);
        }
        Ok(())
    });
}

/// Softmax numerators and their sum: the reference's bits.
pub(crate) fn softmax_f32(f: fn(&mut [f32]) -> f32) {
    run(proptest::collection::vec(-100f32..100.0, 0..300), |x| {
        let (mut a, mut b) = (x.clone(), x);
        let (sa, sb) = (f(&mut a), crate::nn::softmax_f32(&mut b));
        prop_assert_eq!(sa.to_bits(), sb.to_bits());
        prop_assert_eq!(bits(&a), bits(&b));
        Ok(())
    });
}

/// The LSTM cell: the reference's bits, from 0 to 70 units, gates past
/// the activations' clamps.
pub(crate) fn lstm_cell_f32(f: fn(&[f32], &mut [f32], &mut [f32])) {
    let case = (0usize..70).prop_flat_map(|u| {
        (
            proptest::collection::vec(-30f32..30.0, 4 * u),
            proptest::collection::vec(-5f32..5.0, u),
        )
    });
    run(case, |(g, c)| {
        let (mut ca, mut cb) = (c.clone(), c);
        let (mut ha, mut hb) = (vec![0f32; ca.len()], vec![0f32; ca.len()]);
        f(&g, &mut ca, &mut ha);
        crate::nn::lstm_cell_f32(&g, &mut cb, &mut hb);
        prop_assert_eq!(bits(&ca), bits(&cb));
        prop_assert_eq!(bits(&ha), bits(&hb));
        Ok(())
    });
}
