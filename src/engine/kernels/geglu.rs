//! GEGLU, the UNet feed-forward's gate, as one op with the projection's bias: for each row
//! `[a | b]` of the projection's GEMM (without its bias), `(a + bias_a) · gelu(b + bias_b)`
//! with the exact (erf) GELU, in f32, rounded once. On CUDA it is our kernel (`geglu.cu`),
//! one pass over the projection. candle's composition adds the bias over the whole
//! projection, reads a strided half for the GELU, writes a temporary, then reads both again
//! for the product: 0.39 ms a call at SDXL's 4096 tokens on an H200 without the bias, a tenth
//! of the run (`benches/README.md`). Elsewhere [`geglu`] answers `None` and the caller
//! composes it ([`composed`]).

use candle_core::{D, DType, Device, Result, Tensor};

/// Threads per block of the CUDA kernel (`THREADS` in `geglu.cu`).
#[cfg(any(test, feature = "cuda"))]
pub(super) const THREADS: usize = 256;

/// Blocks for `elements` output values: about four per thread (the kernel strides over the
/// rest), within the grid's first dimension.
#[cfg(any(test, feature = "cuda"))]
pub(super) fn blocks(elements: usize) -> usize {
    elements.div_ceil(THREADS * 4).clamp(1, i32::MAX as usize)
}

/// `(a + bias_a) · gelu(b + bias_b)` for each row `[a | b]` of `projected` (its last
/// dimension, even; `bias` as wide), or `None` where our kernel does not run (not CUDA, not
/// f16 or f32, not checked on this device).
pub fn geglu(projected: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    if !super::enabled() {
        return Ok(None);
    }
    let Some(&width) = projected.dims().last() else {
        return Ok(None);
    };
    if width == 0
        || !width.is_multiple_of(2)
        || projected.elem_count() == 0
        || bias.dims() != [width]
        || bias.dtype() != projected.dtype()
    {
        return Ok(None);
    }
    match projected.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => super::cuda::geglu(cuda, projected, bias),
        _ => Ok(None),
    }
}

/// The same from candle's ops: the bias added, the halves, `gelu_erf` of the second, times the
/// first. The caller's path where ours does not run, and the baseline the kernels bench
/// measures.
pub fn composed(projected: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let halves = projected.broadcast_add(bias)?.chunk(2, D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

/// [`composed`] in f32 on the CPU: what our kernel is checked against.
pub fn reference(projected: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let on_cpu = |tensor: &Tensor| tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    composed(&on_cpu(projected)?, &on_cpu(bias)?)
}

/// What our kernel is checked on (on each device before it first runs there, and in the
/// tests on the emulation): both dtypes, rows narrower than a block and wider, enough values
/// for many blocks; inputs wide enough to reach GELU's tails.
#[cfg(any(test, feature = "cuda"))]
pub(super) const CHECK_CASES: [(&[usize], DType); 4] = [
    (&[2, 7, 80], DType::F16),
    (&[3, 2560], DType::F32),
    (&[1, 33, 40], DType::F16),
    (&[2, 64, 1280], DType::F16),
];

/// How far our kernel may be from [`reference`], relative to the values: it rounds once
/// from f32 (f16: 2⁻¹¹), and its `erff` may differ from the CPU's in the last bit.
#[cfg(any(test, feature = "cuda"))]
pub(super) fn tolerance(dtype: DType) -> f32 {
    if dtype == DType::F16 { 4e-3 } else { 1e-5 }
}

/// A random projection of `dims` in `dtype` and a bias for it, on the CPU.
#[cfg(any(test, feature = "cuda"))]
pub(super) fn random_projection(dims: &[usize], dtype: DType) -> Result<(Tensor, Tensor)> {
    let width = dims.last().copied().unwrap_or(0);
    Ok((
        Tensor::randn(0f32, 2.0, dims, &Device::Cpu)?.to_dtype(dtype)?,
        Tensor::randn(0f32, 0.5, width, &Device::Cpu)?.to_dtype(dtype)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::emulation;
    use crate::engine::kernels::largest_relative_difference;

    #[test]
    fn the_cuda_source_agrees_with_the_reference_on_an_emulated_gpu() {
        let Some(runner) = emulation::Runner::build("geglu_runner.cpp") else {
            return;
        };
        for (dims, dtype) in CHECK_CASES {
            let (projected, bias) = random_projection(dims, dtype).unwrap();
            let expected = reference(&projected, &bias).unwrap();
            let inner = dims[dims.len() - 1] / 2;
            let rows = projected.elem_count() / (2 * inner);
            let args = [
                if dtype == DType::F16 { "f16" } else { "f32" }.to_owned(),
                rows.to_string(),
                inner.to_string(),
                blocks(rows * inner).to_string(),
            ];
            let got = runner
                .run(
                    args.iter().map(String::as_str),
                    &[&projected, &bias],
                    dtype,
                    expected.shape(),
                )
                .unwrap();
            let difference = largest_relative_difference(&got, &expected).unwrap();
            assert!(
                difference <= tolerance(dtype),
                "{dims:?} {dtype:?}: {difference} from the reference"
            );
        }
    }

    #[test]
    fn the_composition_is_the_feed_forwards_gate() {
        // [a | b] + bias → (a + bias_a) · gelu(b + bias_b), row by row.
        let projected = Tensor::new(
            &[[0.5f32, 2.0, 0.0, 1.5], [-3.5, 0.5, 2.0, -0.5]],
            &Device::Cpu,
        )
        .unwrap();
        let bias = Tensor::new(&[0.5f32, 0.0, 0.0, -0.5], &Device::Cpu).unwrap();
        let gelu = |x: f64| 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2));
        let expected = [
            [1.0 * gelu(0.0), 2.0 * gelu(1.0)],
            [-3.0 * gelu(2.0), 0.5 * gelu(-1.0)],
        ];
        let got = composed(&projected, &bias)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (got, expected) in got.iter().flatten().zip(expected.iter().flatten()) {
            assert!(
                (f64::from(*got) - expected).abs() < 1e-6,
                "{got} vs {expected}"
            );
        }
        // On the CPU the caller composes it; odd widths are never ours.
        assert!(geglu(&projected, &bias).unwrap().is_none());
        let odd = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let odd_bias = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        assert!(geglu(&odd, &odd_bias).unwrap().is_none());
    }

    /// erf by its Maclaurin series: exact to f64 rounding for the test's |x| ≤ 1.5.
    fn erf(x: f64) -> f64 {
        let (mut sum, mut term, mut n) = (0.0, x, 0.0);
        while term.abs() > 1e-17 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
