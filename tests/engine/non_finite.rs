//! Numbers that overflow never pass for an image: a decode whose output is NaN or infinite
//! is traced to its cause. A VAE that overflowed in f16 is upcast to f32 and decodes again
//! (the same image an f32 VAE makes); NaN latents are the UNet's, and fail the job.
//!
//! The f16 pipelines run on the CPU (candle runs f16 there too). The VAE's overflow is made
//! with latents that are finite in f32 but past f16's 65504 once the VAE unscales them: the
//! same NaN-or-infinity the check sees when a layer's activations overflow.

use candle_core::{DType, Device, Tensor};
use studio_worker::engine::profile::Part;
use studio_worker::engine::sd::working_memory::Plan;
use studio_worker::engine::sd::{SdError, StableDiffusion};

use crate::support::{Golden, fixture, load};

/// SD 1.x's VAE: its config's `force_upcast` applies only to SDXL (as in diffusers), so
/// it decodes in f16 in an f16 pipeline.
const MODEL: &str = "tiny-sd1";

fn load_f16() -> StableDiffusion {
    StableDiffusion::load(&fixture(MODEL), &Device::Cpu, DType::F16).expect("loads in f16")
}

fn all_finite(tensor: &Tensor) -> bool {
    tensor
        .flatten_all()
        .and_then(|values| values.to_vec1::<f32>())
        .expect("values")
        .iter()
        .all(|value| value.is_finite())
}

#[test]
fn a_vae_that_overflows_in_f16_is_upcast_and_decodes_as_an_f32_vae() {
    let latents = Golden::of(MODEL).batched("vae.latents");
    let model = load_f16();
    assert_eq!(model.vae_dtype(), DType::F16);

    // Latents as a job makes them: decoded in f16, nothing upcast.
    let ordinary = model
        .decode_each(&latents, Plan::default())
        .expect("decodes");
    assert!(all_finite(&ordinary));
    assert_eq!(model.vae_dtype(), DType::F16, "no overflow, no upcast");

    // 2·10⁴ / 0.18215 ≈ 1.1·10⁵: finite in f32, infinite in f16.
    let huge = (&latents * 2e4).expect("scale");
    let decoded = model.decode_each(&huge, Plan::default()).expect("decodes");
    assert_eq!(model.vae_dtype(), DType::F32, "upcast for good");
    assert!(all_finite(&decoded), "a finite image, not a black one");

    let reference = load(MODEL)
        .decode_each(&huge, Plan::default())
        .expect("the f32 pipeline decodes");
    let difference = (&decoded - &reference)
        .and_then(|delta| delta.abs())
        .and_then(|delta| delta.max_all())
        .and_then(|max| max.to_scalar::<f32>())
        .expect("difference");
    assert_eq!(difference, 0.0, "the same weights in f32: the same image");

    // The next job decodes in f32 at once.
    let again = model.decode(&huge).expect("decodes");
    assert!(all_finite(&again));
}

#[test]
fn nan_latents_fail_as_the_unets_overflow_and_leave_the_vae_as_it_is() {
    let latents = Golden::of(MODEL).batched("vae.latents");
    let nan = (&latents * f64::NAN).expect("NaN latents");
    for (model, dtype) in [(load_f16(), DType::F16), (load(MODEL), DType::F32)] {
        let error = model
            .decode_each(&nan, Plan::default())
            .expect_err("no image from NaN latents");
        assert!(
            matches!(
                error,
                SdError::NotFinite { part: Part::Unet, dtype: failed } if failed == dtype
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "the UNet's numbers overflowed in {} (NaN or infinity), so no image was made",
                dtype.as_str()
            )
        );
        assert_eq!(model.vae_dtype(), dtype, "the VAE was not to blame");
    }
}

#[test]
fn a_vae_that_overflows_in_f32_fails_the_decode() {
    // 10³⁸ is finite in f32, 10³⁸ / 0.18215 is not: nothing left to upcast to. (Large but
    // finite inputs decode finite: the group norms scale them back.)
    let huge = Tensor::full(1e38f32, (1, 4, 32, 32), &Device::Cpu).expect("latents");
    let error = load(MODEL)
        .decode_each(&huge, Plan::default())
        .expect_err("no image");
    assert!(
        matches!(
            error,
            SdError::NotFinite {
                part: Part::Vae,
                dtype: DType::F32
            }
        ),
        "{error:?}"
    );
}
