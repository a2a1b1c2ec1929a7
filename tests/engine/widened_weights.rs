//! A pipeline whose weights are held in f16 and widened to f32 as each layer runs (what a
//! GTX 16 series card runs) against an f32 pipeline whose matrices were rounded to f16 in
//! its files: f16 → f32 is exact, so the two must compute the same numbers — text
//! encodings, a UNet evaluation, a decode and a whole job's image alike. A layer that kept
//! its weights unwidened fails (f16 against f32 operands), one that widened the wrong way
//! differs, and the comparison with the unrounded f32 pipeline shows the weights really
//! were held in f16.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use studio_worker::engine::device::Precision;
use studio_worker::engine::sd::StableDiffusion;
use studio_worker::engine::sd::working_memory::Plan;

use crate::files::copy_folder;
use crate::support::{FIXTURES, Golden, PROMPTS, fixture, load, request};

/// A copy of the fixture `name` in `to`, every tensor of two dimensions or more in its
/// weight files rounded to f16 (and stored as f32 again).
fn rounded_copy(name: &str, to: &Path) {
    copy_folder(&fixture(name), to);
    for component in ["text_encoder", "text_encoder_2", "unet", "vae"] {
        let folder = to.join(component);
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("an entry").path();
            if path
                .extension()
                .is_none_or(|extension| extension != "safetensors")
            {
                continue;
            }
            let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("loads");
            let rounded: HashMap<String, Tensor> = tensors
                .into_iter()
                .map(|(name, tensor)| {
                    let tensor = if tensor.rank() >= 2 {
                        tensor
                            .to_dtype(DType::F16)
                            .and_then(|half| half.to_dtype(DType::F32))
                            .expect("rounded")
                    } else {
                        tensor
                    };
                    (name, tensor)
                })
                .collect();
            candle_core::safetensors::save(&rounded, &path).expect("saved");
        }
    }
}

fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|delta| delta.abs())
        .and_then(|delta| delta.max_all())
        .and_then(|max| max.to_scalar::<f32>())
        .expect("a difference")
}

/// One UNet evaluation of the fixture's golden inputs.
fn unet_output(model: &StableDiffusion, golden: &Golden, sdxl: bool) -> Tensor {
    let text_time = sdxl.then(|| {
        (
            golden.batched("unet.text_embeds"),
            golden.batched("unet.time_ids"),
        )
    });
    let text_time = text_time.as_ref().map(|(embeds, ids)| (embeds, ids));
    model
        .unet_forward(
            &golden.batched("unet.sample"),
            golden.f64s("unet.timestep")[0],
            &golden.batched("unet.hidden"),
            text_time,
            Plan::default(),
        )
        .expect("the UNet runs")
}

#[test]
fn weights_held_in_f16_and_widened_compute_what_f32_does_on_them_rounded() {
    for name in FIXTURES {
        let sdxl = name == "tiny-sdxl";
        let folder = tempfile::tempdir().expect("a temporary folder");
        rounded_copy(name, folder.path());
        let widened = StableDiffusion::load(&fixture(name), &Device::Cpu, Precision::WIDENED_F16)
            .expect("loads widening");
        let rounded =
            StableDiffusion::load(folder.path(), &Device::Cpu, DType::F32).expect("loads");
        let golden = Golden::of(name);

        // The text encoders (their embedding tables widened row by row).
        let (embeds, pooled) = widened.encode_text(PROMPTS[1]).expect("encodes");
        let (rounded_embeds, rounded_pooled) = rounded.encode_text(PROMPTS[1]).expect("encodes");
        assert_eq!(embeds.dtype(), DType::F32, "{name}: computed in f32");
        assert_eq!(largest_difference(&embeds, &rounded_embeds), 0.0, "{name}");
        if let (Some(pooled), Some(rounded_pooled)) = (pooled, rounded_pooled) {
            assert_eq!(largest_difference(&pooled, &rounded_pooled), 0.0, "{name}");
        }

        // The UNet (every kind of layer: convolutions, projections, attention, embeddings).
        let out = unet_output(&widened, &golden, sdxl);
        assert_eq!(
            largest_difference(&out, &unet_output(&rounded, &golden, sdxl)),
            0.0,
            "{name}: the UNet"
        );
        // Not the unrounded model's numbers: the weights were held in f16.
        let unrounded = largest_difference(&out, &unet_output(&load(name), &golden, sdxl));
        eprintln!("{name}: widened f16 weights against the f32 UNet: max |Δ| {unrounded:.2e}");
        assert!(unrounded > 0.0, "{name}: held in f32 after all");

        // The decoder.
        let latents = golden.batched("vae.latents");
        assert_eq!(
            largest_difference(
                &widened.decode(&latents).expect("decodes"),
                &rounded.decode(&latents).expect("decodes")
            ),
            0.0,
            "{name}: the decode"
        );
        assert_eq!(widened.vae_dtype(), DType::F32, "{name}: decodes in f32");

        // A whole guided job, to the pixel.
        let job = request(7, 1);
        let images = |model: &StableDiffusion| {
            model
                .generate(&job, &mut |_| {}, &|| false)
                .expect("the job runs")
        };
        assert_eq!(images(&widened), images(&rounded), "{name}: the image");
    }
}
