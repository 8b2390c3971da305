//! The one macro that declares a SIMD kernel: a safe wrapper around a private
//! `#[target_feature]` function, gated by its CPU predicate, plus proptests
//! proving it equal to the scalar reference on every machine that can run it.

/// Declare a `u8 · i8 -> i32` dot-product kernel.
///
/// `dot_kernel!(pub fn NAME = IMPL, isa = ISA, when = PREDICATE);` generates
/// `NAME(a, b)`, which asserts equal lengths and the CPU predicate (a caller
/// that skipped detection gets a panic, never undefined behaviour), and a
/// `tests` module comparing it with [`crate::generic::dot_u8i8`] exactly.
macro_rules! dot_kernel {
    ($(#[$doc:meta])* pub fn $name:ident = $imp:path, isa = $isa:expr, when = $pred:expr;) => {
        $(#[$doc])*
        pub fn $name(a: &[u8], b: &[i8]) -> i32 {
            assert_eq!(a.len(), b.len(), "dot product of unequal lengths");
            assert!($pred, concat!(stringify!($name), " needs a CPU with ", $isa));
            // SAFETY: the CPU features `$imp` is compiled for were checked just above,
            // and it reads only `a.len()` elements of each slice, which are equal.
            unsafe { $imp(a, b) }
        }

        #[cfg(test)]
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use proptest::prelude::*;

            fn runs() -> bool {
                $pred
            }

            /// Lengths around every block size, and values at the extremes.
            fn operands() -> impl Strategy<Value = (Vec<u8>, Vec<i8>)> {
                (0usize..600).prop_flat_map(|n| {
                    let u = prop_oneof![Just(0u8), Just(255u8), any::<u8>()];
                    let i = prop_oneof![Just(i8::MIN), Just(i8::MAX), Just(0i8), any::<i8>()];
                    (proptest::collection::vec(u, n), proptest::collection::vec(i, n))
                })
            }

            proptest! {
                #[test]
                fn equals_the_reference((a, b) in operands()) {
                    if runs() {
                        prop_assert_eq!(super::$name(&a, &b), crate::generic::dot_u8i8(&a, &b));
                    }
                }
            }

            #[test]
            fn worst_case_does_not_saturate() {
                if runs() {
                    for n in [1, 31, 32, 63, 64, 65, 4096, 4097] {
                        let (a, b) = (vec![255u8; n], vec![i8::MIN; n]);
                        assert_eq!(super::$name(&a, &b), -255 * 128 * n as i32);
                        let b = vec![i8::MAX; n];
                        assert_eq!(super::$name(&a, &b), 255 * 127 * n as i32);
                    }
                }
            }
        }
    };
}
