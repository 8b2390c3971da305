//! Int8 matrix × vector (and small batches of vectors) with the quantization
//! correction fused, producing f32.
//!
//! Weights are packed once at load: per-row symmetric i8 with its scale, rows
//! padded to 64 bytes (one cache line, one AVX-512 register), and each row's
//! sum precomputed so the activation zero point costs one multiply per row:
//!
//! `out[r] = x_scale · w_scale[r] · (Σ x[c]·w[r][c] − x_zp · Σ w[r][c]) + bias[r]`
//!
//! The integer part goes through the dispatched dot kernel (exact on every
//! ISA); the correction is the same scalar code everywhere, so every ISA gives
//! bit-identical results. Output rows can be split over threads with
//! [`gemv_rows`]: the crate has no thread pool of its own.

use std::ops::Range;

use crate::dispatch::Kernels;

const ROW_ALIGN: usize = 64;

/// A weight matrix (`rows × cols`, output-major) packed for the kernels.
#[derive(Debug, Clone)]
pub struct PackedI8 {
    rows: usize,
    cols: usize,
    stride: usize,
    data: Vec<i8>,
    row_sums: Vec<i32>,
    scales: Vec<f32>,
}

impl PackedI8 {
    /// Pack already-quantized rows (`q` is `rows × cols`, row-major) with their scales.
    pub fn from_quantized(q: &[i8], rows: usize, cols: usize, scales: &[f32]) -> PackedI8 {
        assert!(
            cols > 0 && cols <= crate::generic::MAX_DOT_LEN,
            "row length {cols} out of range"
        );
        assert_eq!(q.len(), rows * cols, "weights are not {rows}×{cols}");
        assert_eq!(scales.len(), rows, "one scale per row");
        let stride = cols.div_ceil(ROW_ALIGN) * ROW_ALIGN;
        let mut data = vec![0i8; rows * stride];
        let mut row_sums = Vec::with_capacity(rows);
        for (r, row) in q.chunks(cols).enumerate() {
            data[r * stride..r * stride + cols].copy_from_slice(row);
            row_sums.push(row.iter().map(|&v| v as i32).sum());
        }
        PackedI8 {
            rows,
            cols,
            stride,
            data,
            row_sums,
            scales: scales.to_vec(),
        }
    }

    /// Quantize f32 weights per row (symmetric) and pack them.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> PackedI8 {
        let mut q = vec![0i8; w.len()];
        let mut scales = vec![0f32; rows];
        crate::quant::quantize_rows_i8(w, cols, &mut q, &mut scales);
        PackedI8::from_quantized(&q, rows, cols, &scales)
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input length.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row(&self, r: usize) -> &[i8] {
        &self.data[r * self.stride..r * self.stride + self.cols]
    }
}

/// A quantized activation vector: u8 values with their scale and zero point
/// (as produced by [`crate::quant::dynamic_quantize_u8`]).
#[derive(Debug, Clone, Copy)]
pub struct QVec<'a> {
    /// Quantized values, `cols` long.
    pub q: &'a [u8],
    /// Scale.
    pub scale: f32,
    /// Zero point.
    pub zero_point: u8,
}

/// Output rows `rows` of `w · x (+ bias)` into `out` (`rows.len()` long).
pub fn gemv_rows(
    k: &Kernels,
    w: &PackedI8,
    x: QVec,
    bias: Option<&[f32]>,
    rows: Range<usize>,
    out: &mut [f32],
) {
    assert_eq!(
        x.q.len(),
        w.cols,
        "activation length differs from the weights' columns"
    );
    assert!(rows.end <= w.rows, "row range past the matrix");
    assert_eq!(
        out.len(),
        rows.len(),
        "output length differs from the row range"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), w.rows, "one bias per row");
    }
    let zp = x.zero_point as i32;
    for (o, r) in out.iter_mut().zip(rows) {
        let acc = (k.dot_u8i8)(x.q, w.row(r)) - zp * w.row_sums[r];
        *o = acc as f32 * (x.scale * w.scales[r]) + bias.map_or(0.0, |b| b[r]);
    }
}

/// `out = w · x (+ bias)`, all rows.
pub fn gemv(k: &Kernels, w: &PackedI8, x: QVec, bias: Option<&[f32]>, out: &mut [f32]) {
    gemv_rows(k, w, x, bias, 0..w.rows, out)
}

/// A small batch (the decode shape of continuous batching): `out[i] = w · xs[i] (+ bias)`,
/// `out` being `xs.len() × rows`. Each weight row is read once for the whole batch.
pub fn gemm(k: &Kernels, w: &PackedI8, xs: &[QVec], bias: Option<&[f32]>, out: &mut [f32]) {
    assert_eq!(out.len(), xs.len() * w.rows, "output is not batch × rows");
    for x in xs {
        assert_eq!(
            x.q.len(),
            w.cols,
            "activation length differs from the weights' columns"
        );
    }
    for r in 0..w.rows {
        let row = w.row(r);
        let b = bias.map_or(0.0, |b| b[r]);
        for (i, x) in xs.iter().enumerate() {
            let acc = (k.dot_u8i8)(x.q, row) - x.zero_point as i32 * w.row_sums[r];
            out[i * w.rows + r] = acc as f32 * (x.scale * w.scales[r]) + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Isa;
    use crate::quant::dynamic_quantize_u8;
    use proptest::prelude::*;

    fn isas() -> Vec<Kernels> {
        // Every level this machine runs (duplicates when capped levels coincide are harmless).
        [Isa::Generic, Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .map(Kernels::detect)
            .collect()
    }

    fn case() -> impl Strategy<Value = (usize, usize, Vec<f32>, Vec<f32>, Vec<f32>)> {
        (1usize..20, 1usize..200).prop_flat_map(|(rows, cols)| {
            (
                Just(rows),
                Just(cols),
                proptest::collection::vec(-1f32..1.0, rows * cols),
                proptest::collection::vec(-3f32..3.0, cols),
                proptest::collection::vec(-1f32..1.0, rows),
            )
        })
    }

    proptest! {
        /// Every ISA gives the generic result bit for bit, and the result is the
        /// dequantized product up to quantization error.
        #[test]
        fn gemv_is_isa_independent_and_close_to_float((rows, cols, w, x, bias) in case()) {
            let pw = PackedI8::quantize(&w, rows, cols);
            let mut q = vec![0u8; cols];
            let (scale, zp) = dynamic_quantize_u8(&x, &mut q);
            let qx = QVec { q: &q, scale, zero_point: zp };
            let mut want = vec![0f32; rows];
            gemv(&Kernels::generic(), &pw, qx, Some(&bias), &mut want);
            for k in isas() {
                let mut got = vec![0f32; rows];
                gemv(&k, &pw, qx, Some(&bias), &mut got);
                prop_assert_eq!(&got, &want, "{}", k.isa.name());
            }
            for r in 0..rows {
                let exact: f32 = (0..cols).map(|c| w[r * cols + c] * x[c]).sum::<f32>() + bias[r];
                let tol = cols as f32 * (scale * 1.0 + 3.0 * pw.scales[r]) * 0.5 + 1e-4;
                prop_assert!((want[r] - exact).abs() <= tol, "row {}: {} vs {}", r, want[r], exact);
            }
        }

        /// The batch kernel equals one GEMV per activation row, bit for bit.
        #[test]
        fn gemm_equals_gemv_per_row((rows, cols, w, x, _b) in case(), batch in 1usize..9) {
            let pw = PackedI8::quantize(&w, rows, cols);
            let acts: Vec<(Vec<u8>, f32, u8)> = (0..batch).map(|i| {
                let xi: Vec<f32> = x.iter().map(|v| v * (i as f32 + 1.0) - i as f32 * 0.1).collect();
                let mut q = vec![0u8; cols];
                let (s, z) = dynamic_quantize_u8(&xi, &mut q);
                (q, s, z)
            }).collect();
            let qs: Vec<QVec> = acts.iter().map(|(q, s, z)| QVec { q, scale: *s, zero_point: *z }).collect();
            for k in isas() {
                let mut out = vec![0f32; batch * rows];
                gemm(&k, &pw, &qs, None, &mut out);
                for (i, qx) in qs.iter().enumerate() {
                    let mut one = vec![0f32; rows];
                    gemv(&k, &pw, *qx, None, &mut one);
                    prop_assert_eq!(&out[i * rows..(i + 1) * rows], &one[..]);
                }
            }
        }
    }

    #[test]
    fn rows_split_over_threads_equal_the_whole() {
        let (rows, cols) = (37, 300);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 17 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let pw = PackedI8::quantize(&w, rows, cols);
        let mut q = vec![0u8; cols];
        let (scale, zero_point) = dynamic_quantize_u8(&x, &mut q);
        let qx = QVec {
            q: &q,
            scale,
            zero_point,
        };
        let k = crate::kernels();
        let mut whole = vec![0f32; rows];
        gemv(k, &pw, qx, None, &mut whole);
        let mut split = vec![0f32; rows];
        let (a, b) = split.split_at_mut(20);
        std::thread::scope(|s| {
            s.spawn(|| gemv_rows(k, &pw, qx, None, 0..20, a));
            s.spawn(|| gemv_rows(k, &pw, qx, None, 20..rows, b));
        });
        assert_eq!(split, whole);
    }

    #[test]
    #[should_panic(expected = "activation length differs")]
    fn wrong_activation_length_is_refused() {
        let pw = PackedI8::quantize(&[0.5; 8], 2, 4);
        let q = [1u8; 3];
        gemv(
            &Kernels::generic(),
            &pw,
            QVec {
                q: &q,
                scale: 1.0,
                zero_point: 0,
            },
            None,
            &mut [0.0; 2],
        );
    }
}
