//! The kernel table, built once per process.

use std::sync::OnceLock;

use crate::generic;

/// Instruction-set levels Ember has kernels for. Within one architecture the
/// later variant implies the earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Scalar Rust: every CPU.
    Generic,
    /// Arm NEON without the dot-product extension: Cortex-A53/A72 (Raspberry
    /// Pi 3/4) in 64-bit mode, and any NEON core in 32-bit (armv7) mode.
    Neon,
    /// aarch64 NEON with `sdot` (Armv8.2 dotprod): Cortex-A76 (Raspberry Pi 5),
    /// Cortex-A78AE (Jetson Orin).
    NeonDot,
    /// x86_64 AVX2 + FMA (Haswell and later, Zen).
    Avx2,
    /// x86_64 AVX-512 with VNNI (`vpdpbusd`): Ice Lake, Zen 4 and later.
    Avx512Vnni,
    /// AVX-512 VNNI plus AMX int8 tiles (`tdpbusd`, 16×16×64 multiply-adds
    /// per instruction) for products of many activations: Sapphire Rapids and
    /// later Xeons, when the kernel grants the process the tile state.
    Amx,
}

impl Isa {
    /// Every level, in the order of the enum.
    pub const ALL: [Isa; 6] = [
        Isa::Generic,
        Isa::Neon,
        Isa::NeonDot,
        Isa::Avx2,
        Isa::Avx512Vnni,
        Isa::Amx,
    ];

    /// Name as accepted by `EMBER_CPU`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            Isa::Neon => "neon",
            Isa::NeonDot => "neon-dotprod",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Amx => "amx",
        }
    }

    /// Parse an `EMBER_CPU` value.
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == s)
    }

    fn family(self) -> u8 {
        match self {
            Isa::Generic => 0,
            Isa::Neon | Isa::NeonDot => 1,
            Isa::Avx2 | Isa::Avx512Vnni | Isa::Amx => 2,
        }
    }

    /// Whether a cap of `self` permits kernels of level `isa`: the generic
    /// level always, otherwise levels of the same architecture up to `self`.
    pub fn allows(self, isa: Isa) -> bool {
        isa == Isa::Generic || (self.family() == isa.family() && isa <= self)
    }

    /// The highest level of this build's architecture (the default cap).
    pub fn highest() -> Isa {
        if cfg!(target_arch = "x86_64") {
            Isa::Amx
        } else if cfg!(target_arch = "aarch64") {
            Isa::NeonDot
        } else if cfg!(target_arch = "arm") {
            Isa::Neon
        } else {
            Isa::Generic
        }
    }
}

/// Rows of a tile: the micro-kernel computes this many weight rows at once.
pub const TILE_ROWS: usize = 4;
/// Activation vectors a micro-kernel call takes at most.
pub const TILE_ACTS: usize = 4;

/// Four consecutive rows of a packed weight matrix, as a micro-kernel reads them.
#[derive(Debug, Clone, Copy)]
pub struct Rows4<'a> {
    /// Row `r` starts at `r * stride`; at least `3 * stride + n` bytes, `n`
    /// being the activations' length. Bytes past `n` in a row are ignored.
    pub data: &'a [i8],
    /// Distance between rows, in bytes (≥ `n`).
    pub stride: usize,
    /// `Σ data[r][..n]` for each row: kernels that work on activations shifted
    /// to i8 (`x − 128`, the Arm paths) add `128 · sum` back.
    pub sums: [i32; TILE_ROWS],
}

/// The micro-kernel: exact `Σ x[c] · w[r][c]` for up to four u8 activation
/// vectors (`xs`, equal lengths) against four weight rows. Result `[a][r]`;
/// lanes for absent activations are zero.
pub type TileFn = fn(&[&[u8]], Rows4) -> [[i32; TILE_ROWS]; TILE_ACTS];

/// Rows of a weight block in the interleaved layout ([`Layout::Blocks`]).
pub const BLOCK_ROWS: usize = 64;
/// Bytes of one column group of a block: 4 columns of [`BLOCK_ROWS`] rows.
pub const BLOCK_GROUP: usize = 4 * BLOCK_ROWS;

/// How a packed weight matrix lies in memory; each table says which one its
/// kernels read fastest, and the packer follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Output rows one after another, padded to 64 bytes: for kernels that
    /// multiply a row by an activation vector and sum horizontally
    /// ([`Kernels::tile_u8i8`]).
    Rows,
    /// Blocks of [`BLOCK_ROWS`] rows, interleaved by groups of 4 columns:
    /// byte `g · 256 + r · 4 + j` of a block is row `r`, column `4g + j`. One
    /// 64-byte load holds 4 columns of 16 rows, so a `vpdpbusd` against four
    /// broadcast activation bytes advances 16 rows at once, with no horizontal
    /// sums ([`Kernels::block_u8i8`]); on AVX2, 16 bytes widened to i16 are 4
    /// rows × 4 columns for one `vpmaddwd` against 4 activation values.
    Blocks,
}

/// One block of the [`Layout::Blocks`] layout, as a micro-kernel reads it.
#[derive(Debug, Clone, Copy)]
pub struct Block64<'a> {
    /// The block's groups, [`BLOCK_GROUP`] bytes each; at least
    /// `n.div_ceil(4)` of them, `n` being the activations' length. Columns
    /// past `n` are ignored whatever they hold. What follows may be the next
    /// blocks of the matrix (`n.div_ceil(4)` groups each), which a kernel
    /// may prefetch but never counts.
    pub data: &'a [i8],
    /// The 64 rows' sums over the first `n` columns, given only when every
    /// weight in those columns lies in `[-127, 127]` (as onnxruntime's
    /// symmetric int8 quantization produces). A kernel may then compute
    /// `Σ (x − 128) · w + 128 · Σ w`, whose `x − 128` times a sign-adjusted
    /// weight fits `vpmaddubsw` without saturating (AVX2's single-activation
    /// path). Sums that do not match the weights give wrong results, never
    /// undefined behavior.
    pub sums: Option<&'a [i32; BLOCK_ROWS]>,
}

/// The block micro-kernel: exact `Σ x[c] · w[r][c]` for up to four u8
/// activation vectors (`xs`, equal lengths) against the 64 rows of a block.
/// Result `[a][r]`; lanes for absent activations are zero.
pub type BlockFn = fn(&[&[u8]], Block64) -> [[i32; BLOCK_ROWS]; TILE_ACTS];

/// Activations for the matrix kernels ([`Kernels::block16_u8i8`]): `tiles`
/// groups of 16 rows of u8 at `stride` bytes apart, `n` meaningful columns
/// each, and zeros from column `n` up to the next multiple of 64 (those
/// columns meet weights of other columns, or of the next block, which must
/// count for nothing).
#[derive(Debug, Clone, Copy)]
pub struct Acts16<'a> {
    /// At least `(16 · tiles − 1) · stride + n.next_multiple_of(64)` bytes.
    pub data: &'a [u8],
    /// Distance between rows, in bytes (≥ `n.next_multiple_of(64)`).
    pub stride: usize,
    /// Columns, ≥ 1.
    pub n: usize,
    /// Groups of 16 rows: 1, or [`MAX_TILES16`] (each weight tile loaded
    /// then serves both).
    pub tiles: usize,
}

/// Most groups of 16 activations one matrix-kernel call takes.
pub const MAX_TILES16: usize = 2;

/// Consecutive blocks of a [`Layout::Blocks`] matrix.
#[derive(Debug, Clone, Copy)]
pub struct Blocks<'a> {
    /// Block `b` starts at `b · stride`. The kernel reads 64 columns at a
    /// time, so the last block needs `n.next_multiple_of(64) / 4` groups in
    /// the slice, not only `n.div_ceil(4)` (the packer leaves that slack).
    pub data: &'a [i8],
    /// Bytes per block, a multiple of [`BLOCK_GROUP`] and ≥ `n.div_ceil(4)` groups.
    pub stride: usize,
    /// How many blocks.
    pub count: usize,
}

/// Activations in one group of the matrix kernel: one AMX tile of rows (a
/// call takes one group or [`MAX_TILES16`]).
pub const TILE16_ACTS: usize = 16;

/// A block's sums for 16 activations, `[activation][row]`.
pub type Acc16 = [[i32; BLOCK_ROWS]; TILE16_ACTS];

/// The matrix micro-kernel: exact `Σ x[c] · w[r][c]` for `tiles` groups of
/// 16 activations against each of `count` blocks, group `g`'s sums with
/// block `b` into `out[b · tiles + g]` (`out.len() == count · tiles`).
pub type Block16Fn = fn(Acts16, Blocks, &mut [Acc16]);

/// What turns a block's exact integer sums into f32 outputs (see
/// [`generic::dequant_i32`]): per output row its weights' sum and scale, the
/// activation's zero point and scale, and an optional bias; all row slices
/// as long as the output.
#[derive(Debug, Clone, Copy)]
pub struct Dequant<'a> {
    pub row_sums: &'a [i32],
    pub row_scales: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub zero_point: i32,
    pub scale: f32,
}

/// Scores in integers: the quantized query, a block of int8 keys, their
/// scales, the scores' common scale, the scores (see [`generic::qk_q8`]).
pub type QkQ8Fn = fn(&[i8], &[i8], &[f32], f32, &mut [f32]);

/// Function pointers to the best kernels for this CPU.
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    /// The most capable instruction set in use.
    pub isa: Isa,
    /// `Σ a[i]·b[i]` over u8 activations and i8 weights, exact in i32.
    pub dot_u8i8: fn(&[u8], &[i8]) -> i32,
    /// `Σ a[i]·b[i]` over i8 (symmetrically quantized) operands, exact in i32.
    pub dot_i8i8: fn(&[i8], &[i8]) -> i32,
    /// The layout [`crate::gemv::PackedI8`] packs weights in for this table.
    pub layout: Layout,
    /// The GEMV/GEMM micro-kernel on [`Layout::Rows`], see [`TileFn`].
    pub tile_u8i8: TileFn,
    /// The GEMV/GEMM micro-kernel on [`Layout::Blocks`], see [`BlockFn`].
    pub block_u8i8: BlockFn,
    /// A kernel for 16 or 32 activations at once on [`Layout::Blocks`], where
    /// the CPU has one that beats passes of `block_u8i8` (AMX); see
    /// [`Block16Fn`] and [`generic::block16_u8i8`] for its reference.
    pub block16_u8i8: Option<Block16Fn>,
    /// The quantization correction after an integer product, see [`generic::dequant_i32`].
    pub dequant_i32: fn(&[i32], Dequant<'_>, &mut [f32]),
    /// Attention scores over a block of keys, see [`generic::qk_f32`].
    pub qk_f32: fn(&[f32], &[f32], f32, &mut [f32]),
    /// Attention's weighted sum of a block of values, see [`generic::pv_f32`].
    pub pv_f32: fn(&[f32], f32, &[f32], &mut [f32]),
    /// Scores in integers over a block of an int8 cache's keys, see [`generic::qk_q8`].
    pub qk_q8: QkQ8Fn,
    /// The weighted sum in integers of a block of an int8 cache's values, see [`generic::pv_q8`].
    pub pv_q8: fn(&[f32], f32, &[i8], &mut [f32]),
    /// Exact f16 → f32 widening of a 16-bit KV cache's blocks, see [`generic::f16_to_f32`].
    pub f16_to_f32: fn(&[u16], &mut [f32]),
    /// A float product on a panel of 64 columns for 1–4 rows, see [`generic::panel_f32`].
    pub panel_f32: fn(&[&[f32]], &[f32], &mut [f32]),
    /// `DynamicQuantizeLinear`'s parameters of a tensor, see [`crate::quant::dynamic_params`].
    pub dynamic_params: fn(&[f32]) -> (f32, u8),
    /// u8 quantization with given parameters, see [`crate::quant::quantize_u8`].
    pub quantize_u8: fn(&[f32], f32, u8, &mut [u8]),
    /// Symmetric int8 quantization of a KV row, see [`crate::quant::quantize_i8`].
    pub quantize_i8: fn(&[f32], &mut [i8]) -> f32,
    /// LayerNorm over a row, in place, see [`crate::nn::layer_norm`].
    pub layer_norm_f32: fn(&mut [f32], &[f32], &[f32], f32),
    /// RMS norm over a row, in place, see [`crate::nn::rms_norm`].
    pub rms_norm_f32: fn(&mut [f32], &[f32], f32),
    /// An activation over a slice, in place, see [`crate::nn::act_f32`].
    pub act_f32: fn(crate::nn::Act, &mut [f32]),
    /// Softmax numerators in place and their sum, see [`crate::nn::softmax_f32`].
    pub softmax_f32: fn(&mut [f32]) -> f32,
    /// The LSTM cell over a group of units, see [`crate::nn::lstm_cell_f32`].
    pub lstm_cell_f32: fn(&[f32], &mut [f32], &mut [f32]),
}

impl Kernels {
    /// The scalar reference table.
    pub fn generic() -> Kernels {
        Kernels {
            isa: Isa::Generic,
            dot_u8i8: generic::dot_u8i8,
            dot_i8i8: generic::dot_i8i8,
            layout: Layout::Rows,
            tile_u8i8: generic::tile_u8i8,
            block_u8i8: generic::block_u8i8,
            block16_u8i8: None,
            dequant_i32: generic::dequant_i32,
            qk_f32: generic::qk_f32,
            pv_f32: generic::pv_f32,
            qk_q8: generic::qk_q8,
            pv_q8: generic::pv_q8,
            f16_to_f32: generic::f16_to_f32,
            panel_f32: generic::panel_f32,
            dynamic_params: crate::quant::dynamic_params,
            quantize_u8: crate::quant::quantize_u8,
            quantize_i8: crate::quant::quantize_i8,
            layer_norm_f32: crate::nn::layer_norm,
            rms_norm_f32: crate::nn::rms_norm,
            act_f32: crate::nn::act_f32,
            softmax_f32: crate::nn::softmax_f32,
            lstm_cell_f32: crate::nn::lstm_cell_f32,
        }
    }

    /// The best table for this CPU, using nothing `limit` does not allow.
    pub fn detect(limit: Isa) -> Kernels {
        #[allow(unused_mut)]
        let mut k = Kernels::generic();
        #[cfg(target_arch = "x86_64")]
        crate::x86_64::plug(&mut k, limit);
        #[cfg(target_arch = "aarch64")]
        crate::aarch64::plug(&mut k, limit);
        #[cfg(target_arch = "arm")]
        crate::arm::plug(&mut k, limit);
        let _ = limit;
        k
    }

    /// One table per level this machine can run, lowest first (for tests and
    /// benches that compare paths).
    pub fn all_available() -> Vec<Kernels> {
        let mut v: Vec<Kernels> = Vec::new();
        for isa in Isa::ALL {
            let k = Kernels::detect(isa);
            if k.isa == isa {
                v.push(k);
            }
        }
        v
    }
}

/// How `EMBER_CPU` was interpreted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuOverride {
    /// Not set: full detection.
    None,
    /// A known level caps the choice.
    Cap(Isa),
    /// Set to a value that names no level: ignored (full detection).
    Unknown(String),
}

/// The `EMBER_CPU` setting.
pub fn cpu_override() -> CpuOverride {
    match std::env::var("EMBER_CPU") {
        Err(_) => CpuOverride::None,
        Ok(v) => Isa::parse(&v).map_or(CpuOverride::Unknown(v), CpuOverride::Cap),
    }
}

/// The process-wide table: the best this CPU runs, capped by `EMBER_CPU`
/// (`generic`, `neon`, `neon-dotprod`, `avx2`, `avx512vnni`, `amx`) when set. A level
/// of another architecture caps to `generic`; an unknown value is ignored
/// ([`cpu_override`] tells, so the daemon can warn); [`Kernels::isa`] names
/// what was chosen.
pub fn kernels() -> &'static Kernels {
    static TABLE: OnceLock<Kernels> = OnceLock::new();
    TABLE.get_or_init(|| {
        let limit = match cpu_override() {
            CpuOverride::Cap(isa) => isa,
            _ => Isa::highest(),
        };
        Kernels::detect(limit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run (under qemu, in CI, on a board) must not pass by silently using
    /// only the scalar path: `EMBER_EXPECT_ISA` names what must be active;
    /// without it, the CPU's own flags from /proc/cpuinfo say what to expect.
    #[test]
    fn expected_cpu_features_are_detected() {
        let got = Kernels::detect(Isa::highest()).isa;
        let expected = match std::env::var("EMBER_EXPECT_ISA") {
            Ok(v) => {
                Isa::parse(&v).unwrap_or_else(|| panic!("EMBER_EXPECT_ISA={v} is not a known ISA"))
            }
            Err(_) => expected_from_cpuinfo(),
        };
        assert_eq!(
            got,
            expected,
            "detected {} but this CPU should run {}",
            got.name(),
            expected.name()
        );
    }

    fn expected_from_cpuinfo() -> Isa {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        // x86 says "flags", Arm says "Features".
        let flags: Vec<&str> = info
            .lines()
            .find(|l| l.starts_with("flags") || l.starts_with("Features"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap_or_default();
        let has = |f: &str| flags.contains(&f);
        if cfg!(target_arch = "x86_64") {
            let vnni = has("avx512f") && has("avx512bw") && has("avx512_vnni");
            // The kernel lists AMX flags only if it manages the tile state.
            if vnni && has("amx_tile") && has("amx_int8") {
                return Isa::Amx;
            }
            if vnni {
                return Isa::Avx512Vnni;
            }
            if has("avx2") && has("fma") {
                return Isa::Avx2;
            }
        }
        if cfg!(target_arch = "aarch64") {
            if has("asimddp") {
                return Isa::NeonDot;
            }
            if has("asimd") {
                return Isa::Neon;
            }
        }
        if cfg!(target_arch = "arm") && has("neon") {
            return Isa::Neon;
        }
        Isa::Generic
    }

    #[test]
    fn a_limit_caps_the_choice() {
        assert_eq!(Kernels::detect(Isa::Generic).isa, Isa::Generic);
        assert!(Kernels::detect(Isa::Avx2).isa <= Isa::Avx2);
        assert!(Kernels::detect(Isa::Neon).isa <= Isa::Neon);
        // A level of another architecture allows only the generic kernels.
        assert!(Isa::Neon.allows(Isa::Generic));
        assert!(!Isa::Neon.allows(Isa::Avx2));
        assert!(!Isa::Avx512Vnni.allows(Isa::NeonDot));
        assert!(Isa::Avx512Vnni.allows(Isa::Avx2));
        assert!(!Isa::Avx2.allows(Isa::Avx512Vnni));
        assert!(Isa::Amx.allows(Isa::Avx512Vnni));
        assert!(!Isa::Avx512Vnni.allows(Isa::Amx));
        assert!(Kernels::detect(Isa::Avx512Vnni).block16_u8i8.is_none());
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
    }

    #[test]
    fn every_level_computes_the_same_dot() {
        let a: Vec<u8> = (0..1000).map(|i| (i * 7 % 256) as u8).collect();
        let b: Vec<i8> = (0..1000).map(|i| (i * 13 % 256) as u8 as i8).collect();
        let want = generic::dot_u8i8(&a, &b);
        let ai: Vec<i8> = a.iter().map(|&v| v as i8).collect();
        let want_i = generic::dot_i8i8(&ai, &b);
        for k in Kernels::all_available() {
            assert_eq!((k.dot_u8i8)(&a, &b), want, "{}", k.isa.name());
            assert_eq!((k.dot_i8i8)(&ai, &b), want_i, "{}", k.isa.name());
        }
    }
}
