"""The reference side of `benches/engine_vs_diffusers.sh`: diffusers/PyTorch timings of the
same architectures, step counts and sizes as `cargo bench --bench engine`, on this machine.

Prints one JSON object: {"<measure>": seconds, ...}. With --make-sd21-unet DIR it first
writes a full-size SD 2.1-architecture UNet with random weights (seeded) to DIR, for both
sides to load.
"""

import argparse
import json
import os
import statistics
import time

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

SD21_UNET = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
)


def median_time(function, runs, warmup=1):
    for _ in range(warmup):
        function()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixtures", required=True)
    parser.add_argument("--sd21-unet", help="folder with unet/ (made by --make-sd21-unet)")
    parser.add_argument("--make-sd21-unet", help="write a random-weight SD 2.1 UNet here and exit")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    if args.make_sd21_unet:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD21_UNET)
        unet.save_pretrained(os.path.join(args.make_sd21_unet, "unet"), safe_serialization=True)
        return

    results = {}
    for name in ["tiny-sd1", "tiny-sd2-v", "tiny-sdxl"]:
        folder = os.path.join(args.fixtures, name)
        cls = StableDiffusionXLPipeline if name == "tiny-sdxl" else StableDiffusionPipeline
        pipeline = cls.from_pretrained(folder)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        generator = torch.Generator().manual_seed(0)

        def image():
            pipeline(
                prompt="a red fox in the snow",
                negative_prompt="blurry",
                num_inference_steps=3,
                guidance_scale=7.5,
                height=64,
                width=64,
                generator=generator,
                output_type="np",
            )

        results[f"{name}.image_3_steps"] = median_time(image, args.runs * 4)

        latents = torch.randn((2, 4, 32, 32), generator=generator)
        hidden = torch.randn((2, 77, pipeline.unet.config.cross_attention_dim), generator=generator)
        kwargs = {}
        if name == "tiny-sdxl":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn((2, pipeline.text_encoder_2.config.projection_dim), generator=generator),
                "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2),
            }
        results[f"{name}.unet_step"] = median_time(
            lambda: pipeline.unet(latents, 500, encoder_hidden_states=hidden, **kwargs), args.runs * 10
        )

    if args.sd21_unet:
        unet = UNet2DConditionModel.from_pretrained(os.path.join(args.sd21_unet, "unet"))
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn((2, 4, 64, 64), generator=generator)
        hidden = torch.randn((2, 77, 1024), generator=generator)
        results["sd21-512.unet_step"] = median_time(
            lambda: unet(latents, 500, encoder_hidden_states=hidden), max(2, args.runs // 2)
        )

    print(json.dumps(results))


if __name__ == "__main__":
    main()
