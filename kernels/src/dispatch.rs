//! The kernel table, built once per process.

use std::sync::OnceLock;

use crate::generic;

/// Instruction-set levels Ember has kernels for, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Scalar Rust: every CPU.
    Generic,
    /// x86_64 AVX2 + FMA (Haswell and later, Zen).
    Avx2,
    /// x86_64 AVX-512 with VNNI (`vpdpbusd`): Ice Lake, Zen 4 and later.
    Avx512Vnni,
}

impl Isa {
    /// Name as accepted by `EMBER_CPU`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    /// Parse an `EMBER_CPU` value.
    pub fn parse(s: &str) -> Option<Isa> {
        [Isa::Generic, Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .find(|i| i.name() == s)
    }
}

/// Function pointers to the best kernels for this CPU.
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    /// The most capable instruction set in use.
    pub isa: Isa,
    /// `Σ a[i]·b[i]` over u8 activations and i8 weights, exact in i32.
    pub dot_u8i8: fn(&[u8], &[i8]) -> i32,
}

impl Kernels {
    /// The scalar reference table.
    pub fn generic() -> Kernels {
        Kernels {
            isa: Isa::Generic,
            dot_u8i8: generic::dot_u8i8,
        }
    }

    /// The best table for this CPU, using nothing above `limit`.
    pub fn detect(limit: Isa) -> Kernels {
        #[allow(unused_mut)]
        let mut k = Kernels::generic();
        #[cfg(target_arch = "x86_64")]
        crate::x86_64::plug(&mut k, limit);
        let _ = limit;
        k
    }
}

/// The process-wide table: the best this CPU runs, capped by `EMBER_CPU`
/// (`generic`, `avx2`, `avx512vnni`) when set. An unknown `EMBER_CPU` value
/// falls back to full detection; [`Kernels::isa`] tells what was chosen.
pub fn kernels() -> &'static Kernels {
    static TABLE: OnceLock<Kernels> = OnceLock::new();
    TABLE.get_or_init(|| {
        let limit = std::env::var("EMBER_CPU")
            .ok()
            .and_then(|v| Isa::parse(&v))
            .unwrap_or(Isa::Avx512Vnni);
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
        let got = Kernels::detect(Isa::Avx512Vnni).isa;
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
        let flags: Vec<&str> = info
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let has = |f: &str| flags.contains(&f);
        if cfg!(target_arch = "x86_64") && has("avx512f") && has("avx512bw") && has("avx512_vnni") {
            Isa::Avx512Vnni
        } else if cfg!(target_arch = "x86_64") && has("avx2") && has("fma") {
            Isa::Avx2
        } else {
            Isa::Generic
        }
    }

    #[test]
    fn a_limit_caps_the_choice() {
        assert_eq!(Kernels::detect(Isa::Generic).isa, Isa::Generic);
        assert!(Kernels::detect(Isa::Avx2).isa <= Isa::Avx2);
    }

    #[test]
    fn every_level_computes_the_same_dot() {
        let a: Vec<u8> = (0..1000).map(|i| (i * 7 % 256) as u8).collect();
        let b: Vec<i8> = (0..1000).map(|i| (i * 13 % 256) as u8 as i8).collect();
        let want = generic::dot_u8i8(&a, &b);
        for isa in [Isa::Generic, Isa::Avx2, Isa::Avx512Vnni] {
            assert_eq!(
                (Kernels::detect(isa).dot_u8i8)(&a, &b),
                want,
                "{}",
                isa.name()
            );
        }
    }
}
