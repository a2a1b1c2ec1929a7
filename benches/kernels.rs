//! Our kernels against candle's composition of the same layer, on the shapes real jobs run:
//! the group norms (+ SiLU) of SD 1.5 and SDXL UNets (guided, batch 2) and of the VAE
//! decoder, in the dtype each runs in; and the UNets' attention (self and cross, guided, f16;
//! candle's being scores, softmax and weighted sum, whole); GEGLU, the feed-forward's
//! gate with its projection's bias (candle: the bias added, gelu on a strided half, then a
//! strided product); and the 3×3 convolutions
//! of the UNets and VAEs with their bias, and the upsamplers' (candle: the upsampled image, its
//! im2col, GEMM and transposed copy; ours: our columns, read doubled from the small image
//! where upsampling, and one GEMM into the image layout, as `Conv3x3` runs them), also after
//! a group norm + SiLU (the normalised image made, against its columns written normalised);
//! our implicit-GEMM convolution against the column path (f16, f32 in TF32), and with K split to fill the
//! card against K whole (the UNets' deep levels make few tiles); and the per-cell
//! maps (1×1 convolutions, the transformers' projections) as the engine ran them with candle
//! (convolution or linear layer plus the copy between cells and tokens) against `Pointwise`
//! (one GEMM reading the layouts as they stand), on the CPU too; and the transformers' linear
//! layers (cuBLAS through candle, no rival here: `benches/gpu/bench.py` times torch's on the
//! same shapes from these rows). Group norm on the CPU always;
//! with `--features cuda` both on GPU 0 as well (f16 UNets, f32 VAE, as the engine runs
//! them), where it is the speed check of `benches/gpu/run.sh`.
//!
//! Prints one row per shape: candle's median time, ours, the ratio (ours / candle: below 1
//! is faster), and the largest difference from candle relative to the value. A difference
//! beyond rounding fails the run.
//!
//!     cargo bench --bench kernels                       # CPU, smaller shapes
//!     STUDIO_BENCH_RUNS=20 cargo bench --bench kernels

// Tool code: an unwrap that fails is the bench failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use studio_worker::engine::kernels::conv3x3::Splits;
use studio_worker::engine::kernels::im2col::Source;
use studio_worker::engine::kernels::{self, Activation};
use studio_worker::engine::sd::conv::{Conv3x3, ConvPlan, Part};
use studio_worker::engine::sd::norm::GroupNorm;
use studio_worker::engine::sd::pointwise::Pointwise;

struct Case {
    what: &'static str,
    dims: [usize; 4],
    dtype: DType,
}

const fn case(what: &'static str, dims: [usize; 4], dtype: DType) -> Case {
    Case { what, dims, dtype }
}

impl Case {
    /// The model part of a convolution case (its name says UNet, or it is a VAE decoder's),
    /// whose race verdict our kernel runs by.
    fn part(&self) -> Part {
        if self.what.contains("UNet") {
            Part::Unet
        } else {
            Part::Decoder
        }
    }
}

/// What a GPU runs: f16 UNets, the VAE in f32 (SDXL's must upcast; SD 1.5's shapes at 512²).
fn gpu_cases() -> Vec<Case> {
    vec![
        case("SD 1.5 UNet 512², level 1", [2, 320, 64, 64], DType::F16),
        case("SD 1.5 UNet 512², level 2", [2, 640, 32, 32], DType::F16),
        case("SD 1.5 UNet 512², level 3", [2, 1280, 16, 16], DType::F16),
        case("SD 1.5 UNet 512², level 4", [2, 1280, 8, 8], DType::F16),
        case("SDXL UNet 1024², level 1", [2, 320, 128, 128], DType::F16),
        case("SDXL UNet 1024², level 2", [2, 640, 64, 64], DType::F16),
        case("SDXL UNet 1024², level 3", [2, 1280, 32, 32], DType::F16),
        case("VAE 512², 512 ch at 64²", [1, 512, 64, 64], DType::F32),
        case("VAE 512², 512 ch at 256²", [1, 512, 256, 256], DType::F32),
        case("VAE 512², 128 ch at 512²", [1, 128, 512, 512], DType::F32),
        case(
            "VAE 1024², 256 ch at 1024²",
            [1, 256, 1024, 1024],
            DType::F32,
        ),
        case("VAE 1024² in f16, 256 ch", [1, 256, 1024, 1024], DType::F16),
    ]
}

/// The CPU runs f32 and is slow: SD 1.5 at 512² only.
fn cpu_cases() -> Vec<Case> {
    vec![
        case("SD 1.5 UNet 512², level 1", [2, 320, 64, 64], DType::F32),
        case("SD 1.5 UNet 512², level 3", [2, 1280, 16, 16], DType::F32),
        case("VAE 512², 512 ch at 128²", [1, 512, 128, 128], DType::F32),
        case("VAE 512², 128 ch at 512²", [1, 128, 512, 512], DType::F32),
    ]
}

/// An attention of the UNets, guided (batch 2): `queries` tokens attending to `keys` (the
/// same for self-attention; the text's 77 for cross-attention), `width` channels in `heads`.
struct AttentionCase {
    what: &'static str,
    queries: usize,
    keys: usize,
    width: usize,
    heads: usize,
}

const fn attention_case(
    what: &'static str,
    queries: usize,
    keys: usize,
    width: usize,
    heads: usize,
) -> AttentionCase {
    AttentionCase {
        what,
        queries,
        keys,
        width,
        heads,
    }
}

/// SD 1.5 at 512² (8 heads, 40 to 160 wide) and SDXL at 1024² (64-wide heads).
const ATTENTION_CASES: [AttentionCase; 7] = [
    attention_case("SD 1.5 512², level 1 self", 4096, 4096, 320, 8),
    attention_case("SD 1.5 512², level 1 cross", 4096, 77, 320, 8),
    attention_case("SD 1.5 512², level 2 self", 1024, 1024, 640, 8),
    attention_case("SD 1.5 512², level 3 self", 256, 256, 1280, 8),
    attention_case("SDXL 1024², level 2 self", 4096, 4096, 640, 10),
    attention_case("SDXL 1024², level 2 cross", 4096, 77, 640, 10),
    attention_case("SDXL 1024², level 3 self", 1024, 1024, 1280, 20),
];

fn median_ms(runs: usize, device: &Device, mut function: impl FnMut() -> Tensor) -> f64 {
    drop(function());
    device.synchronize().unwrap();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            let out = function();
            device.synchronize().unwrap();
            let elapsed = started.elapsed().as_secs_f64() * 1e3;
            drop(out);
            elapsed
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Checks `ours` against `candle` (beyond `allowed`, relative, the row says TOO FAR and the
/// run fails), times both, and prints the table row for `shape`. Says whether they agreed.
fn compare(
    shape: &str,
    device: &Device,
    runs: usize,
    allowed: f32,
    candle: &dyn Fn() -> Tensor,
    ours: &dyn Fn() -> Tensor,
) -> bool {
    let difference = kernels::largest_relative_difference(&ours(), &candle()).unwrap();
    let candle_ms = median_ms(runs, device, candle);
    let ours_ms = median_ms(runs, device, ours);
    let agreed = difference <= allowed;
    println!(
        "| {shape} | {candle_ms:.3} | {ours_ms:.3} | {:.2} | {difference:.1e}{} |",
        ours_ms / candle_ms,
        if agreed { "" } else { " TOO FAR" },
    );
    agreed
}

fn run_on(device: &Device, label: &str, cases: &[Case], runs: usize) -> bool {
    println!("\n{label}: group norm + SiLU, 32 groups, median of {runs}");
    println!("| shape | dtype | candle ms | ours ms | ours / candle | max |Δ| / (1 + |y|) |");
    println!("|---|---|---|---|---|---|");
    let mut agreed = true;
    for case in cases {
        let [_, channels, _, _] = case.dims;
        let xs = (Tensor::randn(0f32, 2.0, &case.dims[..], device).unwrap() + 1.0)
            .unwrap()
            .to_dtype(case.dtype)
            .unwrap();
        let weight = Tensor::randn(1f32, 0.5, channels, device)
            .unwrap()
            .to_dtype(case.dtype)
            .unwrap();
        let bias = Tensor::randn(0f32, 0.5, channels, device)
            .unwrap()
            .to_dtype(case.dtype)
            .unwrap();
        let candle = || {
            kernels::group_norm_composed(&xs, &weight, &bias, 32, 1e-5, Activation::Silu).unwrap()
        };
        let ours = || kernels::group_norm(&xs, &weight, &bias, 32, 1e-5, Activation::Silu).unwrap();
        // candle rounds three times in f16 (normalised, scaled, shifted) and SiLU once more.
        let allowed = if case.dtype == DType::F16 { 1e-2 } else { 1e-4 };
        let shape = format!("{} {:?} | {:?}", case.what, case.dims, case.dtype);
        agreed &= compare(&shape, device, runs, allowed, &candle, &ours);
    }
    agreed
}

fn attention_on(device: &Device, label: &str, runs: usize) -> bool {
    println!("\n{label}: attention, f16, guided (batch 2), median of {runs}");
    println!("| shape | candle ms | ours ms | ours / candle | max |Δ| / (1 + |y|) |");
    println!("|---|---|---|---|---|");
    let mut agreed = true;
    for case in ATTENTION_CASES {
        let random = |tokens: usize| {
            Tensor::randn(0f32, 1.0, (2, tokens, case.width), device)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        };
        let (query, key, value) = (random(case.queries), random(case.keys), random(case.keys));
        let scale = ((case.width / case.heads) as f64).powf(-0.5);
        let candle =
            || kernels::attention::composed(&query, &key, &value, case.heads, scale).unwrap();
        let ours = || {
            kernels::attention(&query, &key, &value, case.heads, scale)
                .unwrap()
                .expect("our attention kernel runs here")
        };
        // Both round the probabilities and the output to f16; candle its scores too.
        let shape = format!(
            "{} ({} → {} tokens, {} heads of {})",
            case.what,
            case.queries,
            case.keys,
            case.heads,
            case.width / case.heads
        );
        agreed &= compare(&shape, device, runs, 1e-2, &candle, &ours);
    }
    agreed
}

/// The feed-forward's projection, guided (batch 2): `tokens` rows of `2 × inner` values.
const GEGLU_CASES: [(&str, usize, usize); 4] = [
    ("SD 1.5 512², level 1", 4096, 1280),
    ("SD 1.5 512², level 3", 256, 5120),
    ("SDXL 1024², level 2", 4096, 2560),
    ("SDXL 1024², level 3", 1024, 5120),
];

fn geglu_on(device: &Device, label: &str, runs: usize) -> bool {
    println!("\n{label}: GEGLU, f16, guided (batch 2), median of {runs}");
    println!("| shape | candle ms | ours ms | ours / candle | max |Δ| / (1 + |y|) |");
    println!("|---|---|---|---|---|");
    let mut agreed = true;
    for (what, tokens, inner) in GEGLU_CASES {
        let projected = Tensor::randn(0f32, 2.0, (2, tokens, 2 * inner), device)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let bias = Tensor::randn(0f32, 0.5, 2 * inner, device)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let candle = || kernels::geglu::composed(&projected, &bias).unwrap();
        let ours = || {
            kernels::geglu(&projected, &bias)
                .unwrap()
                .expect("our GEGLU kernel runs here")
        };
        // candle rounds the biased projection, the GELU and the product; ours the product.
        let shape = format!("{what} [2, {tokens}, {}]", 2 * inner);
        agreed &= compare(&shape, device, runs, 1e-2, &candle, &ours);
    }
    agreed
}

/// The 3×3 convolutions of real jobs, `(batch, c_in, h, w)` to as many channels: the guided
/// UNets' in f16, the VAEs' at their decode resolutions (SD 1.5's in f16, SDXL's in f32); and
/// upsamplers' (×2 nearest, then the convolution), from the input's size.
fn conv_cases() -> Vec<(Case, Source)> {
    let as_is = |case: Case| (case, Source::AsIs);
    let doubled = |case: Case| (case, Source::Doubled);
    vec![
        as_is(case(
            "SD 1.5 UNet 512², level 1",
            [2, 320, 64, 64],
            DType::F16,
        )),
        as_is(case(
            "SD 1.5 UNet 512², level 2",
            [2, 640, 32, 32],
            DType::F16,
        )),
        as_is(case(
            "SD 1.5 UNet 512², level 3",
            [2, 1280, 16, 16],
            DType::F16,
        )),
        as_is(case(
            "SD 1.5 UNet 512², level 4",
            [2, 1280, 8, 8],
            DType::F16,
        )),
        as_is(case(
            "SD-Turbo UNet 512², level 3",
            [1, 1280, 16, 16],
            DType::F16,
        )),
        as_is(case(
            "SD-Turbo UNet 512², level 4",
            [1, 1280, 8, 8],
            DType::F16,
        )),
        as_is(case(
            "SDXL UNet 1024², level 1",
            [2, 320, 128, 128],
            DType::F16,
        )),
        as_is(case(
            "SDXL UNet 1024², level 2",
            [2, 640, 64, 64],
            DType::F16,
        )),
        as_is(case(
            "SDXL UNet 1024², level 3",
            [2, 1280, 32, 32],
            DType::F16,
        )),
        as_is(case(
            "VAE 512², 512 ch at 128²",
            [1, 512, 128, 128],
            DType::F16,
        )),
        as_is(case(
            "VAE 512², 256 ch at 256²",
            [1, 256, 256, 256],
            DType::F16,
        )),
        as_is(case(
            "VAE 512², 128 ch at 512²",
            [1, 128, 512, 512],
            DType::F16,
        )),
        as_is(case(
            "SDXL VAE, 512 ch at 256²",
            [1, 512, 256, 256],
            DType::F32,
        )),
        as_is(case(
            "SDXL VAE, 128 ch at 1024²",
            [1, 128, 1024, 1024],
            DType::F32,
        )),
        doubled(case(
            "SD 1.5 UNet upsampler, 1280 ch 32² → 64²",
            [2, 1280, 32, 32],
            DType::F16,
        )),
        doubled(case(
            "VAE 512² upsampler, 512 ch 128² → 256²",
            [1, 512, 128, 128],
            DType::F16,
        )),
        doubled(case(
            "SDXL VAE upsampler, 256 ch 512² → 1024²",
            [1, 256, 512, 512],
            DType::F32,
        )),
    ]
}

/// A convolution case's image, weights and bias on `device`, in its dtype: outputs of about
/// unit size (weights of 1 / √(9 · c_in)).
fn conv_inputs(device: &Device, case: &Case) -> [Tensor; 3] {
    let channels = case.dims[1];
    let random = |dims: &[usize], std: f64| {
        Tensor::randn(0f32, std as f32, dims, device)
            .unwrap()
            .to_dtype(case.dtype)
            .unwrap()
    };
    [
        random(&case.dims, 1.0),
        random(
            &[channels, channels, 3, 3],
            (9.0 * channels as f64).powf(-0.5),
        ),
        random(&[channels], 0.5),
    ]
}

fn conv_on(device: &Device, label: &str, runs: usize) -> bool {
    println!("\n{label}: 3×3 convolution with bias, whole, median of {runs}");
    println!("| shape | dtype | candle ms | ours ms | ours / candle | max |Δ| / (1 + |y|) |");
    println!("|---|---|---|---|---|---|");
    let mut agreed = true;
    for (case, source) in conv_cases() {
        let [_, _, height, width] = case.dims;
        let [xs, weight, bias] = conv_inputs(device, &case);
        let conv = Conv3x3::from_weights(weight.clone(), bias.clone(), case.part()).unwrap();
        let bias_cells = bias.reshape((1, (), 1, 1)).unwrap();
        // candle: the upsampled image made (where doubled), convolved, the bias added.
        let candle = || {
            let image = match source {
                Source::AsIs => xs.clone(),
                Source::Doubled => xs.upsample_nearest2d(2 * height, 2 * width).unwrap(),
            };
            image
                .conv2d(&weight, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias_cells)
                .unwrap()
        };
        let ours = || match source {
            Source::AsIs => conv.forward(&xs, ConvPlan::default()).unwrap(),
            Source::Doubled => conv.forward_doubled(&xs, ConvPlan::default()).unwrap(),
        };
        // Both one GEMM over the same products (TF32 in f32), summed in their own orders.
        let allowed = if case.dtype == DType::F16 { 1e-2 } else { 5e-3 };
        let shape = format!("{} {:?} | {:?}", case.what, case.dims, case.dtype);
        agreed &= compare(&shape, device, runs, allowed, &candle, &ours);
    }
    agreed
}

/// Our implicit-GEMM convolution (`kernels::conv3x3`: no column matrix, the bias inside)
/// against the column path it replaces (our columns, one GEMM into the image layout, the bias
/// added), on the convolutions it takes: f16, and f32 in TF32 (the column path's GEMM is
/// TF32 there too). `Conv3x3` runs whichever won the race at start;
/// this times both whatever the race said.
fn implicit_conv_on(device: &Device, label: &str, runs: usize) -> bool {
    println!("\n{label}: 3×3 convolution with bias, f16 (f32 in TF32), whole, median of {runs}");
    println!(
        "| shape | dtype | columns + GEMM ms | implicit GEMM ms | implicit / columns | max |Δ| / (1 + |y|) |"
    );
    println!("|---|---|---|---|---|---|");
    let mut agreed = true;
    for (case, source) in conv_cases() {
        let [batch, channels, height, width] = case.dims;
        if !kernels::conv3x3::fits(case.dtype, channels, channels) {
            continue;
        }
        let [xs, weight, bias] = conv_inputs(device, &case);
        let kernel_weights = kernels::conv3x3::kernel_order(&weight).unwrap();
        let shape = format!("{} {:?} | {:?}", case.what, case.dims, case.dtype);
        if kernels::conv3x3::forward(&xs, source, &kernel_weights, &bias)
            .unwrap()
            .is_none()
        {
            println!("| {shape} | our convolution is off on this device | | | |");
            continue;
        }
        let (rows, cells) = (height << source.shift(), (width << source.shift()));
        let matrix = weight.reshape((channels, channels * 9)).unwrap();
        let bias_cells = bias.reshape((1, (), 1, 1)).unwrap();
        let columns = || {
            let columns = kernels::im2col::columns_3x3(&xs, source, 0, rows)
                .unwrap()
                .expect("our column kernel runs on this device");
            matrix
                .broadcast_left(batch)
                .unwrap()
                .matmul(&columns)
                .unwrap()
                .reshape((batch, channels, rows, cells))
                .unwrap()
                .broadcast_add(&bias_cells)
                .unwrap()
        };
        let implicit = || {
            kernels::conv3x3::forward(&xs, source, &kernel_weights, &bias)
                .unwrap()
                .unwrap()
        };
        // The same products in f32, rounded once (ours) or twice (the GEMM's, then the bias's).
        agreed &= compare(&shape, device, runs, 1e-2, &columns, &implicit);
    }
    agreed
}

/// Our implicit-GEMM convolution with K (input channels × taps) split to fill the card
/// (`Splits::Fill`, what the engine runs: only grids smaller than the card split) against K
/// whole, on the same cases.
fn split_conv_on(device: &Device, label: &str, runs: usize) -> bool {
    println!(
        "\n{label}: implicit 3×3 convolution, K whole against K split to fill the card, median of {runs}"
    );
    println!("| shape | dtype | K whole ms | K split ms | split / whole | max |Δ| / (1 + |y|) |");
    println!("|---|---|---|---|---|---|");
    let mut agreed = true;
    for (case, source) in conv_cases() {
        let [_, channels, ..] = case.dims;
        if !kernels::conv3x3::fits(case.dtype, channels, channels) {
            continue;
        }
        let [xs, weight, bias] = conv_inputs(device, &case);
        let kernel_weights = kernels::conv3x3::kernel_order(&weight).unwrap();
        let [batch, _, height, width] = case.dims;
        let shift = source.shift();
        let parts = kernels::conv3x3::parts_to_fill(
            device,
            case.dtype,
            channels,
            [batch, channels, height << shift, width << shift],
        );
        let shape = format!(
            "{} {:?}, {parts} parts | {:?}",
            case.what, case.dims, case.dtype
        );
        let with = |splits| {
            kernels::conv3x3::forward_split(&xs, source, &kernel_weights, &bias, splits)
                .unwrap()
                .expect("our convolution runs on this device")
        };
        let whole = || with(Splits::Exactly(1));
        let split = || with(Splits::Fill);
        // The same products, the parts' sums added in f32 before the one rounding.
        agreed &= compare(&shape, device, runs, 1e-2, &whole, &split);
    }
    agreed
}

/// A resnet's convolution as the engine ran it before (our group norm + SiLU kernel, then our
/// 3×3 convolution over the normalised image) against `Conv3x3::forward_normalized` (the
/// columns written normalised from the image as it is), on the convolutions' shapes.
fn norm_conv_on(device: &Device, label: &str, runs: usize) -> bool {
    println!(
        "\n{label}: group norm + SiLU (32 groups), then 3×3 convolution, whole, median of {runs}"
    );
    println!(
        "| shape | dtype | normalised image ms | normalised columns ms | ratio | max |Δ| / (1 + |y|) |"
    );
    println!("|---|---|---|---|---|---|");
    let mut agreed = true;
    for (case, source) in conv_cases() {
        if source != Source::AsIs {
            continue;
        }
        let [_, channels, ..] = case.dims;
        let random = |dims: &[usize], mean: f32, std: f64| {
            Tensor::randn(mean, std as f32, dims, device)
                .unwrap()
                .to_dtype(case.dtype)
                .unwrap()
        };
        let xs = (random(&case.dims, 0.0, 2.0) + 1.0).unwrap();
        let weight = random(
            &[channels, channels, 3, 3],
            0.0,
            (9.0 * channels as f64).powf(-0.5),
        );
        let conv =
            Conv3x3::from_weights(weight, random(&[channels], 0.0, 0.5), case.part()).unwrap();
        let norm = GroupNorm::from_weights(
            random(&[channels], 1.0, 0.5),
            random(&[channels], 0.0, 0.5),
            32,
            1e-6,
        )
        .unwrap();
        let before = || {
            conv.forward(&norm.forward_then_silu(&xs).unwrap(), ConvPlan::default())
                .unwrap()
        };
        let ours = || {
            conv.forward_normalized(&xs, &norm, ConvPlan::default())
                .unwrap()
        };
        // The same arithmetic in both, rounded once: apart only where the GEMMs sum apart.
        let allowed = if case.dtype == DType::F16 { 1e-2 } else { 5e-3 };
        let shape = format!("{} {:?} | {:?}", case.what, case.dims, case.dtype);
        agreed &= compare(&shape, device, runs, allowed, &before, &ours);
    }
    agreed
}

/// Which of the engine's per-cell maps a case is.
#[derive(Clone, Copy)]
enum PointwiseKind {
    /// A resnet's shortcut, cells to cells (candle: its 1×1 convolution).
    Shortcut,
    /// SD 1.x's `proj_in`: a 1×1 convolution, then the cells as tokens (a copy).
    ConvIn,
    /// SD 1.x's `proj_out`: the tokens as cells (a copy), then a 1×1 convolution.
    ConvOut,
    /// SD 2.x and SDXL's `proj_in`: the cells as tokens (a copy), then a linear layer.
    LinearIn,
    /// SD 2.x and SDXL's `proj_out`: a linear layer, then the tokens as cells (a copy).
    LinearOut,
}

/// `(what, kind, batch, c_in, c_out, side)` of real jobs.
const POINTWISE_CASES: [(&str, PointwiseKind, usize, usize, usize, usize); 6] = [
    (
        "SD 1.5 512², up level 1 shortcut",
        PointwiseKind::Shortcut,
        2,
        640,
        320,
        64,
    ),
    (
        "SD 1.5 512², level 1 proj_in",
        PointwiseKind::ConvIn,
        2,
        320,
        320,
        64,
    ),
    (
        "SD 1.5 512², level 1 proj_out",
        PointwiseKind::ConvOut,
        2,
        320,
        320,
        64,
    ),
    (
        "SDXL 1024², level 2 proj_in",
        PointwiseKind::LinearIn,
        2,
        640,
        640,
        64,
    ),
    (
        "SDXL 1024², level 2 proj_out",
        PointwiseKind::LinearOut,
        2,
        640,
        640,
        64,
    ),
    (
        "SDXL 1024², level 3 proj_out",
        PointwiseKind::LinearOut,
        2,
        1280,
        1280,
        32,
    ),
];

fn pointwise_on(device: &Device, label: &str, dtype: DType, runs: usize) -> bool {
    println!("\n{label}: per-cell maps with their layout copies, {dtype:?}, median of {runs}");
    println!("| shape | candle ms | ours ms | ours / candle | max |Δ| / (1 + |y|) |");
    println!("|---|---|---|---|---|");
    let mut agreed = true;
    for (what, kind, batch, c_in, c_out, side) in POINTWISE_CASES {
        let random = |dims: &[usize], std: f64| {
            Tensor::randn(0f32, std as f32, dims, device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let weight = random(&[c_out, c_in], (c_in as f64).powf(-0.5));
        let bias = random(&[c_out], 0.5);
        let cells = random(&[batch, c_in, side, side], 1.0);
        let tokens = random(&[batch, side * side, c_in], 1.0);
        let pointwise = Pointwise::from_weights(weight.clone(), bias.clone());
        let conv = candle_nn::Conv2d::new(
            weight.reshape((c_out, c_in, 1, 1)).unwrap(),
            Some(bias.clone()),
            candle_nn::Conv2dConfig::default(),
        );
        let linear = candle_nn::Linear::new(weight.clone(), Some(bias.clone()));
        let as_tokens = |cells: Tensor| {
            let channels = cells.dim(1).unwrap();
            cells
                .permute((0, 2, 3, 1))
                .unwrap()
                .reshape((batch, side * side, channels))
                .unwrap()
        };
        let as_cells = |tokens: &Tensor| {
            let channels = tokens.dim(2).unwrap();
            tokens
                .reshape((batch, side, side, channels))
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let candle = || match kind {
            PointwiseKind::Shortcut => conv.forward(&cells).unwrap(),
            PointwiseKind::ConvIn => as_tokens(conv.forward(&cells).unwrap()),
            PointwiseKind::ConvOut => conv.forward(&as_cells(&tokens)).unwrap(),
            PointwiseKind::LinearIn => linear.forward(&as_tokens(cells.clone())).unwrap(),
            PointwiseKind::LinearOut => as_cells(&linear.forward(&tokens).unwrap()),
        };
        let ours = || match kind {
            PointwiseKind::Shortcut => pointwise.cells_to_cells(&cells).unwrap(),
            PointwiseKind::ConvIn | PointwiseKind::LinearIn => {
                pointwise.cells_to_tokens(&cells).unwrap()
            }
            PointwiseKind::ConvOut | PointwiseKind::LinearOut => {
                pointwise.tokens_to_cells(&tokens, side, side).unwrap()
            }
        };
        let allowed = if dtype == DType::F16 { 1e-2 } else { 1e-4 };
        let shape = format!("{what}: {c_in} → {c_out} channels at {side}²");
        agreed &= compare(&shape, device, runs, allowed, &candle, &ours);
    }
    agreed
}

/// A UNet level's transformer blocks, guided (batch 2): `tokens` per image, `width`
/// channels, the text encoder's `context` width, and the `blocks` one evaluation runs there.
struct TransformerLevel {
    model: &'static str,
    level: &'static str,
    tokens: usize,
    width: usize,
    context: usize,
    blocks: usize,
}

const fn transformer_level(
    model: &'static str,
    level: &'static str,
    tokens: usize,
    width: usize,
    context: usize,
    blocks: usize,
) -> TransformerLevel {
    TransformerLevel {
        model,
        level,
        tokens,
        width,
        context,
        blocks,
    }
}

/// SD 1.5 at 512² (2 blocks down and 3 up at each of its first three levels, one in the
/// middle) and SDXL at 1024² (depth 2 at level 2, 10 at level 3 and in the middle).
const TRANSFORMER_LEVELS: [TransformerLevel; 6] = [
    transformer_level("SD 1.5 512²", "level 1", 4096, 320, 768, 5),
    transformer_level("SD 1.5 512²", "level 2", 1024, 640, 768, 5),
    transformer_level("SD 1.5 512²", "level 3", 256, 1280, 768, 5),
    transformer_level("SD 1.5 512²", "middle", 64, 1280, 768, 1),
    transformer_level("SDXL 1024²", "level 2", 4096, 640, 2048, 10),
    transformer_level("SDXL 1024²", "level 3", 1024, 1280, 2048, 60),
];

/// One of a transformer block's linear layers: `tokens` per image (the level's, or the
/// text's 77), `c_in` → `c_out`, with a bias or not, `calls` per block; the feed-forward's
/// input projection runs as the engine runs it (`Pointwise`, its bias left to GEGLU).
struct LinearLayer {
    layer: &'static str,
    tokens: usize,
    c_in: usize,
    c_out: usize,
    bias: bool,
    pointwise: bool,
    calls: usize,
}

fn linear_layers(level: &TransformerLevel) -> [LinearLayer; 5] {
    let (tokens, width) = (level.tokens, level.width);
    let layer = |layer, tokens, c_in, c_out, bias, calls| LinearLayer {
        layer,
        tokens,
        c_in,
        c_out,
        bias,
        pointwise: false,
        calls,
    };
    [
        layer("q, k, v (self), q (cross)", tokens, width, width, false, 4),
        layer("out (self, cross)", tokens, width, width, true, 2),
        LinearLayer {
            pointwise: true,
            ..layer(
                "ff in (its bias in GEGLU)",
                tokens,
                width,
                8 * width,
                false,
                1,
            )
        },
        layer("ff out", tokens, 4 * width, width, true, 1),
        layer(
            "k, v (cross, the text's)",
            77,
            level.context,
            width,
            false,
            2,
        ),
    ]
}

/// The median time of one call, from `runs` samples of `calls` calls each between two
/// waits for the device (a GEMM of a few dozen microseconds is otherwise mostly the wait).
fn median_ms_per_call(
    runs: usize,
    calls: usize,
    device: &Device,
    mut function: impl FnMut() -> Tensor,
) -> f64 {
    let calls = calls.max(1);
    median_ms(runs, device, || {
        let mut out = function();
        for _ in 1..calls {
            out = function();
        }
        out
    }) / calls as f64
}

/// The transformers' linear layers as the engine runs them (candle's `Linear`, cuBLAS on
/// CUDA), guided (batch 2): time and throughput per layer, and what they add up to in one
/// UNet evaluation. No rival here: `benches/gpu/bench.py` reads these rows and times torch's
/// `F.linear` on the same shapes (the same cuBLAS), so the GEMMs' share of the gap to
/// diffusers is measured apart from everything around them.
fn linear_on(device: &Device, label: &str, levels: &[TransformerLevel], runs: usize) {
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    };
    println!("\n{label}: linear layers, {dtype:?}, guided (batch 2), median of {runs}");
    println!("| model | level | layer | GEMM (batch × tokens × in → out) | calls | ms | TFLOP/s |");
    println!("|---|---|---|---|---|---|---|");
    // Per model: the time and work of its layers' calls in one evaluation.
    let mut totals: Vec<(&str, f64, f64, usize)> = Vec::new();
    for level in levels {
        for layer in linear_layers(level) {
            let random = |dims: &[usize], std: f64| {
                Tensor::randn(0f32, std as f32, dims, device)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let weight = random(&[layer.c_out, layer.c_in], (layer.c_in as f64).powf(-0.5));
            let bias = random(&[layer.c_out], 0.5);
            let tokens = random(&[2, layer.tokens, layer.c_in], 1.0);
            let linear = candle_nn::Linear::new(weight.clone(), layer.bias.then_some(bias.clone()));
            let pointwise = Pointwise::from_weights(weight, bias);
            let ms = median_ms_per_call(runs, 10, device, || {
                if layer.pointwise {
                    pointwise.tokens_to_tokens_unbiased(&tokens).unwrap()
                } else {
                    linear.forward(&tokens).unwrap()
                }
            });
            let flop = 2.0 * (2 * layer.tokens * layer.c_in * layer.c_out) as f64;
            let calls = layer.calls * level.blocks;
            println!(
                "| {} | {} | {} | 2 × {} × {} → {}{} | {calls} | {ms:.4} | {:.1} |",
                level.model,
                level.level,
                layer.layer,
                layer.tokens,
                layer.c_in,
                layer.c_out,
                if layer.bias { " + bias" } else { "" },
                flop / ms / 1e9,
            );
            match totals.last_mut() {
                Some((model, total_ms, total_flop, total_calls)) if *model == level.model => {
                    *total_ms += ms * calls as f64;
                    *total_flop += flop * calls as f64;
                    *total_calls += calls;
                }
                _ => totals.push((level.model, ms * calls as f64, flop * calls as f64, calls)),
            }
        }
    }
    for (model, ms, flop, calls) in totals {
        println!(
            "| {model} | all | one UNet evaluation | | {calls} | {ms:.3} | {:.1} |",
            flop / ms / 1e9
        );
    }
}

fn main() {
    let runs: usize = std::env::var("STUDIO_BENCH_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(10);
    // `cargo bench` passes `--bench`; nothing else is taken.
    let mut agreed = true;
    if cfg!(feature = "cuda") {
        match Device::new_cuda(0) {
            Ok(gpu) => {
                // As the engine opens it: no per-buffer stream events.
                studio_worker::engine::device::without_stream_events(&gpu);
                let ours = kernels::prepare(&gpu);
                let label = format!("GPU 0 (our kernels {})", if ours { "on" } else { "OFF" });
                agreed &= run_on(&gpu, &label, &gpu_cases(), runs);
                if kernels::attention::runs_on(&gpu, DType::F16) {
                    agreed &= attention_on(&gpu, "GPU 0", runs);
                } else {
                    println!("\nGPU 0: our attention kernel is OFF (see the log); not measured");
                }
                let pair = Tensor::zeros((1, 2), DType::F16, &gpu).unwrap();
                let pair_bias = Tensor::zeros(2, DType::F16, &gpu).unwrap();
                if kernels::geglu(&pair, &pair_bias).unwrap().is_some() {
                    agreed &= geglu_on(&gpu, "GPU 0", runs);
                } else {
                    println!("\nGPU 0: our GEGLU kernel is OFF (see the log); not measured");
                }
                agreed &= pointwise_on(&gpu, "GPU 0", DType::F16, runs);
                linear_on(&gpu, "GPU 0", &TRANSFORMER_LEVELS, runs);
                let image = Tensor::zeros((1, 1, 1, 1), DType::F16, &gpu).unwrap();
                if kernels::im2col::runs_for(&image) {
                    agreed &= conv_on(&gpu, "GPU 0", runs);
                    agreed &= implicit_conv_on(&gpu, "GPU 0", runs);
                    agreed &= split_conv_on(&gpu, "GPU 0", runs);
                    agreed &= norm_conv_on(&gpu, "GPU 0", runs);
                } else {
                    println!("\nGPU 0: our column kernel is OFF (see the log); not measured");
                }
            }
            Err(error) => println!("no CUDA device ({error}); the CPU only"),
        }
    }
    agreed &= run_on(&Device::Cpu, "CPU", &cpu_cases(), runs.min(5));
    agreed &= pointwise_on(&Device::Cpu, "CPU", DType::F32, runs.min(5));
    // The smallest level only: the CPU's GEMMs are not what this table is for.
    linear_on(&Device::Cpu, "CPU", &TRANSFORMER_LEVELS[3..4], runs.min(5));
    if !agreed {
        eprintln!("our kernels differ from candle's beyond rounding");
        std::process::exit(1);
    }
}
