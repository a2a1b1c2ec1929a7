//! The PNG files the worker makes: 8-bit RGB with an iTXt `parameters` chunk (prompt, steps,
//! sampler, guidance, seed, size, model), the layout other Stable Diffusion tools read. The
//! same bytes go to the studio, into the person's copies, and out of `generate`.

use crate::vocab::job::{JobSpec, Scheduler};

#[derive(Debug, thiserror::Error)]
#[error("cannot encode the PNG: {0}")]
pub struct EncodeError(#[from] png::EncodingError);

/// The parameters line other Stable Diffusion tools write and read. `sampler` is the one
/// that ran (the job's, or the model's default).
pub fn parameters_text(spec: &JobSpec, sampler: Scheduler) -> String {
    let mut text = spec.prompt.clone();
    if !spec.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", spec.negative_prompt));
    }
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        spec.steps,
        sampler.display_name(),
        spec.guidance_scale,
        spec.seed,
        spec.width,
        spec.height,
        spec.model
    ));
    text
}

/// The PNG bytes of `image` with `parameters` in an iTXt chunk (UTF-8, so any prompt fits).
///
/// Compressed with png's `Fast` level (fdeflate, a DEFLATE written for PNG): against its
/// default `Balanced` level, a 512² picture encodes in 3–4 ms instead of 70–95 ms and a 1024²
/// one in 13 ms instead of 380–430 ms, for files 0–2 % larger (`cargo bench --bench pipeline
/// -- png`). The encode sits between one job's engine and the next; the bytes go up in the
/// background.
pub fn encode_png(image: &image::RgbImage, parameters: &str) -> Result<Vec<u8>, EncodeError> {
    encode(image, Some(parameters))
}

/// The PNG bytes of each of a job's images, in order: [`encode_png`] on a thread per image
/// (a job of several images waits for the slowest one, not for their sum).
pub fn encode_pngs(
    images: &[image::RgbImage],
    parameters: &str,
) -> Result<Vec<Vec<u8>>, EncodeError> {
    if images.len() < 2 {
        return images
            .iter()
            .map(|image| encode_png(image, parameters))
            .collect();
    }
    std::thread::scope(|scope| {
        let encoders: Vec<_> = images
            .iter()
            .map(|image| scope.spawn(move || encode_png(image, parameters)))
            .collect();
        encoders
            .into_iter()
            .map(|encoder| {
                encoder
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// The PNG bytes of a preview: the same encoding, no parameters.
pub fn encode_preview_png(image: &image::RgbImage) -> Result<Vec<u8>, EncodeError> {
    encode(image, None)
}

fn encode(image: &image::RgbImage, parameters: Option<&str>) -> Result<Vec<u8>, EncodeError> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    if let Some(parameters) = parameters {
        encoder.add_itxt_chunk("parameters".to_owned(), parameters.to_owned())?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(image.as_raw())?;
    writer.finish()?;
    Ok(bytes)
}

/// The `parameters` text a PNG carries, if any (for tests and tools).
pub fn read_parameters(png_bytes: &[u8]) -> Option<String> {
    let reader = png::Decoder::new(std::io::Cursor::new(png_bytes))
        .read_info()
        .ok()?;
    reader
        .info()
        .utf8_text
        .iter()
        .find(|chunk| chunk.keyword == "parameters")
        .and_then(|chunk| chunk.get_text().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_png_carries_its_parameters_and_its_pixels() {
        let spec = JobSpec {
            job_id: "j_1".into(),
            model: "sd-turbo".into(),
            prompt: "a lighthouse at dusk, «oil»".into(),
            negative_prompt: "blurry".into(),
            width: 2,
            height: 1,
            steps: 4,
            guidance_scale: 0.0,
            seed: 42,
            num_images: 1,
            scheduler: None,
            lease: std::time::Duration::from_secs(120),
        };
        let image = image::RgbImage::from_raw(2, 1, vec![255, 0, 0, 0, 0, 255]).unwrap();
        let bytes = encode_png(&image, &parameters_text(&spec, Scheduler::EulerA)).unwrap();
        assert_eq!(
            read_parameters(&bytes).unwrap(),
            "a lighthouse at dusk, «oil»\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, \
             CFG scale: 0, Seed: 42, Size: 2x1, Model: sd-turbo"
        );
        let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(decoded, image);
    }

    #[test]
    fn several_images_are_encoded_in_their_order() {
        let images: Vec<_> = (0..4_u8)
            .map(|shade| image::RgbImage::from_pixel(64, 32, image::Rgb([shade, 0, 0])))
            .collect();
        let pngs = encode_pngs(&images, "four").unwrap();
        assert_eq!(pngs.len(), 4);
        for (png, image) in pngs.iter().zip(&images) {
            assert_eq!(&image::load_from_memory(png).unwrap().to_rgb8(), image);
            assert_eq!(read_parameters(png).as_deref(), Some("four"));
        }
        assert!(encode_pngs(&[], "none").unwrap().is_empty());
    }

    #[test]
    fn a_full_size_picture_comes_back_exactly_and_smaller() {
        // Smooth colour with a little grain, as a generated picture has: the fast level must
        // still compress it, and lose nothing.
        let mut rng = fastrand::Rng::with_seed(5);
        let image = image::RgbImage::from_fn(512, 512, |x, y| {
            let grain = rng.u8(..4);
            let level = |value: u32| (value as u8).wrapping_add(grain);
            image::Rgb([level(x / 2), level(y / 2), level((x + y) / 4)])
        });
        let bytes = encode_png(&image, "parameters").unwrap();
        assert!(
            bytes.len() < image.as_raw().len() / 2,
            "{} bytes for {} raw",
            bytes.len(),
            image.as_raw().len()
        );
        assert_eq!(image::load_from_memory(&bytes).unwrap().to_rgb8(), image);
    }
}
