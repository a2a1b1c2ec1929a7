//! The column matrix of a 3×3 convolution (stride 1, padded by one cell) in the layout that
//! makes the convolution one GEMM straight into the image layout: for output rows
//! `top..top + rows` of `xs` `(batch, c_in, h, w)`, columns `(batch, c_in · 9, rows · w)`,
//! row `channel · 9 + ky · 3 + kx` holding the input under tap `(ky, kx)` of every output
//! cell, zero beyond the image's edges. The weights `(c_out, c_in, 3, 3)` read as a
//! `(c_out, c_in · 9)` matrix then give `(batch, c_out, rows · w)` = weights · columns.
//!
//! candle's CUDA convolution writes the transposed matrix (64-bit index arithmetic per value,
//! reads strided across channel planes) and then copies its GEMM's output into the image
//! layout, a full extra pass. On CUDA [`columns_3x3`] is our kernel (`im2col.cu`), one pass
//! that reads each plane along its rows and writes each column row contiguously; elsewhere it
//! answers `None` and the caller runs candle's convolution. [`composed`] builds the same
//! matrix from candle's ops: the reference the kernel is checked against.
//!
//! An upsampler's convolution reads its input as the ×2 nearest-neighbour upsampling
//! ([`Source::Doubled`]): the kernel reads each input pixel for the four output pixels it
//! stands for, so the upsampled image (four times the input: 1 GB for the SDXL decoder's
//! last upsampler in f32) is never held.

use candle_core::{DType, Device, Result, Tensor};

/// Threads per block of the CUDA kernel (`THREADS` in `im2col.cu`).
#[cfg(any(test, feature = "cuda"))]
pub(super) const THREADS: usize = 256;

/// The grid for `planes` (batch · channels) planes and a band of `cells` output cells: x
/// over the cells, a block of [`THREADS`] each; y over the planes.
#[cfg(any(test, feature = "cuda"))]
pub(super) fn grid(planes: usize, cells: usize) -> (usize, usize) {
    (cells.div_ceil(THREADS).max(1), planes)
}

/// The most planes the grid's second dimension holds.
#[cfg(feature = "cuda")]
pub(super) const MAX_PLANES: usize = 65_535;

/// What the convolution reads: the image as it is, or its ×2 nearest-neighbour upsampling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    AsIs,
    Doubled,
}

impl Source {
    /// The kernel's `shift`: output pixel `(y, x)` reads input `(y >> shift, x >> shift)`.
    pub fn shift(self) -> usize {
        match self {
            Source::AsIs => 0,
            Source::Doubled => 1,
        }
    }

    /// The image the convolution sees, for `xs`: `(height, width)`.
    pub fn size(self, xs: &Tensor) -> Result<(usize, usize)> {
        let (_, _, height, width) = xs.dims4()?;
        Ok((height << self.shift(), width << self.shift()))
    }

    /// The image the convolution sees, made (candle's nearest-neighbour upsampling where
    /// doubled).
    pub fn materialise(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Source::AsIs => Ok(xs.clone()),
            Source::Doubled => {
                let (height, width) = self.size(xs)?;
                xs.upsample_nearest2d(height, width)
            }
        }
    }
}

/// Whether [`columns_3x3`] runs our kernel for `xs` (CUDA, f16 or f32, checked there): a
/// caller that must otherwise make the doubled image asks first. Loads and checks the kernel
/// on first use.
pub fn runs_for(xs: &Tensor) -> bool {
    if !super::enabled() || !matches!(xs.dtype(), DType::F16 | DType::F32) {
        return false;
    }
    match xs.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => super::cuda::im2col_runs_on(cuda),
        _ => false,
    }
}

/// The columns of output rows `top..top + rows` of `xs` `(batch, c_in, h, w)` as `source`
/// says it is read, or `None` where our kernel does not run (not CUDA, not f16 or f32, not
/// checked on this device, or a shape beyond its grid).
pub fn columns_3x3(xs: &Tensor, source: Source, top: usize, rows: usize) -> Result<Option<Tensor>> {
    if !super::enabled() {
        return Ok(None);
    }
    let (height, _) = source.size(xs)?;
    if rows == 0 || top + rows > height || xs.elem_count() == 0 {
        return Ok(None);
    }
    match xs.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => super::cuda::columns_3x3(cuda, xs, source, top, rows),
        _ => Ok(None),
    }
}

/// The same matrix from candle's ops: the image `source` says (upsampled where doubled),
/// padded by one cell, and for each of the nine taps the band's window shifted by it,
/// stacked per channel.
pub fn composed(xs: &Tensor, source: Source, top: usize, rows: usize) -> Result<Tensor> {
    let xs = source.materialise(xs)?;
    let (batch, channels, _, width) = xs.dims4()?;
    let padded = xs.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mut taps = Vec::with_capacity(9);
    for ky in 0..3 {
        for kx in 0..3 {
            // Padded row `top + ky` is image row `top + ky − 1`: the row above for ky = 0.
            taps.push(padded.narrow(2, top + ky, rows)?.narrow(3, kx, width)?);
        }
    }
    Tensor::stack(&taps, 2)?.reshape((batch, channels * 9, rows * width))
}

/// [`composed`] in f32 on the CPU: what our kernel is checked against.
pub fn reference(xs: &Tensor, source: Source, top: usize, rows: usize) -> Result<Tensor> {
    composed(
        &xs.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
        source,
        top,
        rows,
    )
}

/// What our kernel is checked on (on each device before it first runs there, and in the
/// tests on the emulation): `(dims, source, top, rows, dtype)`: whole images and bands at the
/// top, inside and at the bottom, one-row and one-column images, widths that do not fill a
/// block and ones that cross blocks; doubled, whole and in bands that start and end on odd
/// rows.
#[cfg(any(test, feature = "cuda"))]
pub(super) const CHECK_CASES: [([usize; 4], Source, usize, usize, DType); 9] = [
    ([2, 3, 5, 7], Source::AsIs, 0, 5, DType::F16),
    ([1, 4, 9, 6], Source::AsIs, 0, 3, DType::F32),
    ([2, 2, 9, 6], Source::AsIs, 3, 4, DType::F16),
    ([1, 3, 9, 6], Source::AsIs, 6, 3, DType::F32),
    ([1, 2, 1, 1], Source::AsIs, 0, 1, DType::F16),
    ([2, 2, 12, 40], Source::AsIs, 1, 10, DType::F16),
    ([1, 3, 4, 5], Source::Doubled, 0, 8, DType::F16),
    ([2, 2, 5, 3], Source::Doubled, 3, 5, DType::F32),
    ([1, 1, 1, 1], Source::Doubled, 1, 1, DType::F16),
];

/// A random image of `dims` in `dtype`, on the CPU.
#[cfg(any(test, feature = "cuda"))]
pub(super) fn random_image(dims: [usize; 4], dtype: DType) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, dims.to_vec(), &Device::Cpu)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::emulation;
    use crate::engine::kernels::largest_relative_difference;

    #[test]
    fn the_cuda_source_agrees_with_the_reference_on_an_emulated_gpu() {
        let Some(runner) = emulation::Runner::build("im2col_runner.cpp") else {
            return;
        };
        for (dims, source, top, rows, dtype) in CHECK_CASES {
            let xs = random_image(dims, dtype).unwrap();
            let expected = reference(&xs, source, top, rows).unwrap();
            let [batch, channels, height, width] = dims;
            let (blocks, planes) = grid(batch * channels, rows * (width << source.shift()));
            let args = [
                if dtype == DType::F16 { "f16" } else { "f32" }.to_owned(),
                planes.to_string(),
                height.to_string(),
                width.to_string(),
                source.shift().to_string(),
                top.to_string(),
                rows.to_string(),
                blocks.to_string(),
            ];
            let got = runner
                .run(
                    args.iter().map(String::as_str),
                    &[&xs],
                    dtype,
                    expected.shape(),
                )
                .unwrap();
            // A copy: every value exactly (a NaN, unwritten, fails too).
            let difference = largest_relative_difference(&got, &expected).unwrap();
            assert!(
                difference == 0.0,
                "{dims:?} {source:?} rows {top}..{}: {difference} from the reference",
                top + rows
            );
        }
    }

    #[test]
    fn the_composition_holds_each_taps_neighbour_and_zero_beyond_the_edges() {
        // One channel, 3 × 2, values 1..6; the band of output row 1 only.
        let xs = Tensor::arange(1f32, 7.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 2))
            .unwrap();
        let columns = composed(&xs, Source::AsIs, 1, 1).unwrap();
        assert_eq!(columns.dims3().unwrap(), (1, 9, 2));
        // Image rows [1 2] [3 4] [5 6]; output row 1's cells (1, 0) and (1, 1).
        let expected = [
            [0.0, 1.0], // (ky 0, kx 0): up-left
            [1.0, 2.0], // up
            [2.0, 0.0], // up-right
            [0.0, 3.0], // left
            [3.0, 4.0], // centre
            [4.0, 0.0], // right
            [0.0, 5.0], // down-left
            [5.0, 6.0], // down
            [6.0, 0.0], // down-right
        ];
        let got = columns.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, expected.map(|row| row.to_vec()).to_vec());
        // On the CPU the caller convolves with candle; bands beyond the image are never ours.
        assert!(columns_3x3(&xs, Source::AsIs, 0, 3).unwrap().is_none());
        assert!(!runs_for(&xs));
        assert!(columns_3x3(&xs, Source::AsIs, 2, 2).unwrap().is_none());
    }

    #[test]
    fn doubled_columns_read_each_input_pixel_for_its_four() {
        // 1 × 2 input [1 2] doubled is [1 1 2 2] twice; output row 0's centre taps.
        let xs = Tensor::new(&[[[[1f32, 2.0]]]], &Device::Cpu).unwrap();
        assert_eq!(Source::Doubled.size(&xs).unwrap(), (2, 4));
        let columns = composed(&xs, Source::Doubled, 0, 2).unwrap();
        assert_eq!(columns.dims3().unwrap(), (1, 9, 8));
        let centre = columns.squeeze(0).unwrap().get(4).unwrap();
        let expected = [1f32, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0];
        assert_eq!(centre.to_vec1::<f32>().unwrap(), expected);
        // The band may reach the doubled image's last row, not past it.
        assert!(columns_3x3(&xs, Source::Doubled, 1, 2).unwrap().is_none());
    }
}
