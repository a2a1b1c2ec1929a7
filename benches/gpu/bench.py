"""The worker's engine against diffusers fp16 on one NVIDIA GPU, side by side, in one run.

Run by benches/gpu/run.sh on the GPU machine (see its header). Each measurement runs in a
process of its own, so each peak is that process's alone:

  1. `make`: full-size random-weight pipelines written by diffusers itself from configs
     (no download): SD-Turbo's architecture (SD 2.1 at 512²), SD 1.5's and SDXL's, saved
     as fp16 variants. Tokenizers are the test fixtures' (real CLIP BPE, cut down).
  2. diffusers fp16 (default SDPA attention; the SDXL VAE upcast to f32, as diffusers does
     for a VAE with force_upcast): the first image, then the median of warm images.
  3. the worker, twice: `studio-worker generate --repeat` (the engine a studio job runs
     through): the GPU preparation, the first image, the median of warm images, the first
     case with an empty driver kernel cache (CUDA_CACHE_PATH), as on a fresh install; and
     as studio jobs: the dev studio, the worker registered with it (`run --headless`), the
     jobs queued at once, the median gap between deliveries (claim, image, PNG, upload).
  4. our own kernels against candle's: `generate` again with STUDIO_WORKER_FUSED_KERNELS=0
     (the ratio is ours / candle's, warm), and `generate --profile` on SD 1.5 and SDXL:
     where a warm image's time goes, by model part and kind of work.
  5. cards with less memory: a ballast process fills the GPU until only a consumer card's
     memory is free, so the engine must plan within it: SDXL with 12 GB (an RTX 3060/4070),
     SD-Turbo with a 6 GB card's (beside a desktop), SDXL with an 8 GB card's (its text
     encoders on the CPU).

Peak memory is the device's used memory above what it was before the process started,
sampled every 5 ms through NVML: what the process holds, context included.

Prints one table, ratios against diffusers, and writes it as JSON beside the models.
"""

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "models")
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry"

# name, model, side, steps, guidance
CASES = [
    ("SD-Turbo arch 512², 1 step", "sd-turbo", 512, 1, 0.0),
    ("SD-Turbo arch 512², 4 steps", "sd-turbo", 512, 4, 0.0),
    ("SD 1.5 arch 512², 20 steps, CFG 7.5", "sd15", 512, 20, 7.5),
    ("SDXL arch 1024², 20 steps, CFG 5", "sdxl", 1024, 20, 5.0),
]
# Cards with less memory than the H200, (model, steps, GiB left free, whose card): SDXL with
# 12, the memory goal ("runs on a 12 GB RTX 3060/4070", measured so before); SD-Turbo
# with what a 6 GB card has free beside a desktop (the goal's "runs on a 6 GB card"); SDXL with
# what an 8 GB card has free, where its text encoders visit the GPU for each job's prompts, a path
# never run on a GPU before. The first two run before the profiles, the third after the GTX 16
# series' precision. (The H200's own CUDA context is larger than a consumer card's: a little
# harder.)
TIGHT_CARDS = (("sdxl", 20, 12, "a 12 GB RTX 3060/4070"),
               ("sd-turbo", 4, 5.4, "a 6 GB RTX 2060 or GTX 1660 beside a desktop"),
               ("sdxl", 20, 7.4, "an 8 GB RTX 3070/4060 beside a desktop"))
# The catalog's rows that no case above measures, whose GPU memory `src/models/catalog.rs`
# estimated from the others: (name, model, side, steps, guidance, catalog id), each at the
# catalog's defaults (SDXL-Turbo: 512², 1 step; SD 2.1, SD-Turbo's architecture: 768², 25 steps,
# guided). Run with the whole card, after the last tight card.
CATALOG_CASES = (("SDXL-Turbo arch 512², 1 step", "sdxl", 512, 1, 0.0, "sdxl-turbo"),
                 ("SD 2.1 arch 768², 25 steps, CFG 7.5", "sd-turbo", 768, 25, 7.5, "sd-2.1"))
# The cases whose warm image is also profiled by kind of work, (model, steps), in the order
# they are profiled while the budget lasts: the largest, then the worst ratio of the last table
# (SD-Turbo's one step, 2.29×, never profiled), then SD 1.5.
PROFILED = (("sdxl", 20), ("sd-turbo", 1), ("sd15", 20))


# ---------------------------------------------------------------- device memory (NVML)

class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class DeviceMemory:
    """The first GPU's used and total bytes, from the driver (no CUDA context here)."""

    def __init__(self):
        self.nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if self.nvml.nvmlInit_v2() != 0:
            raise RuntimeError("NVML did not start")
        self.handle = ctypes.c_void_p()
        if self.nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle)) != 0:
            raise RuntimeError("NVML has no GPU 0")

    def read(self):
        memory = _Memory()
        self.nvml.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(memory))
        return memory.used, memory.total

    def name(self):
        buffer = ctypes.create_string_buffer(96)
        self.nvml.nvmlDeviceGetName(self.handle, buffer, 96)
        return buffer.value.decode()

    def driver(self):
        buffer = ctypes.create_string_buffer(80)
        self.nvml.nvmlSystemGetDriverVersion(buffer, 80)
        return buffer.value.decode()


class PeakSampler:
    """Samples the device's used memory every 5 ms from start() to stop(); stop() returns
    the peak above what was used at start()."""

    def __init__(self, memory):
        self.memory = memory

    def start(self):
        self.baseline, _ = self.memory.read()
        self.peak = self.baseline
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            used, _ = self.memory.read()
            self.peak = max(self.peak, used)
            time.sleep(0.005)

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.peak - self.baseline


def run_measured(memory, command, env=None, timeout=300):
    """Runs `command`; returns (stdout+stderr, its peak memory above idle, seconds)."""
    sampler = PeakSampler(memory).start()
    started = time.perf_counter()
    try:
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        peak = sampler.stop()
    seconds = time.perf_counter() - started
    output = finished.stdout + finished.stderr
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])}… exited {finished.returncode}:\n{output[-3000:]}")
    return output, peak, seconds


# ---------------------------------------------------------------- 1. the pipelines

def make_pipelines(models):
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer, CLIPTokenizerFast)

    tokenizer = CLIPTokenizerFast.from_pretrained(os.path.join(FIXTURES, "tiny-sdxl", "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(FIXTURES, "tiny-sdxl", "tokenizer_2"))
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1)

    def text(hidden, layers, heads, intermediate, act, projection):
        return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, intermediate_size=intermediate,
                              hidden_act=act, projection_dim=projection,
                              max_position_embeddings=77, **special)

    def vae(scaling, upcast):
        return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                             down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                             sample_size=512, scaling_factor=scaling, force_upcast=upcast)

    def scheduler(spacing):
        return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      timestep_spacing=spacing, steps_offset=1)

    def save(pipeline, name):
        folder = os.path.join(models, name)
        pipeline.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
        print(f"wrote {folder}", flush=True)

    torch.manual_seed(0)
    with torch.device("cuda"):
        if not os.path.isdir(os.path.join(models, "sd-turbo")):
            unet = UNet2DConditionModel(sample_size=64, attention_head_dim=(5, 10, 20, 20),
                                        cross_attention_dim=1024, use_linear_projection=True)
            encoder = CLIPTextModel(text(1024, 23, 16, 4096, "gelu", 512))
            save(StableDiffusionPipeline(vae=vae(0.18215, False), text_encoder=encoder, tokenizer=tokenizer,
                                         unet=unet, scheduler=scheduler("trailing"), safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False), "sd-turbo")
        if not os.path.isdir(os.path.join(models, "sd15")):
            unet = UNet2DConditionModel(sample_size=64, attention_head_dim=8, cross_attention_dim=768)
            encoder = CLIPTextModel(text(768, 12, 12, 3072, "quick_gelu", 768))
            save(StableDiffusionPipeline(vae=vae(0.18215, False), text_encoder=encoder, tokenizer=tokenizer,
                                         unet=unet, scheduler=scheduler("leading"), safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False), "sd15")
        if not os.path.isdir(os.path.join(models, "sdxl")):
            unet = UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
            encoder = CLIPTextModel(text(768, 12, 12, 3072, "quick_gelu", 768))
            encoder_2 = CLIPTextModelWithProjection(text(1280, 32, 20, 5120, "gelu", 1280))
            save(StableDiffusionXLPipeline(vae=vae(0.13025, True), text_encoder=encoder,
                                           text_encoder_2=encoder_2, tokenizer=tokenizer,
                                           tokenizer_2=tokenizer_2, unet=unet,
                                           scheduler=scheduler("leading")), "sdxl")


# ---------------------------------------------------------------- 2. diffusers (child)

def diffusers_child(folder, side, steps, guidance, runs):
    import torch
    from diffusers import AutoPipelineForText2Image, EulerDiscreteScheduler

    pipeline = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, variant="fp16")
    pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to("cuda")
    times = []
    for run in range(runs):
        generator = torch.Generator("cuda").manual_seed(run)
        torch.cuda.synchronize()
        started = time.perf_counter()
        pipeline(PROMPT, negative_prompt=NEGATIVE if guidance > 1 else None, width=side, height=side,
                 num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                 output_type="pil")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    print(json.dumps({"times": times, "allocated_peak": torch.cuda.max_memory_allocated()}))


def run_diffusers(memory, folder, side, steps, guidance, runs):
    output, peak, _ = run_measured(memory, [sys.executable, __file__, "diffusers", folder, str(side),
                                            str(steps), str(guidance), str(runs)])
    # Its one line of JSON is on stdout; warnings on stderr may come after it in `output`.
    line = next(line for line in reversed(output.splitlines()) if line.startswith('{"times"'))
    result = json.loads(line)
    return {"first": result["times"][0], "warm": statistics.median(result["times"][1:]), "peak": peak,
            "allocated": result["allocated_peak"]}


# ---------------------------------------------------------------- 2b. the linear layers

# A row of the `kernels` bench's "linear layers" table (benches/kernels.rs, `linear_on`).
LINEAR_ROW = re.compile(r"^\| (?P<model>[^|]+?) \| (?P<level>[^|]+?) \| (?P<layer>[^|]+?) \| 2 × (?P<tokens>\d+) × (?P<c_in>\d+) "
                        r"→ (?P<c_out>\d+)(?P<bias> \+ bias)? \| (?P<calls>\d+) \| (?P<ms>[0-9.]+) \|")


def linear_rows(kernels_output):
    """The GPU's linear-layer rows of the `kernels` bench's output: candle's time per call."""
    section = kernels_output.split("GPU 0: linear layers", 1)
    if len(section) < 2:
        return []
    rows = []
    for line in section[1].split("\n\n", 1)[0].splitlines():
        match = LINEAR_ROW.match(line)
        if match:
            row = {key: match.group(key) for key in ("model", "level", "layer")}
            row.update({key: int(match.group(key)) for key in ("tokens", "c_in", "c_out", "calls")})
            row.update(bias=match.group("bias") is not None, candle=float(match.group("ms")))
            rows.append(row)
    return rows


def torch_linear_child(rows_json):
    """torch's `F.linear` in f16 on each row's shape (the same cuBLAS as candle's): the median
    time of one call, from 20 samples of 10 calls between CUDA events."""
    import torch
    import torch.nn.functional as F

    rows = json.loads(rows_json)
    times = []
    for row in rows:
        tokens = torch.randn(2, row["tokens"], row["c_in"], device="cuda", dtype=torch.float16)
        weight = torch.randn(row["c_out"], row["c_in"], device="cuda", dtype=torch.float16) * row["c_in"] ** -0.5
        bias = torch.randn(row["c_out"], device="cuda", dtype=torch.float16) if row["bias"] else None
        samples = []
        for _ in range(21):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                F.linear(tokens, weight, bias)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 10)
        times.append(statistics.median(samples[1:]))
    print(json.dumps({"times": times}))


def linear_table(rows, torch_ms):
    """Per row candle's and torch's time and their ratio; per model the layers of one UNet
    evaluation added up (each row's time × its calls)."""
    lines = [f"  {'layer':70} {'candle':>10} {'torch':>10} {'ratio':>6}"]
    totals = {}
    for row, torch_time in zip(rows, torch_ms):
        shape = f"2 × {row['tokens']} × {row['c_in']} → {row['c_out']}{' + bias' if row['bias'] else ''}"
        what = f"{row['model']} {row['level']}, {row['layer']}, {shape}"
        lines.append(f"  {what:70} {row['candle']:8.4f}ms {torch_time:8.4f}ms {row['candle'] / torch_time:5.2f}×")
        model = row["model"]
        candle_total, torch_total = totals.get(model, (0.0, 0.0))
        totals[model] = (candle_total + row["candle"] * row["calls"], torch_total + torch_time * row["calls"])
    for model, (candle_total, torch_total) in totals.items():
        lines.append(f"  {model + ', one UNet evaluation':70} {candle_total:8.3f}ms {torch_total:8.3f}ms "
                     f"{candle_total / torch_total:5.2f}×")
    return "\n".join(lines)


def pool_summary(pools, estimate, peak):
    """The pools' peaks beside the estimate: in use beyond the weights per stretch (what the
    estimate predicts), what the pool reserved beyond that (what it could not reuse), and what
    the process's peak held outside both pools (the context, modules, cuBLAS's workspace)."""
    weights = estimate["weights"]
    pooled = max(pools[stretch]["reserved"] + pools[stretch]["graphs"] for stretch in ("steps", "decode"))
    working = {stretch: pools[stretch]["used"] - weights for stretch in ("steps", "decode")}
    larger = max(working.values())
    return (f"in use beyond weights: steps {working['steps'] / 1e9:.2f} GB, decode {working['decode'] / 1e9:.2f} GB "
            f"(estimate {estimate['working'] / larger if larger > 0 else float('nan'):.2f}× the larger); "
            f"reserved beyond in use: steps {(pools['steps']['reserved'] - pools['steps']['used']) / 1e9:.2f} GB, "
            f"decode {(pools['decode']['reserved'] - pools['decode']['used']) / 1e9:.2f} GB; graphs "
            f"{max(pools['steps']['graphs'], pools['decode']['graphs']) / 1e9:.2f} GB; outside the pools "
            f"{(peak - pooled) / 1e9:.2f} GB")


def run_torch_linear(memory, rows):
    output, _, _ = run_measured(memory, [sys.executable, __file__, "torch-linear", json.dumps(rows)])
    line = next(line for line in reversed(output.splitlines()) if line.startswith('{"times"'))
    return json.loads(line)["times"]


# ---------------------------------------------------------------- 3. the worker

def run_worker(memory, worker, folder, side, steps, guidance, runs, cache, home, extra_env=None,
               extra_args=(), device="cuda"):
    # Each run encodes its prompts, as diffusers' pipeline call does (the worker keeps its
    # last prompts encoded, which would spare runs 2… the text encoders).
    # The engine's placement of each job (its memory estimate) is a debug line, and so is the
    # time each visiting text encoder takes to come onto the GPU.
    env = dict(os.environ, CUDA_CACHE_PATH=cache,
               RUST_LOG="info,studio_worker::engine::candle_engine=debug,studio_worker::engine::sd=debug",
               STUDIO_WORKER_PROMPT_CACHE="0", **(extra_env or {}))
    command = [worker, "--config", os.path.join(home, "config.toml"), "generate", "--device", device,
               "--model-dir", folder, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
               "--width", str(side), "--height", str(side), "--steps", str(steps),
               "--guidance", str(guidance), "--scheduler", "euler", "--seed", "1",
               "--repeat", str(runs), "--out", os.path.join(home, "out.png"), *extra_args]
    output, peak, seconds = run_measured(memory, command, env=env)
    profile = output[output.find("where run "):] if "where run " in output else ""
    kernels_off = "our GPU kernels are off" in output
    graphs_off = "the CUDA graph of " in output
    times = [float(match) for match in re.findall(r"run \d+/\d+: done in ([0-9.]+) s", output)]
    prepared = re.search(r"prepared in ([0-9.]+) s", output)
    plans = sorted(set(re.findall(r"saving memory: .*|the text encoders of .*", output)))
    # Text encoders that visit the GPU for each job's prompts (an 8 GB card's SDXL): each
    # encoder's upload time, once a job (its prompt and negative prompt in one visit).
    visits = [[encoder, float(ms)] for encoder, ms in
              re.findall(r"(the (?:second )?text encoder) came onto the device in ([0-9.]+) ms", output)]
    # Each of our kernels timed at start against what replaces it (engine/kernels/race.rs).
    races = re.findall(r"our GPU .* kernel takes .*", output)
    # How candle's PTX compiled at first start (on threads, into the driver's cache).
    races += re.findall(r"candle's kernels compiled on .*", output)
    # The first job's placement: its weights and the estimate of its working memory.
    placed = re.search(r"placing a .*?: (\S+ [kMGT]?B) of weights on the device, (\S+ [kMGT]?B) "
                       r"estimated beside them \((.*)\), \S+ [kMGT]?B free(.*)", output)
    # What the allocator's pools held in the last (warm) run: by stretch, in use and reserved.
    pools = pool_peaks(output)
    return {"first": times[0], "warm": statistics.median(times[1:]), "peak": peak, "pools": pools,
            "prepare": float(prepared.group(1)) if prepared else 0.0, "process": seconds,
            "plans": plans, "profile": profile.split("\n/")[0].strip(), "kernels_off": kernels_off,
            "graphs_off": graphs_off, "races": races, "visits": visits,
            "estimate": {"weights": human_bytes(placed.group(1)), "working": human_bytes(placed.group(2)),
                         "plan": placed.group(3), "handed_back": "handed back before the decode" in placed.group(4)}
            if placed else None}


def visits_summary(visits):
    """Each visiting encoder's upload time, median over the jobs: "35 ms (the text encoder) + 160 ms
    (the second text encoder), medians of 4"."""
    encoders = list(dict.fromkeys(encoder for encoder, _ in visits))
    times = {encoder: [ms for name, ms in visits if name == encoder] for encoder in encoders}
    return (" + ".join(f"{statistics.median(times[encoder]):.0f} ms ({encoder})" for encoder in encoders)
            + f", median{'s' if len(encoders) > 1 else ''} of {max(len(each) for each in times.values())}")


POOL_STRETCH = r"(\S+ [kMGT]?B) in use \((\S+ [kMGT]?B) reserved, (\S+ [kMGT]?B) for graphs\)"
POOL_LINE = re.compile(r"the GPU's pools in this job: the prompt and steps " + POOL_STRETCH + "; the decode "
                       + POOL_STRETCH)


def pool_peaks(output):
    """The last job's pool peaks (candle_engine's debug line): per stretch, bytes in use
    (weights included), reserved by the pool, reserved for graphs."""
    found = POOL_LINE.findall(output)
    if not found:
        return None
    values = [human_bytes(text) for text in found[-1]]
    return {stretch: dict(zip(("used", "reserved", "graphs"), values[3 * index:3 * index + 3]))
            for index, stretch in enumerate(("steps", "decode"))}


def human_bytes(text):
    """'7.11 GB' (the worker's `human::bytes`) → 7110000000."""
    value, unit = text.split()
    return float(value) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


def run_worker_jobs(memory, worker, dev_studio, folder, side, steps, guidance, runs, cache, device="cuda"):
    """The same job as studio jobs: the dev studio (auto-approving), the worker registered
    with it (`run --headless`), jobs queued one after another through the operator routes;
    queued at once; each timed from one delivery to the next (claim, generation, PNG,
    upload)."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    studio = subprocess.Popen([dev_studio, "--listen", f"127.0.0.1:{port}", "--auto-approve"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    home = tempfile.mkdtemp(prefix="gpu-bench-worker-")
    config = os.path.join(home, "worker.toml")
    with open(config, "w") as out:
        out.write(f'[engine]\ndevice = "{device}"\n\n[models]\nenabled = []\n\n'
                  f'[models.local]\nbench = "{folder}"\n\n'
                  "[policy]\npause_for_games = false\npause_on_battery = false\n")
    env = dict(os.environ, CUDA_CACHE_PATH=cache, XDG_DATA_HOME=os.path.join(home, "data"),
               XDG_CONFIG_HOME=os.path.join(home, "config"))
    sampler = PeakSampler(memory).start()
    log = open(os.path.join(home, "worker.log"), "w")
    running = subprocess.Popen([worker, "--config", config, "run", "--headless", "--api-url",
                                f"http://127.0.0.1:{port}/api"], env=env, stdout=log, stderr=log)
    operator = f"http://127.0.0.1:{port}/operator/jobs"

    def call(url, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    # A prompt of its own per job, as a studio's are: the UNet's kept CUDA graph binds each
    # job's conditioning (and compares the first other prompt's step with one run eagerly),
    # and the text encoders run for each. The negative prompt is the same for every job, as
    # a studio's usually is, so after the first job it comes from the worker's prompt cache.
    jobs = [{"jobId": f"bench-{run}", "kind": "txt2img", "model": "bench", "prompt": f"{PROMPT}, take {run}",
             "negativePrompt": NEGATIVE if guidance > 1 else "", "width": side, "height": side,
             "steps": steps, "guidanceScale": guidance, "seed": run, "numImages": 1,
             "scheduler": "euler", "leaseS": 300} for run in range(runs)]
    done_at = {}
    deadline = time.time() + 240  # registration, preparing the GPU, loading, the jobs
    try:
        while True:
            try:
                call(operator, jobs[0])
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        for job in jobs[1:]:
            call(operator, job)
        # All queued at once, as a busy studio has them: the worker claims the next as soon
        # as one is delivered, so the gaps between deliveries are what a job costs.
        while len(done_at) < len(jobs):
            for job in jobs:
                if job["jobId"] in done_at:
                    continue
                state = call(f"{operator}/{job['jobId']}")
                if state["state"] == "done":
                    done_at[job["jobId"]] = time.perf_counter()
                elif state["state"] in ("failed", "cancelled"):
                    raise RuntimeError(f"{job['jobId']} {state['state']} ({state.get('code')}); see {log.name}")
            if time.time() > deadline or running.poll() is not None:
                raise RuntimeError(f"{len(done_at)} of {len(jobs)} jobs delivered; see {log.name}")
            time.sleep(0.005)
        finished = sorted(done_at.values())
        times = [later - earlier for earlier, later in zip(finished, finished[1:])]
    finally:
        running.terminate()
        running.wait(timeout=60)
        peak = sampler.stop()
        studio.terminate()
        studio.wait(timeout=10)
        log.close()
    with open(log.name) as logged:
        graphs_off = "the CUDA graph of " in logged.read()
    return {"warm": statistics.median(times), "peak": peak, "graphs_off": graphs_off}


# ---------------------------------------------------------------- 5. cards with less memory

def start_ballast(keep_free_gb):
    """A process holding the GPU's memory but `keep_free_gb` GB until its stdin closes; its
    first line says how much it holds."""
    return subprocess.Popen([sys.executable, __file__, "ballast", str(keep_free_gb)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ballast_child(keep_free_gb):
    import torch
    free, _ = torch.cuda.mem_get_info()
    hold = max(0, free - int(keep_free_gb * 1024**3))
    ballast = torch.empty(hold, dtype=torch.uint8, device="cuda")
    print(f"ballast {hold / 1e9:.1f} GB", flush=True)
    sys.stdin.read()  # until the parent closes it
    del ballast


class NoMemory:
    """Where there is no NVIDIA driver: nothing to sample."""

    def read(self):
        return 0, 0


def catalog_min_gpu_mb(worker):
    """Each catalog id's `min_gpu_mb`, as the worker under test says it (`models list --json`)."""
    config = os.path.join(tempfile.mkdtemp(prefix="gpu-bench-catalog-"), "config.toml")
    listed = subprocess.run([worker, "--config", config, "models", "list", "--json"], check=True,
                            capture_output=True, text=True).stdout
    return {model["id"]: model["min_gpu_mb"] for model in json.loads(listed) if model["min_gpu_mb"]}


def check_here():
    """The studio-job harness on this machine's CPU with a tiny fixture and the debug
    binaries (`cargo build --example dev_studio && cargo build` first): no GPU needed."""
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    result = run_worker_jobs(NoMemory(), os.path.join(target, "debug", "studio-worker"),
                             os.path.join(target, "debug", "examples", "dev_studio"),
                             os.path.join(FIXTURES, "tiny-sd1"), 64, 3, 5.0, 3,
                             tempfile.mkdtemp(prefix="cuda-cache-"), device="cpu")
    print(f"3 tiny studio jobs on the CPU: {result['warm'] * 1000:.0f} ms between deliveries")
    said = catalog_min_gpu_mb(os.path.join(target, "debug", "studio-worker"))
    assert {"sdxl-turbo", "sd-2.1"} <= said.keys() and all(mb > 0 for mb in said.values()), said
    print(f"the catalog's min_gpu_mb read from the worker: {said}")
    # generate as the bench runs it: plain, with candle's kernels only, without graphs, without
    # the implicit convolution, profiled.
    home = tempfile.mkdtemp(prefix="gpu-bench-home-")
    folder = os.path.join(FIXTURES, "tiny-sdxl")
    runs = {}
    for what, extra_env, extra_args in [("ours", None, ()),
                                        ("candle", {"STUDIO_WORKER_FUSED_KERNELS": "0"}, ()),
                                        ("no graphs", {"STUDIO_WORKER_CUDA_GRAPHS": "0"}, ()),
                                        ("no implicit", {"STUDIO_WORKER_IMPLICIT_CONVOLUTION": "0"}, ()),
                                        ("profiled", None, ["--profile"])]:
        runs[what] = run_worker(NoMemory(), os.path.join(target, "debug", "studio-worker"), folder, 64, 3,
                                5.0, 3, tempfile.mkdtemp(prefix="cuda-cache-"), home, extra_env=extra_env,
                                extra_args=extra_args, device="cpu")
    print(f"tiny SDXL generate on the CPU, warm: ours {runs['ours']['warm'] * 1000:.0f} ms, candle's "
          f"{runs['candle']['warm'] * 1000:.0f} ms, without graphs {runs['no graphs']['warm'] * 1000:.0f} ms, "
          f"without the implicit convolution {runs['no implicit']['warm'] * 1000:.0f} ms; "
          f"profiled:\n{runs['profiled']['profile']}")
    assert not runs["ours"]["graphs_off"], "the CPU never tries a graph, so none can fail"
    assert runs["profiled"]["profile"].startswith("where run 3's time went"), runs["profiled"]["profile"]
    estimate = runs["ours"]["estimate"]
    assert estimate and estimate["weights"] > 0 and estimate["working"] > 0, estimate
    assert not estimate["handed_back"], "the CPU's RAM holds both stretches of a tiny model"
    # The linear-layer rows as benches/kernels.rs prints them (its CPU run's, relabelled).
    sample = ("GPU 0: linear layers, F16, guided (batch 2), median of 20\n"
              "| model | level | layer | GEMM (batch × tokens × in → out) | calls | ms | TFLOP/s |\n"
              "|---|---|---|---|---|---|---|\n"
              "| SD 1.5 512² | middle | out (self, cross) | 2 × 64 × 1280 → 1280 + bias | 2 | 2.5132 | 0.2 |\n"
              "| SD 1.5 512² | middle | k, v (cross, the text's) | 2 × 77 × 768 → 1280 | 2 | 1.3183 | 0.2 |\n"
              "| SD 1.5 512² | all | one UNet evaluation | | 4 | 7.663 | 0.2 |\n\n"
              "CPU: linear layers, F32\n| SD 1.5 512² | middle | q | 2 × 64 × 1280 → 1280 | 4 | 1.8959 | 0.2 |\n")
    layers = linear_rows(sample)
    assert [(row["level"], row["c_in"], row["bias"], row["calls"], row["candle"]) for row in layers] == [
        ("middle", 1280, True, 2, 2.5132), ("middle", 768, False, 2, 1.3183)], layers
    table = linear_table(layers, [1.0, 2.0])
    assert table.splitlines()[-1].split()[-3:] == ["7.663ms", "6.000ms", "1.28×"], table
    print(f"the linear-layer rows read back:\n{table}")
    # The pools' line as candle_engine logs it (gpu_memory::PoolPeaks's Display; a unit test
    # there holds the same text), which the CPU never prints.
    pools = pool_peaks("DEBUG studio_worker::engine::candle_engine: the GPU's pools in this job: the prompt and "
                       "steps 3.10 GB in use (3.20 GB reserved, 40.0 MB for graphs); the decode 3.41 GB in use "
                       "(3.62 GB reserved, 0 B for graphs)\n")
    assert pools == {"steps": {"used": 3.1e9, "reserved": 3.2e9, "graphs": 4e7},
                     "decode": {"used": 3.41e9, "reserved": 3.62e9, "graphs": 0.0}}, pools
    summary = pool_summary(pools, {"weights": 2.6e9, "working": 1.0e9}, 4.1e9)
    assert summary.endswith("outside the pools 0.48 GB"), summary
    print("the pools' peaks read back: " + summary)
    print(f"the engine's placement read back: {estimate['weights'] / 1e6:.1f} MB of weights, "
          f"{estimate['working'] / 1e6:.1f} MB estimated beside them ({estimate['plan']})")


def check_table():
    """`main` end to end with every measurement faked (no GPU, binaries or torch): the extras'
    order within the budget and the tables printed from their results, so that a mistake there
    cannot cost a device call its table. One tight card fails, as a job refused for memory would."""
    import contextlib
    import io

    class FakeMemory(NoMemory):
        def name(self):
            return "Fake GPU"

        def driver(self):
            return "0.0"

    def worker_result(warm, peak, plans=(), visits=()):
        return {"first": 2 * warm, "warm": warm, "peak": peak, "process": 1.0, "prepare": 0.5,
                "plans": list(plans), "profile": "where run 2's time went: …", "kernels_off": False,
                "graphs_off": False, "races": ["our GPU group norm kernel takes 0.1 ms here"], "pools": None,
                "visits": list(visits),
                "estimate": {"weights": 2.0e9, "working": 1.0e9, "plan": "the fastest", "handed_back": False}}

    class FakeBallast:
        def __init__(self, free_gb):
            self.free_gb = float(free_gb)
            self.stdout = io.StringIO(f"ballast {140 - self.free_gb:.1f} GB\n")
            self.stdin = io.StringIO()

        def wait(self):
            return 0

    held = []

    def fake_worker(memory, worker, folder, side, steps, guidance, runs, cache, home, extra_env=None,
                    extra_args=(), device="cuda"):
        free = held[-1].free_gb if held and not held[-1].stdin.closed else None
        if free == 7.4:
            raise RuntimeError("generate exited 1: out of memory")
        if free == 5.4:
            return worker_result(0.2 * steps, free * 0.7e9, ["the text encoders of bench come onto the GPU"],
                                 visits=[["the text encoder", 150.0], ["the text encoder", 170.0],
                                         ["the text encoder", 160.0]])
        if free:
            return worker_result(0.2 * steps, free * 0.7e9, ["saving memory: tiles of 512 pixels"])
        return worker_result(0.1 * steps, 4e9)

    def fake_ballast(free_gb):
        held.append(FakeBallast(free_gb))
        return held[-1]

    fakes = {"DeviceMemory": FakeMemory, "start_ballast": fake_ballast, "run_worker": fake_worker,
             "run_diffusers": lambda memory, folder, side, steps, guidance, runs: {
                 "first": 0.1 * steps, "warm": 0.05 * steps, "peak": 4.5e9, "allocated": 3e9},
             "run_worker_jobs": lambda *args, **kwargs: {"warm": 0.12, "peak": 4e9, "graphs_off": False},
             "catalog_min_gpu_mb": lambda worker: {"sdxl-turbo": 8192, "sd-2.1": 6144}}
    saved = {name: globals()[name] for name in fakes}
    saved_run, saved_argv = subprocess.run, sys.argv
    globals().update(fakes)
    subprocess.run = lambda command, **kwargs: subprocess.CompletedProcess(command, 0)  # the pipelines
    sys.argv = [__file__, "--models", tempfile.mkdtemp(prefix="gpu-bench-check-"), "--budget", "1000"]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            main()
    finally:
        globals().update(saved)
        subprocess.run, sys.argv = saved_run, saved_argv
    table = printed.getvalue()
    cards = table.split("On cards with less memory", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert [line.split("(")[0].strip() for line in cards] == [
        "SDXL arch 1024², 20 steps, CFG 5, 12 GB free", "SD-Turbo arch 512², 4 steps, 5.4 GB free",
        "SDXL arch 1024², 20 steps, CFG 5, 7.4 GB free"], cards
    assert "(2.00× the whole card's), peak 8.40GB" in cards[0] and "tiles of 512 pixels" in cards[0], cards[0]
    assert "text encoders brought onto the GPU for each job's prompts: 160 ms (the text encoder), median of 3" \
        in cards[1], cards[1]
    two = visits_summary([["the text encoder", 30.0], ["the second text encoder", 150.0],
                          ["the text encoder", 40.0], ["the second text encoder", 170.0]])
    assert two == "35 ms (the text encoder) + 160 ms (the second text encoder), medians of 2", two
    assert "onto the GPU in" not in cards[0], cards[0]
    assert cards[2].endswith("failed (its error is above)"), cards[2]
    assert "SDXL arch 1024², 20 steps, CFG 5, 7.4 GB free failed: generate exited 1" in table
    assert [entry.startswith("ballast") for entry in (ballast.stdout.getvalue() for ballast in held)] == [True] * 3
    assert all(ballast.stdin.closed for ballast in held), "every ballast let go of the GPU"
    estimates = table.split("The memory estimate against the peak", 1)[1].split("\n\n", 1)[0]
    assert "SD-Turbo arch 512², 4 steps, 5.4 GB free" in estimates, estimates
    catalog = table.split("The catalog's rows no case above measures", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert [line.split("  ")[1] for line in catalog] == [
        "SDXL-Turbo arch 512², 1 step", "SD 2.1 arch 768², 25 steps, CFG 7.5"], catalog
    assert catalog[0].endswith("100ms warm, peak 4.00GB = 3815 MiB; the catalog says 8192 MiB for sdxl-turbo"), \
        catalog[0]
    assert catalog[1].endswith("the catalog says 6144 MiB for sd-2.1"), catalog[1]
    assert "SD 2.1 arch 768², 25 steps, CFG 7.5" in estimates, estimates
    print("the table read back, tight cards and the catalog's rows included:\n" + "\n".join(cards + catalog))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", default=os.path.join(ROOT, "cuda-build", "studio-worker"))
    parser.add_argument("--dev-studio", default=os.path.join(ROOT, "cuda-build", "dev_studio"))
    parser.add_argument("--models", default="/tmp/gpu-bench/models")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--budget", type=float, default=500,
                        help="seconds for the whole bench: the extras after the main table's "
                             "measurements run only while their expected time is left")
    parser.add_argument("--only", metavar="MODEL",
                        help="the cases of one pipeline alone (sd-turbo, sd15 or sdxl)")
    parser.add_argument("--kernels-log", metavar="FILE",
                        help="the `kernels` bench's output (run.sh writes it first): its linear-layer "
                             "rows are timed in torch too")
    parser.add_argument("--diffusers-only", action="store_true",
                        help="the pipelines and diffusers' column alone (a rerun of the reference)")
    args = parser.parse_args()

    memory = DeviceMemory()
    os.makedirs(args.models, exist_ok=True)
    started = time.perf_counter()
    make = [sys.executable, __file__, "make", args.models]
    subprocess.run(make, check=True)
    print(f"pipelines ready in {time.perf_counter() - started:.0f} s", flush=True)

    home = tempfile.mkdtemp(prefix="gpu-bench-home-")
    cold_cache = tempfile.mkdtemp(prefix="cuda-cache-")
    rows = []

    def attempt(what, run):
        """One measurement; a failure is reported and the bench goes on with the others."""
        try:
            return run()
        except Exception as error:  # noqa: BLE001 - any failure of a child process
            print(f"{what} failed: {error}", flush=True)
            return None

    def left():
        return args.budget - (time.perf_counter() - started)

    # The main table's measurements first, every case.
    cases = [case for case in CASES if args.only in (None, case[1])]
    for index, (name, model, side, steps, guidance) in enumerate(cases):
        folder = os.path.join(args.models, model)
        reference = attempt(f"{name}: diffusers",
                            lambda: run_diffusers(memory, folder, side, steps, guidance, args.runs))
        ours = jobs = None
        if not args.diffusers_only:
            # The first case finds the driver's kernel cache empty, as a fresh install does.
            ours = attempt(f"{name}: generate",
                           lambda: run_worker(memory, args.worker, folder, side, steps, guidance,
                                              args.runs, cold_cache, home))
            jobs = attempt(f"{name}: studio jobs",
                           lambda: run_worker_jobs(memory, args.worker, args.dev_studio, folder, side,
                                                   steps, guidance, args.runs, cold_cache))
        rows.append({"case": name, "model": model, "side": side, "steps": steps, "guidance": guidance,
                     "diffusers": reference, "worker": ours, "jobs": jobs, "candle_kernels": None,
                     "no_graphs": None, "no_implicit": None, "profiled": None, "widened": None,
                     "cold_cache": index == 0})
        print(json.dumps(rows[-1]), flush=True)

    # candle's linear layers (the `kernels` bench's rows) against torch's on the same shapes:
    # a few seconds, so before the extras.
    linear = None
    if args.kernels_log and not args.diffusers_only and os.path.exists(args.kernels_log):
        with open(args.kernels_log) as log:
            layers = linear_rows(log.read())
        torch_ms = attempt("torch's linear layers", lambda: run_torch_linear(memory, layers)) if layers else None
        if torch_ms:
            linear = linear_table(layers, torch_ms)

    def extra(what, row, run):
        """An extra measurement, when about one `generate` process of this case's time is left."""
        expected = 1.3 * row["worker"]["process"] + 10 if row["worker"] else 60
        if left() < expected:
            print(f"{what}: skipped, {left():.0f} s of the budget left (needs ~{expected:.0f} s)", flush=True)
            return None
        return attempt(what, run)

    def generate(row, runs, **options):
        return lambda: run_worker(memory, args.worker, os.path.join(args.models, row["model"]), row["side"],
                                  row["steps"], row["guidance"], runs, cold_cache, home, **options)

    # Then the extras, the most telling first: SDXL on a 12 GB card and SD-Turbo on a 6 GB one
    # (the memory goals), the profiles (where the time goes), the GTX 16 series' precision,
    # SDXL on an 8 GB card, the catalog's rows no case measures, then what each past change did
    # (the implicit convolution, the graphs, our kernels against candle's). The extras measure
    # the worker: none when only diffusers ran.
    rows_with_extras = [] if args.diffusers_only else rows
    tight = []

    def on_tight_card(model, steps, free_gb, card):
        """`generate` for the case of `model` and `steps` with `free_gb` GB of the GPU free."""
        row = next((row for row in rows_with_extras if (row["model"], row["steps"]) == (model, steps)), None)
        if not row:
            return
        what = f"{row['case']}, {free_gb} GB free"
        expected = 1.3 * row["worker"]["process"] + 20 if row["worker"] else 90
        if left() < expected:
            print(f"{what}: skipped, {left():.0f} s of the budget left (needs ~{expected:.0f} s)", flush=True)
            return
        ballast = start_ballast(free_gb)
        print(ballast.stdout.readline().strip(), flush=True)
        try:
            result = attempt(what, generate(row, args.runs))
        finally:
            ballast.stdin.close()
            ballast.wait()
        tight.append({"case": what, "card": card, "free_gb": free_gb, "worker": result})

    for card in TIGHT_CARDS[:2]:
        on_tight_card(*card)
    # Where each case's time goes now: what still stands between it and diffusers'.
    for model, steps in PROFILED:
        for row in (row for row in rows_with_extras if (row["model"], row["steps"]) == (model, steps)):
            row["profiled"] = extra(f"{row['case']}: generate --profile", row,
                                    generate(row, 2, extra_args=["--profile"]))
    # The GTX 16 series' precision, f32 arithmetic over weights held in f16, never run on a GPU
    # before: that it runs (its f32 paths on CUDA), its peak against f16's, and its time (here
    # with TF32 GEMMs, which the GTX 16 series lacks: its own speed is not measured here).
    for row in (row for row in rows_with_extras if row["model"] == "sd15"):
        row["widened"] = extra(f"{row['case']}: generate in f32 over f16 weights", row,
                               generate(row, 3, extra_env={"STUDIO_WORKER_GPU_PRECISION": "widened"}))
    for card in TIGHT_CARDS[2:]:
        on_tight_card(*card)
    # The catalog's estimated rows, measured: what their `min_gpu_mb` should say.
    catalog = []
    for name, model, side, steps, guidance, catalog_id in CATALOG_CASES:
        row = next((row for row in rows_with_extras if row["model"] == model), None)
        if row:
            result = extra(f"{name} (the catalog's {catalog_id})", row,
                           lambda: run_worker(memory, args.worker, os.path.join(args.models, model), side, steps,
                                              guidance, args.runs, cold_cache, home))
            catalog.append({"case": name, "catalog_id": catalog_id, "worker": result})
    # Our implicit-GEMM 3×3 convolution (no column matrix) against the column path it
    # replaces (our columns and a GEMM), time and peak: the last engine change measured whole.
    for row in sorted(rows_with_extras, key=lambda row: row["side"]):
        row["no_implicit"] = extra(f"{row['case']}: generate without the implicit convolution", row,
                                   generate(row, 3, extra_env={"STUDIO_WORKER_IMPLICIT_CONVOLUTION": "0"}))
    # The CUDA graphs (the UNet's steps and the text encoders' layers, kept between jobs, so
    # 1-step jobs too) against every kernel launched one at a time.
    for row in sorted(rows_with_extras, key=lambda row: row["side"]):
        row["no_graphs"] = extra(f"{row['case']}: generate without CUDA graphs", row,
                                 generate(row, 3, extra_env={"STUDIO_WORKER_CUDA_GRAPHS": "0"}))
    for row in sorted(rows_with_extras, key=lambda row: (-row["steps"], -row["side"])):
        row["candle_kernels"] = extra(f"{row['case']}: generate with candle's kernels only", row,
                                      generate(row, 3, extra_env={"STUDIO_WORKER_FUSED_KERNELS": "0"}))
    print(json.dumps({"tight": tight, "catalog": catalog}), flush=True)

    used, total = memory.read()
    print(f"\n{memory.name()}, driver {memory.driver()}, {total / 1024**3:.0f} GiB, "
          f"{time.strftime('%Y-%m-%d')}; {args.runs} runs per case, warm = median of runs 2..")
    print(f"{'case':38} {'diffusers':>10} {'generate':>10} {'ratio':>6} {'studio job':>10} {'ratio':>6}   "
          f"{'peak diffusers':>14} {'generate':>9} {'ratio':>6} {'studio':>7}   {'first job':>10} {'prepare':>8}")
    def ms(result, key="warm"):
        return f"{result[key] * 1000:8.0f}ms" if result else f"{'failed':>10}"

    def gb(result):
        return f"{result['peak'] / 1e9:7.2f}GB" if result else f"{'failed':>9}"

    def ratio(result, reference, key):
        return f"{result[key] / reference[key]:5.2f}×" if result and reference else f"{'—':>6}"

    for row in rows:
        reference, ours, jobs = row["diffusers"], row["worker"], row["jobs"]
        print(f"{row['case']:38} {ms(reference)} {ms(ours)} {ratio(ours, reference, 'warm')} {ms(jobs)} "
              f"{ratio(jobs, reference, 'warm')}   {gb(reference):>14} {gb(ours)} "
              f"{ratio(ours, reference, 'peak')} {gb(jobs)}   {ms(ours, 'first')} "
              + (f"{ours['prepare']:7.1f}s" if ours else "")
              + ("  (cold kernel cache)" if row["cold_cache"] else "")
              + ("  (studio jobs: CUDA graphs were OFF, see the log)"
                 if jobs and jobs.get("graphs_off") else ""))
    print("\nThe implicit 3×3 convolution against the column path (generate, warm and peak; implicit / columns):")
    for row in rows:
        ours, columns = row["worker"], row["no_implicit"]
        if columns or ours:
            print(f"  {row['case']:38} {ms(ours)} vs {ms(columns)}  {ratio(ours, columns, 'warm')}   "
                  f"{gb(ours)} vs {gb(columns)}  {ratio(ours, columns, 'peak')}")
    for row in rows:
        ours, widened = row["worker"], row["widened"]
        if widened:
            print("\nf32 arithmetic over f16 weights (the GTX 16 series' precision; TF32 GEMMs here) "
                  "against f16 (generate, warm and peak; widened / f16):")
            print(f"  {row['case']:38} {ms(widened)} vs {ms(ours)}  {ratio(widened, ours, 'warm')}   "
                  f"{gb(widened)} vs {gb(ours)}  {ratio(widened, ours, 'peak')}")
    print("\nCUDA graphs (UNet, text encoders) against one kernel at a time (generate, warm; graphs / none):")
    for row in rows:
        ours, plain = row["worker"], row["no_graphs"]
        if plain or ours:
            off = " (graphs were OFF: one failed, see the log)" if ours and ours["graphs_off"] else ""
            print(f"  {row['case']:38} {ms(ours)} vs {ms(plain)}  {ratio(ours, plain, 'warm')}{off}")
    print("\nOur kernels against candle's (generate, warm; ours / candle's; no graphs with candle's):")
    for row in rows:
        ours, candle = row["worker"], row["candle_kernels"]
        off = " (ours were OFF: their check failed, see the log)" if ours and ours["kernels_off"] else ""
        print(f"  {row['case']:38} {ms(ours)} vs {ms(candle)}  {ratio(ours, candle, 'warm')}{off}")
    if linear:
        print("\nThe transformers' linear layers: candle's (the `kernels` bench) against torch's F.linear on the "
              "same shapes (f16, guided, one call; candle / torch):")
        print(linear)
    print("\nThe memory estimate against the peak (generate; the peak includes the CUDA context, about "
          "0.5 GB, which the estimate leaves to the budget's margin):")
    for row in rows + tight + catalog:
        ours = row["worker"]
        estimate = ours and ours.get("estimate")
        if estimate:
            measured = ours["peak"] - estimate["weights"]
            print(f"  {row['case']:38} weights {estimate['weights'] / 1e9:5.2f} GB, working estimated "
                  f"{estimate['working'] / 1e9:5.2f} GB, peak less weights {measured / 1e9:5.2f} GB "
                  f"({estimate['working'] / measured if measured > 0 else float('nan'):.2f}×)"
                  + ("; the steps' memory handed back before the decode" if estimate["handed_back"] else ""))
            pools = ours.get("pools")
            if pools:
                print("  " + " " * 38 + " " + pool_summary(pools, estimate, ours["peak"]))
    races = next((row["worker"]["races"] for row in rows if row["worker"] and row["worker"].get("races")), [])
    if races:
        print("\nOur kernels timed at the worker's start against what would run instead (the first case's):")
        for line in races:
            print(f"  {line}")
    for row in rows:
        if row["profiled"]:
            print(f"\n{row['case']}, profiled (GPU time between events around each kind of work):\n"
                  f"{row['profiled']['profile']}")
    if tight:
        print("\nOn cards with less memory (a ballast process leaving that much of the GPU free; generate, "
              "warm, against the same case with the whole card):")
    for entry in tight:
        result = entry["worker"]
        whole = next((row["worker"] for row in rows if entry["case"].startswith(row["case"] + ",")), None)
        if result:
            print(f"  {entry['case']:46} ({entry['card']}): {ms(result).strip()} warm "
                  f"({ratio(result, whole, 'warm').strip()} the whole card's), peak {gb(result).strip()}, "
                  f"first {ms(result, 'first').strip()}; "
                  f"{' '.join(result['plans']) or 'the fastest plan'}"
                  + (f"; text encoders brought onto the GPU for each job's prompts: {visits_summary(result['visits'])}"
                     if result.get("visits") else ""))
        else:
            print(f"  {entry['case']:46} ({entry['card']}): failed (its error is above)")
    if catalog:
        print("\nThe catalog's rows no case above measures (generate, warm, with the whole card; the peak "
              "with the CUDA context against the catalog's min_gpu_mb, estimated for them until now):")
        said = attempt("the catalog's min_gpu_mb", lambda: catalog_min_gpu_mb(args.worker)) or {}
    for entry in catalog:
        result = entry["worker"]
        if result:
            print(f"  {entry['case']:38} {ms(result).strip()} warm, peak {gb(result).strip()} = "
                  f"{result['peak'] / 2**20:.0f} MiB; the catalog says {said.get(entry['catalog_id'])} MiB "
                  f"for {entry['catalog_id']}")
        else:
            print(f"  {entry['case']:38} not measured (skipped or failed: said above)")
    with open(os.path.join(args.models, "results.json"), "w") as out:
        json.dump({"device": memory.name(), "driver": memory.driver(), "rows": rows, "tight": tight,
                   "catalog": catalog, "linear": linear}, out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "make":
        make_pipelines(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "diffusers":
        diffusers_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]))
    elif len(sys.argv) > 1 and sys.argv[1] == "torch-linear":
        torch_linear_child(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "ballast":
        ballast_child(float(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--check-here":
        check_table()
        check_here()
    else:
        main()
