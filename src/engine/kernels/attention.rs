//! Multi-head softmax attention as one op that never holds the score matrix. On CUDA it is
//! our kernel (`attention.cu`, the flash-attention way: an online softmax over tiles of keys,
//! both products on the tensor cores, the softmax statistics in f32). It reads the
//! projections as they come, `(batch, tokens, heads · head_dim)`, and writes the output the
//! same way, so the head-layout copies on either side go too. Elsewhere (the CPU, f32 or
//! bf16, head dims past [`MAX_HEAD_DIM`], a kernel that failed its check) [`attention`]
//! answers `None` and the caller runs its own path.
//!
//! How a block tiles the work ([`Tiling`]) is chosen per head dim to fit the device's shared
//! memory. Heads up to [`MMA_MAX_HEAD_DIM`] wide and a multiple of 8 (every SD head but SD
//! 1.5's 160) run a sibling kernel instead where it has passed its own check and won its
//! start-up race against this one (`attention_mma.cu`: the same algorithm with `mma.sync`,
//! scores, probabilities and output all in registers, as FlashAttention-2 keeps them; K and V
//! by `cp.async` and `ldmatrix`). The tests run both CUDA sources on a CPU emulation of the
//! GPU's blocks (`emulation/`) against [`reference`], so their logic is checked without a
//! GPU.

use candle_core::{D, DType, Device, Result, Tensor};

/// The widest head our kernel takes (every Stable Diffusion UNet's is 40 to 160).
pub const MAX_HEAD_DIM: usize = 256;

/// How far our kernel's output may be from [`reference`]'s, relative to the values
/// (`largest_relative_difference`): the probabilities and the output are rounded to f16 once
/// each (2⁻¹¹ relative), the rest is f32. A wrong mask or index is off by tenths.
pub const TOLERANCE: f32 = 5e-3;

/// The widest head the register kernel (`attention_mma.cu`) takes; wider ones take
/// `attention.cu`.
pub const MMA_MAX_HEAD_DIM: usize = 128;

/// Query rows per block of the register kernel (`16 × WARPS` in `attention_mma.cu`).
#[cfg(any(test, feature = "cuda"))]
pub(super) const MMA_QUERY_ROWS: usize = 64;

/// Threads per block of the register kernel (`THREADS` in `attention_mma.cu`).
#[cfg(any(test, feature = "cuda"))]
pub(super) const MMA_THREADS: usize = 128;

/// The register kernel for `head_dim`: how many steps of 16 its padded head spans (the
/// kernels `attention_mma_f16_k<steps>`), or `None` for a head that is not a multiple of 8
/// (the kernel copies K and V 16 bytes at a time; every SD head is one) or too wide.
pub fn mma_steps(head_dim: usize) -> Option<usize> {
    if head_dim == 0 || !head_dim.is_multiple_of(8) {
        return None;
    }
    [2, 3, 4, 5, 6, 8]
        .into_iter()
        .find(|steps| 16 * steps >= head_dim)
}

/// The rows per WMMA fragment (`FRAGMENT` in `attention.cu`).
const FRAGMENT: usize = 16;

/// How a block of our kernel tiles its work: `16 × warps` query rows, `key_tile` keys at a
/// time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub warps: u32,
    pub key_tile: u32,
}

impl Tiling {
    /// The tilings tried, fastest first; the first whose shared memory fits the device is
    /// used (Hopper takes the first for every head dim; a Turing card with 64 KB per block
    /// takes smaller ones for wide heads).
    pub const CHOICES: [Tiling; 5] = [
        Tiling {
            warps: 4,
            key_tile: 64,
        },
        Tiling {
            warps: 4,
            key_tile: 32,
        },
        Tiling {
            warps: 2,
            key_tile: 32,
        },
        Tiling {
            warps: 1,
            key_tile: 32,
        },
        Tiling {
            warps: 1,
            key_tile: 16,
        },
    ];

    /// The first of [`Self::CHOICES`] whose shared memory fits `max_shared_bytes`.
    pub fn for_head_dim(head_dim: usize, max_shared_bytes: usize) -> Option<Self> {
        Self::CHOICES
            .into_iter()
            .find(|tiling| tiling.shared_bytes(head_dim) <= max_shared_bytes)
    }

    /// Query rows per block.
    pub fn query_rows(self) -> usize {
        FRAGMENT * self.warps as usize
    }

    /// The dynamic shared memory a block needs, laid out as `attention.cu` says: Q, K and V
    /// tiles in f16, scores in f32, probabilities in f16 and the running output in f32, each
    /// row padded.
    pub fn shared_bytes(self, head_dim: usize) -> usize {
        let padded = head_dim.div_ceil(FRAGMENT) * FRAGMENT;
        let rows = self.query_rows();
        let keys = self.key_tile as usize;
        let (half, float) = (2, 4);
        rows * (padded + 8) * half
            + 2 * keys * (padded + 8) * half
            + rows * (keys + 4) * float
            + rows * (keys + 8) * half
            + rows * (padded + 4) * float
    }
}

/// The shape of one attention, as the kernel indexes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub batch: usize,
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
}

impl Geometry {
    /// `None` where the kernel does not apply: shapes other than `(batch, queries, width)`
    /// for the query and `(batch, keys, width)` for key and value, `heads` that do not
    /// divide the width, heads wider than [`MAX_HEAD_DIM`], nothing to attend, mixed dtypes.
    pub fn of(query: &Tensor, key: &Tensor, value: &Tensor, heads: usize) -> Option<Self> {
        let (batch, queries, width) = query.dims3().ok()?;
        let (key_batch, keys, key_width) = key.dims3().ok()?;
        let dtype = query.dtype();
        let fits = heads > 0
            && width.is_multiple_of(heads)
            && width / heads <= MAX_HEAD_DIM
            && batch > 0
            && queries > 0
            && keys > 0
            && (key_batch, key_width) == (batch, width)
            && value.dims() == key.dims()
            && key.dtype() == dtype
            && value.dtype() == dtype;
        fits.then_some(Self {
            batch,
            heads,
            queries,
            keys,
            head_dim: width / heads,
        })
    }
}

/// softmax(Q·Kᵀ · `scale`)·V over `heads` heads, for `query` `(batch, queries, heads ·
/// head_dim)` and `key`, `value` `(batch, keys, heads · head_dim)`, in that same layout; or
/// `None` where our kernel does not run (see the module's doc).
pub fn attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    if !super::enabled() {
        return Ok(None);
    }
    let Some(geometry) = Geometry::of(query, key, value, heads) else {
        return Ok(None);
    };
    match query.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => super::cuda::attention(cuda, query, key, value, geometry, scale),
        _ => {
            let _ = (geometry, scale);
            Ok(None)
        }
    }
}

/// Whether [`attention`] runs our kernel on `device` for `dtype` (for heads up to
/// [`MAX_HEAD_DIM`] wide): what a job's memory estimate needs to know. Loads and checks the
/// kernel on first use.
pub fn runs_on(device: &Device, dtype: DType) -> bool {
    if !super::enabled() || dtype != DType::F16 {
        return false;
    }
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => super::cuda::attention_runs_on(cuda),
        _ => false,
    }
}

/// The same attention composed of candle's ops on the inputs' device and dtype, whole
/// (split heads, scores, softmax, weighted sum, merged heads): the baseline the kernels bench
/// measures ours against.
pub fn composed(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (batch, queries, width) = query.dims3()?;
    let head_dim = width / heads.max(1);
    let split = |tensor: &Tensor| -> Result<Tensor> {
        let tokens = tensor.dim(1)?;
        tensor
            .reshape((batch, tokens, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (query, key, value) = (split(query)?, split(key)?, split(value)?);
    let scores = (query.matmul(&key.transpose(D::Minus2, D::Minus1)?)? * scale)?;
    let weights = candle_nn::ops::softmax_last_dim(&scores)?;
    weights
        .matmul(&value)?
        .transpose(1, 2)?
        .reshape((batch, queries, width))
}

/// [`composed`] in f32 on the CPU: what our kernel is checked against.
pub fn reference(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let on_cpu = |tensor: &Tensor| tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    composed(
        &on_cpu(query)?,
        &on_cpu(key)?,
        &on_cpu(value)?,
        heads,
        scale,
    )
}

/// What our kernel is checked on (on each device before it first runs there, and in the
/// tests on the emulation): shapes that take every path of the kernel: heads narrower than a
/// fragment and not a multiple of 8 (so copied a value at a time), heads not a multiple of a
/// fragment (SD 1.5's 40), the widest SD head (160) and the widest we take, keys
/// that end inside a tile (a text's 77) and span several, query rows that end inside a
/// block, several images and heads, and scores large enough that an exponential without
/// its maximum subtracted would overflow.
#[cfg(any(test, feature = "cuda"))]
pub(super) const CHECK_CASES: [(Geometry, f32); 5] = [
    (geometry(2, 3, 20, 77, 40), 1.0),
    (geometry(1, 2, 40, 70, 64), 4.0),
    (geometry(1, 1, 33, 100, 160), 1.0),
    (geometry(2, 2, 5, 3, 24), 1.0),
    (geometry(1, 1, 17, 40, 256), 2.0),
];

/// What the register kernel is checked on, likewise: every instantiation SD uses (heads of
/// 40, 64 and 80) and the widest (128), a narrow one (12), query rows that span blocks of 64
/// and end inside one, keys that end inside a tile of 64, fill one exactly and span several,
/// and scores that would overflow an exponential without its maximum subtracted.
#[cfg(any(test, feature = "cuda"))]
pub(super) const MMA_CHECK_CASES: [(Geometry, f32); 6] = [
    (geometry(2, 3, 20, 77, 40), 1.0),
    (geometry(1, 2, 100, 150, 64), 4.0),
    (geometry(1, 1, 70, 64, 80), 1.0),
    (geometry(2, 2, 5, 3, 24), 1.0),
    (geometry(1, 1, 17, 40, 128), 2.0),
    (geometry(1, 2, 9, 20, 96), 1.0),
];

#[cfg(any(test, feature = "cuda"))]
const fn geometry(
    batch: usize,
    heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
) -> Geometry {
    Geometry {
        batch,
        heads,
        queries,
        keys,
        head_dim,
    }
}

/// Random f16 inputs (query, key, value) for `geometry`, the queries scaled by `spread`.
#[cfg(any(test, feature = "cuda"))]
pub(super) fn inputs(geometry: Geometry, spread: f32) -> Result<[Tensor; 3]> {
    let Geometry {
        batch,
        heads,
        queries,
        keys,
        head_dim,
    } = geometry;
    let width = heads * head_dim;
    let random = |tokens: usize, spread: f32| {
        Tensor::randn(0f32, spread, (batch, tokens, width), &Device::Cpu)?.to_dtype(DType::F16)
    };
    Ok([
        random(queries, spread)?,
        random(keys, 1.0)?,
        random(keys, 1.0)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::emulation;
    use crate::engine::kernels::largest_relative_difference;

    #[test]
    fn the_cuda_source_agrees_with_the_reference_on_an_emulated_gpu() {
        let Some(runner) = emulation::Runner::build("attention_runner.cpp") else {
            return;
        };
        for (geometry, spread) in CHECK_CASES {
            let [query, key, value] = inputs(geometry, spread).unwrap();
            let scale = (geometry.head_dim as f64).powf(-0.5);
            let expected = reference(&query, &key, &value, geometry.heads, scale).unwrap();
            // Every tiling as the host launches it (16-byte copies where the head dim allows),
            // and the value-at-a-time copies once more with the first.
            let vectors = geometry.head_dim.is_multiple_of(8);
            let runs = Tiling::CHOICES
                .into_iter()
                .map(|tiling| (tiling, vectors))
                .chain(vectors.then_some((Tiling::CHOICES[0], false)));
            for (tiling, vectors) in runs {
                let args = [
                    geometry.batch,
                    geometry.heads,
                    geometry.queries,
                    geometry.keys,
                    geometry.head_dim,
                    tiling.warps as usize,
                    tiling.key_tile as usize,
                    tiling.shared_bytes(geometry.head_dim),
                    usize::from(vectors),
                ];
                let difference = emulated(&runner, &args, scale, [&query, &key, &value], &expected);
                assert!(
                    difference <= TOLERANCE,
                    "{geometry:?} with {tiling:?}, vectors {vectors}: {difference} from the \
                     reference"
                );
            }
        }
    }

    /// How far `runner`'s output, run with `args` and the scale (in base 2) on these inputs,
    /// is from `expected`.
    fn emulated(
        runner: &emulation::Runner,
        args: &[usize],
        scale: f64,
        inputs: [&Tensor; 3],
        expected: &Tensor,
    ) -> f32 {
        let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
        let args: Vec<String> = args
            .iter()
            .map(usize::to_string)
            .chain([scale_log2.to_string()])
            .collect();
        let got = runner
            .run(
                args.iter().map(String::as_str),
                &inputs,
                DType::F16,
                inputs[0].shape(),
            )
            .unwrap();
        largest_relative_difference(&got, expected).unwrap()
    }

    #[test]
    fn the_register_kernel_agrees_with_the_reference_on_an_emulated_gpu() {
        let Some(runner) = emulation::Runner::build("attention_mma_runner.cpp") else {
            return;
        };
        for (geometry, spread) in MMA_CHECK_CASES {
            let [query, key, value] = inputs(geometry, spread).unwrap();
            let scale = (geometry.head_dim as f64).powf(-0.5);
            let expected = reference(&query, &key, &value, geometry.heads, scale).unwrap();
            let steps = mma_steps(geometry.head_dim).expect("a head the register kernel takes");
            let args = [
                geometry.batch,
                geometry.heads,
                geometry.queries,
                geometry.keys,
                geometry.head_dim,
                steps,
                MMA_QUERY_ROWS,
                MMA_THREADS,
            ];
            let difference = emulated(&runner, &args, scale, [&query, &key, &value], &expected);
            assert!(
                difference <= TOLERANCE,
                "{geometry:?} in {steps} steps: {difference} from the reference"
            );
        }
    }

    #[test]
    fn the_register_kernel_takes_the_heads_it_has_instantiations_for() {
        assert_eq!(mma_steps(40), Some(3));
        assert_eq!(mma_steps(64), Some(4));
        assert_eq!(mma_steps(80), Some(5));
        assert_eq!(mma_steps(96), Some(6));
        assert_eq!(mma_steps(112), Some(8));
        assert_eq!(mma_steps(MMA_MAX_HEAD_DIM), Some(8));
        assert_eq!(mma_steps(8), Some(2));
        assert_eq!(mma_steps(24), Some(2));
        // Heads that are not a multiple of 8 (K and V are copied 16 bytes at a time), and
        // wider ones, take `attention.cu`.
        assert_eq!(mma_steps(39), None);
        assert_eq!(mma_steps(12), None);
        assert_eq!(mma_steps(2), None);
        assert_eq!(mma_steps(160), None);
        assert_eq!(mma_steps(0), None);
        let runs = MMA_CHECK_CASES.map(|(geometry, _)| mma_steps(geometry.head_dim));
        assert!(runs.iter().all(Option::is_some));
    }

    #[test]
    fn the_tilings_fit_the_cards_they_are_for() {
        // Hopper (227 KB a block): the fastest tiling for every SD head.
        for head_dim in [40, 64, 80, 160] {
            assert_eq!(
                Tiling::for_head_dim(head_dim, 232_448),
                Some(Tiling::CHOICES[0])
            );
        }
        // Turing (64 KB): something for every head we take, within the limit.
        for head_dim in [8, 40, 64, 80, 160, MAX_HEAD_DIM] {
            let tiling = Tiling::for_head_dim(head_dim, 65_536).unwrap();
            assert!(
                tiling.shared_bytes(head_dim) <= 65_536,
                "{head_dim}: {tiling:?}"
            );
        }
        // The layout as attention.cu lays it out: SD 1.5's 40-wide heads pad to 48.
        let tiling = Tiling::CHOICES[0];
        assert_eq!(
            tiling.shared_bytes(40),
            64 * 56 * 2 + 2 * 64 * 56 * 2 + 64 * 68 * 4 + 64 * 72 * 2 + 64 * 52 * 4
        );
        assert_eq!(Tiling::for_head_dim(512, 65_536), None);
    }

    #[test]
    fn the_kernel_takes_only_what_it_can_index() {
        let cpu = Device::Cpu;
        let zeros = |dims: &[usize], dtype| Tensor::zeros(dims, dtype, &cpu).unwrap();
        let query = zeros(&[2, 10, 320], DType::F16);
        let text = zeros(&[2, 77, 320], DType::F16);
        assert_eq!(
            Geometry::of(&query, &text, &text, 8),
            Some(geometry(2, 8, 10, 77, 40))
        );
        // Heads that do not divide the width, or wider than the kernel takes.
        assert_eq!(Geometry::of(&query, &text, &text, 3), None);
        let wide = zeros(&[1, 10, 512], DType::F16);
        assert_eq!(Geometry::of(&wide, &wide, &wide, 1), None);
        // Another batch, width or dtype on the keys; no keys at all.
        assert_eq!(
            Geometry::of(&query, &zeros(&[1, 77, 320], DType::F16), &text, 8),
            None
        );
        assert_eq!(
            Geometry::of(&query, &text, &zeros(&[2, 77, 320], DType::F32), 8),
            None
        );
        let no_keys = zeros(&[2, 0, 320], DType::F16);
        assert_eq!(Geometry::of(&query, &no_keys, &no_keys, 8), None);
        // On the CPU the caller's own path runs.
        assert!(attention(&query, &text, &text, 8, 0.1).unwrap().is_none());
        assert!(!runs_on(&cpu, DType::F16));
    }
}
