"""Training throughput: the training step against the bare model passes it is made of, per model family.

    python benchmarks/train_throughput.py                                       # tiny models of every family, CPU
    python benchmarks/train_throughput.py --full-sdxl --device cpu --latent-size 16   # full-size SDXL UNet, CPU, 128 px
    python benchmarks/train_throughput.py --full-sdxl --device cuda                    # full-size SDXL UNet, GPU, 1024 px
    python benchmarks/train_throughput.py --full-sdxl --dry-run                        # build the config on the meta device
    python benchmarks/train_throughput.py --full wan21_1.3b --latent-size 16 --frames 5   # Wan 2.1 1.3B, CPU, 5 frames at 128 px
    python benchmarks/train_throughput.py --full wan21,wan22,qwen_image,chroma --device cuda   # full size at each family's default
    python benchmarks/train_throughput.py --trainer                             # the whole trainer end to end, tiny models
    python benchmarks/train_throughput.py --reward-memory --latent-size 64 --repeats 1  # Learn to Guide's CLIP reward, SD1.5, 512 px

``--full`` takes the networks of ``training.tiny_models.FULL_SIZE`` (sd3 = SD3.5 large, sd35_medium, wan21_1.3b, wan21 =
14B, wan22 = TI2V-5B, wan22_a14b = one A14B expert, qwen_image, chroma), random weights, with the family's own backend
(its packing, masks, per-token timesteps) and random text rows of the family's shape; by default on a GPU at the family's
default resolution and frames (Wan 2.1: 480 px x 81 frames; 2.2: 704 px; Qwen-Image, Chroma: 1024 px), and on the CPU
at ``--latent-size`` / ``--frames``. ``--fsdp`` is not measured here (it needs several processes: run the trainer).

Per family, these phases are timed on the same inputs, interleaved (``--repeats`` rounds, medians reported):

* step:     what the trainer does per micro-batch after data loading: Algorithm 1's loss (``training.algorithm.annealing_loss``:
            draws, CADS, both passes through the backend, the MLP, the CFG++ step, the loss), its backward and an AdamW
            step (every micro-batch here; the trainer steps every ``gradient_accumulation`` micro-batches, so this is an
            upper bound);
* passes:   the model passes that step is made of, called on the network directly with prepared inputs: a forward of
            batch 2B without a graph, a forward of batch 2B with one, and the backward of that forward to its input;
* 4 calls:  the same passes as the trainer made them before uncond and cond were batched (four forwards of batch B);
* l2g step: what ``--method learn-to-guide`` does per micro-batch: ``training.learn_to_guide.learn_to_guide_loss`` (draws,
            m particles noised, one network call of batch 2Bm without a graph, the guided step, the energy distance), its
            backward (through the small network only) and an AdamW step;
* l2g pass: the network call that step is made of (a forward of batch 2Bm without a graph).

``step / passes - 1`` is the overhead of everything that is not the network (target: under 10 %); the last line of each
model compares Learn to Guide's step with annealing's, per training image (``--methods`` picks the methods). Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU (absolute, and above what was allocated before the phase) and the peak
resident set on the CPU (Linux: reset between the phases via /proc/self/clear_refs; absolute only, since memory a phase
frees stays resident). The full-size SDXL UNet
(2.57 B parameters, ``training.tiny_models.SDXL_UNET_CONFIG``) has random weights and random 77 x 2048 text embeddings
(nothing is downloaded); VAE and text encoders are excluded (``python -m training embed`` runs them once). The frozen
network runs in the trainer's default precision for the device (``--precision`` to change it) with gradient checkpointing
as the trainer would decide (``--checkpointing on|off`` to force it).

``--reward-memory`` measures Learn to Guide's reward variant (``--l2g-reward clip``) on a full-size config: SD1.5's UNet,
its VAE and CLIP ViT-L/14, all with random weights, at ``--latent-size`` (64 = 512 px), fp32, m = ``--particles``: the
peak memory and time of one ``l2g step`` without the reward and one with it (the VAE decode of each image's guided
x0-prediction, CLIP's image tower and their backward to the latents, on top).

``--trainer`` runs ``python -m training``'s trainer end to end on 64 px tiny models (image decoding, VAE, text
encoders, the passes, backward, AdamW), for each method of ``--methods``, each run in its own subprocess so the peak resident memory is that run's
alone: a pipeline-overhead check, not a prediction of real-model speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------------------------ memory


class PeakMemory:
    """Peak memory of one phase: CUDA's allocator peak, or the peak resident set (Linux) on the CPU."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int | None:
        from training.memory import process_memory_bytes

        return process_memory_bytes(field)

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                    handle.write("5")
                self.base = self._status("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = self._status("VmHWM") if self.base is not None else None
        return False

    def text(self) -> str:
        if self.peak is None:
            return "n/a"
        if self.device.type != "cuda":  # freed heap memory stays resident, so only the absolute peak means something
            return f"{self.peak / 2**30:.2f}"
        return f"{self.peak / 2**30:.2f} (+{(self.peak - self.base) / 2**30:.2f})"


# ------------------------------------------------------------------------------------------------------------ the three phases


def direct_call(backend) -> bool:
    """SD1.x/SD2.x/SDXL/SD3: the passes call the network as the pipelines do (the measurements before the families);
    the other families' passes go through ``backend.predict`` (their packing and masks are part of the call)."""
    from training.backends import family_class
    from training.backends.unet import UNetFamily

    return isinstance(backend, (UNetFamily, family_class("sd3")))


def prepared_inputs(backend, grid, batch: int, cond, uncond, generator):
    """The network's inputs for both passes as the backend would build them (batch 2B, backend dtype), made once."""
    import torch

    from training.backends import TextCondition

    device, dtype = backend.device, backend.dtype
    both = TextCondition.stack_pair(uncond, cond, batch)
    if not direct_call(backend):
        index = torch.full((batch,), len(grid) // 2, device=device)
        z = torch.randn((batch, *backend.latent_shape), generator=generator, device=generator.device).to(device)
        return {"z": z, "t": grid.model_timesteps[index], "both": both, "single": {"u": uncond.expand(batch), "c": cond}}
    index = torch.full((batch,), len(grid) // 2, device=device)
    t = grid.model_timesteps[index]
    latent = (batch, *backend.latent_shape)
    z = torch.randn(latent, generator=generator, device=generator.device).to(device)
    kwargs = {}
    if backend.prediction == "velocity":
        kwargs = {"encoder_hidden_states": both.embeds.to(dtype), "pooled_projections": both.pooled.to(dtype)}
    else:
        kwargs = {"encoder_hidden_states": both.embeds.to(dtype)}
        if backend.info.family == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": both.pooled.to(dtype), "time_ids": backend.time_ids.expand(2 * batch, -1).to(dtype)}
    single = {}  # the old way: the same inputs cut into uncond and cond halves of batch B
    for half, rows in (("u", slice(0, batch)), ("c", slice(batch, 2 * batch))):
        part = {k: v[rows] for k, v in kwargs.items() if torch.is_tensor(v)}
        if "added_cond_kwargs" in kwargs:
            part["added_cond_kwargs"] = {k: v[rows] for k, v in kwargs["added_cond_kwargs"].items()}
        single[half] = part
    return {"z": z, "t": t, "kwargs": kwargs, "single": single}


def call_network(backend, z, t, kwargs):
    import torch

    if not isinstance(kwargs, dict):  # a TextCondition: the family's own call
        return backend.predict(z, t, kwargs)
    if backend.prediction == "velocity":
        return backend.network(hidden_states=z.to(backend.dtype), timestep=t.to(torch.float32), **kwargs).sample
    return backend.network(z.to(backend.dtype), t, **kwargs).sample


def bare_passes(backend, inputs) -> None:
    """A forward of batch 2B without a graph, a forward of batch 2B with one, and its backward to the input."""
    import torch

    z2, t2 = torch.cat([inputs["z"], inputs["z"]]), torch.cat([inputs["t"], inputs["t"]])
    conditions = inputs.get("kwargs", inputs.get("both"))
    with torch.no_grad():
        call_network(backend, z2, t2, conditions)
    z_grad = inputs["z"].detach().requires_grad_()
    out = call_network(backend, torch.cat([z_grad, z_grad]), t2, conditions)
    out.backward(torch.ones_like(out))


def four_calls(backend, inputs) -> None:
    """The same passes as four forwards of batch B (uncond and cond apart), as the trainer made them before batching."""
    import torch

    z, t = inputs["z"], inputs["t"]
    with torch.no_grad():
        call_network(backend, z, t, inputs["single"]["u"])
        call_network(backend, z, t, inputs["single"]["c"])
    z_grad = z.detach().requires_grad_()
    out = call_network(backend, z_grad, t, inputs["single"]["u"]) - call_network(backend, z_grad, t, inputs["single"]["c"])
    out.backward(torch.ones_like(out))


def l2g_pass(backend, inputs, particles: int) -> None:
    """Learn to Guide's network work: one forward of batch 2Bm without a graph (uncond and cond of m particles per image)."""
    import torch

    z, t = inputs["z"].repeat_interleave(particles, dim=0), inputs["t"].repeat_interleave(particles)
    batch = inputs["z"].shape[0]
    if "both" in inputs:
        both = inputs["both"]
        half = both.embeds.shape[0] // 2
        kwargs = type(both)(*(None if x is None else torch.cat([x[:half].repeat_interleave(particles, 0), x[half:].repeat_interleave(particles, 0)])
                              for x in (both.embeds, both.pooled, both.mask)))
        with torch.no_grad():
            call_network(backend, torch.cat([z, z]), torch.cat([t, t]), kwargs)
        return
    kwargs = {k: _particle_rows(v, batch, particles) for k, v in inputs["kwargs"].items()}
    with torch.no_grad():
        call_network(backend, torch.cat([z, z]), torch.cat([t, t]), kwargs)


def _particle_rows(value, batch: int, particles: int):
    """Rows [uncond (B); cond (B)] of a network input as [uncond (Bm); cond (Bm)]."""
    if isinstance(value, dict):
        return {k: _particle_rows(v, batch, particles) for k, v in value.items()}
    return value.repeat_interleave(particles, dim=0) if value.shape[0] == 2 * batch else value


def measure(name: str, backend, grid, batch: int, repeats: int, warmup: int, generator, methods=("annealing", "learn-to-guide"),
            particles: int = 4) -> dict:
    """Median seconds per micro-batch of each phase (see the module docstring) and their peak memories."""
    import torch

    import annealing
    from training.algorithm import annealing_loss
    from training.learn_to_guide import learn_to_guide_loss
    from training.run_parts import initial_l2g_network

    device = backend.device
    cond, uncond = random_conditions(backend, batch, generator)
    x0 = torch.randn(batch, *backend.latent_shape, generator=generator, device=generator.device).to(device)
    mlp = annealing.GuidanceScaleModel().to(device)
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=0.01)
    inputs = prepared_inputs(backend, grid, batch, cond, uncond, generator)

    def step():
        terms = annealing_loss(backend, mlp, x0, cond, uncond, grid, generator=generator)
        terms.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    phases = {}
    if "annealing" in methods:
        phases = {"step": step, "passes": lambda: bare_passes(backend, inputs)}
        if direct_call(backend):
            phases["4 calls"] = lambda: four_calls(backend, inputs)
    if "learn-to-guide" in methods:
        width, pooled = backend.condition_width()
        kind, width = ("pooled", pooled) if pooled is not None else ("mean_tokens", width)
        schedule = annealing.CheckpointMetadata(model_family=backend.info.family, timestep_convention=grid.timestep_convention,
                                                training_grid=grid.training_grid, method="learn_to_guide")
        net = initial_l2g_network(annealing.LearnToGuideConfig(prompt_dim=width, prompt_embedding=kind), 3.0, schedule).to(device)
        l2g_opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
        prompt = annealing.prompt_embedding(cond.embeds, cond.pooled, kind, width)

        def l2g_step():
            terms = learn_to_guide_loss(backend, net, x0, cond, uncond, grid, prompt, particles=particles, generator=generator)
            terms.total.backward()
            l2g_opt.step()
            l2g_opt.zero_grad(set_to_none=True)

        phases.update({"l2g step": l2g_step, "l2g pass": lambda: l2g_pass(backend, inputs, particles)})
    for fn in phases.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in phases}
    peaks = {}
    for r in range(repeats):
        order = list(phases) if r % 2 == 0 else list(reversed(phases))  # alternate, so drift on a shared machine evens out
        for key in order:
            with PeakMemory(device) as peak:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                phases[key]()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[key].append(time.perf_counter() - start)
            if key not in peaks or (peak.peak or 0) > (peaks[key].peak or 0):
                peaks[key] = peak
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"name": name, "batch": batch, "seconds": medians, "all": times, "peaks": {k: p.text() for k, p in peaks.items()},
            "particles": particles}


#: Each phase and the bare network work it is compared with.
BASES = {"step": "passes", "passes": None, "4 calls": "passes", "l2g step": "l2g pass", "l2g pass": None}


def print_rows(rows: list[dict], memory_unit: str) -> None:
    above = " (+ above the phase's start)" if memory_unit == "GiB" else ""
    print(f"{'model':16} {'B':>2} {'phase':8} {'s/micro-batch':>13} {'images/s':>9} {'vs pass':>9}  peak {memory_unit}{above}")
    for row in rows:
        seconds_of = row["seconds"]
        for key in [k for k in BASES if k in seconds_of]:
            seconds, base = seconds_of[key], BASES[key]
            ratio = f"{seconds / seconds_of[base] - 1:+.1%}" if base else ""
            print(f"{row['name']:16} {row['batch']:2d} {key:8} {seconds:13.4f} {row['batch'] / seconds:9.3f} {ratio:>9}  {row['peaks'][key]}")
        spread = ", ".join(f"{k} {min(v):.4g}-{max(v):.4g}" for k, v in row["all"].items())
        print(f"{'':16}    range over {len(next(iter(row['all'].values())))} rounds (s): {spread}")
        if "step" in seconds_of and "l2g step" in seconds_of:
            print(f"{'':16}    learn-to-guide step ({row['particles']} particles) / annealing step: "
                  f"{seconds_of['l2g step'] / seconds_of['step']:.2f} x the time per training image")


#: Text rows each family's pipeline passes: (token rows, rows that are the prompt, masked?). Wan pads UMT5 to 512 with
#: zeros and no mask; Qwen-Image pads to the longest prompt under a mask; Chroma pads T5 to 512 under its mask.
TEXT_ROWS = {"sd15": (77, 77, False), "sd2": (77, 77, False), "sdxl": (77, 77, False), "sd3": (333, 333, False), "wan21": (512, 100, False),
             "wan22": (512, 100, False), "qwen_image": (200, 200, True), "chroma": (512, 101, True)}


def random_conditions(backend, batch: int, generator):
    """Random conditional rows of the family's shape and an unconditional row of zeros (with the same mask)."""
    import torch

    from training.backends import TextCondition

    device = backend.device
    width, pooled = backend.condition_width()
    tokens, prompt, masked = TEXT_ROWS[backend.info.family]
    embeds = torch.randn(batch, tokens, width, generator=generator, device=generator.device).to(device)
    embeds[:, prompt:] = 0
    mask = (torch.arange(tokens, device=device) < prompt).float().expand(batch, -1).contiguous() if masked else None
    cond = TextCondition(embeds, None if pooled is None else torch.randn(batch, pooled, generator=generator, device=generator.device).to(device), mask)
    uncond = TextCondition(torch.zeros(1, tokens, width, device=device), None if pooled is None else torch.zeros(1, pooled, device=device),
                           None if mask is None else mask[:1])
    return cond, uncond


# ------------------------------------------------------------------------------------------------------------ models


def tiny_backend(kind: str, root: Path, device: str, precision: str, checkpointing):
    from training.config import TrainConfig
    from training.tiny_models import make_image_dataset, make_tiny_model
    from training.trainer import Trainer

    model = make_tiny_model(kind, root / kind)
    data = make_image_dataset(root / "data", count=4)
    config = TrainConfig(model=str(model), dataset=str(data), output=str(root / f"out-{kind}"), resolution=64, num_workers=0,
                         device=device, precision=precision, gradient_checkpointing=checkpointing, frames=1)
    trainer = Trainer(config, progress=False)
    trainer.preflight()
    trainer.setup()
    trainer.backend.latent_shape = trainer.latent_shape
    return trainer.backend, trainer.grid


def build_full_sdxl(device, dtype):
    import torch
    from diffusers import UNet2DConditionModel

    from training.tiny_models import SDXL_UNET_CONFIG

    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return unet.to(dtype).requires_grad_(False).eval()


def full_sdxl_backend(unet, device, dtype, latent_size: int):
    """The SDXL backend around a bare UNet (no VAE, no text encoders)."""
    from types import SimpleNamespace

    from annealing.training_grid import VPGrid
    from training.algorithm import CADSConfig
    from training.backends import ModelInfo, family_class
    from training.tiny_models import SDXL_UNET_CONFIG

    info = ModelInfo(family="sdxl", prediction_type="epsilon", pipeline_class="StableDiffusionXLPipeline", scheduler_class="DDIMScheduler",
                     scheduler_config={}, source=Path("sdxl-random"), config_folder=Path("."), network_config=dict(SDXL_UNET_CONFIG))
    scheduler = SimpleNamespace(alphas_cumprod=VPGrid().alphas_cumprod().float())
    backend = family_class("sdxl")(info, unet, None, None, dtype, device, CADSConfig(), latent_size * 8, "zeros", scheduler=scheduler)
    backend.latent_shape = (4, latent_size, latent_size)
    return backend


#: What detection would read for each full-size network: (family, pipeline, scheduler config, VAE config, details).
_WAN_VAE = {"z_dim": 16, "scale_factor_spatial": 8, "scale_factor_temporal": 4, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}
_DYNAMIC = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": 0.5, "num_train_timesteps": 1000}
FULL_FAMILY = {
    "sd3": ("sd3", "StableDiffusion3Pipeline", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, {"latent_channels": 16,
            "block_out_channels": [128, 256, 512, 512]}, {}),
    "wan21": ("wan21", "WanPipeline", {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction",
              "flow_shift": 5.0}, _WAN_VAE, {}),
    "wan22": ("wan22", "WanPipeline", {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction",
              "flow_shift": 5.0}, dict(_WAN_VAE, z_dim=48, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48),
              {"variant": "ti2v_5b", "boundary_ratio": None, "expand_timesteps": True}),
    "wan22_a14b": ("wan22", "WanPipeline", {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction",
                   "flow_shift": 12.0}, _WAN_VAE, {"variant": "a14b", "boundary_ratio": 0.875, "expand_timesteps": False}),
    "qwen_image": ("qwen_image", "QwenImagePipeline", dict(_DYNAMIC, max_shift=0.9, max_image_seq_len=8192, base_image_seq_len=256,
                   shift_terminal=0.02), {"z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}, {}),
    "chroma": ("chroma", "ChromaPipeline", dict(_DYNAMIC, max_shift=1.15, max_image_seq_len=4096, base_image_seq_len=256),
               {"latent_channels": 16, "block_out_channels": [128, 256, 512, 512]}, {}),
}
FULL_FAMILY["sd35_medium"] = FULL_FAMILY["sd3"]
FULL_FAMILY["wan21_1.3b"] = ("wan21", "WanPipeline", dict(FULL_FAMILY["wan21"][2], flow_shift=3.0), _WAN_VAE, {})  # 480p: shift 3


def build_full(name: str, device, dtype):
    """A full-size network of ``training.tiny_models.FULL_SIZE`` with random weights, frozen, in ``dtype``."""
    import diffusers
    import torch

    from training.backends.loading import cast_like_from_pretrained
    from training.tiny_models import FULL_SIZE

    class_name, config = FULL_SIZE[name]
    with torch.device(device):
        network = getattr(diffusers, class_name)(**config)
    return cast_like_from_pretrained(network, dtype).requires_grad_(False).eval()  # as from_pretrained(torch_dtype=...) loads it


def full_info(name: str):
    """What detection would say of the full-size network's folder."""
    from training.backends import ModelInfo
    from training.tiny_models import FULL_SIZE

    family, pipeline, scheduler_config, vae_config, details = FULL_FAMILY[name]
    return ModelInfo(family=family, prediction_type="flow", pipeline_class=pipeline, scheduler_class=scheduler_config["_class_name"],
                     scheduler_config=scheduler_config, source=Path(f"{name}-random"), config_folder=Path("."),
                     network_config=dict(FULL_SIZE[name][1]), vae_config=vae_config, details=details)


def full_backend(info, network, device, dtype, resolution: int, frames: int):
    """The family's backend around a bare full-size network (no VAE, no text encoders, no scheduler object)."""
    from training.algorithm import CADSConfig

    cls = info.spec
    backend = cls(info, network, None, None, dtype, device, CADSConfig(), resolution, "empty_prompt", frames=frames if cls.video else 1,
                  expert="high" if info.details.get("variant") == "a14b" else "auto")
    backend.latent_shape = backend.sample_shape
    return backend


def checkpointing_decision(backend, grid, batch: int, forced):
    """The trainer's decision (training.memory), or the forced one; prints the trainer's line."""
    import torch

    from training import memory

    estimate = None
    if forced is None:
        _, uncond = random_conditions(backend, batch, torch.Generator(device=backend.device).manual_seed(0))
        try:
            estimate = memory.estimate_step_memory(backend, grid, backend.latent_shape, batch, uncond)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    on, line = memory.decide(forced, estimate, backend.device)
    if on:
        backend.network.enable_gradient_checkpointing()
    else:
        backend.network.disable_gradient_checkpointing()
    print(line)
    return on


def resolve_dtype(precision: str, device):

    from training.run_parts import resolve_precision

    return resolve_precision(precision, device)


def run_models(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    forced = {"auto": None, "on": True, "off": False}[args.checkpointing]
    methods = tuple(args.methods.split(","))
    if not set(methods) <= {"annealing", "learn-to-guide"} or not methods:
        raise SystemExit(f"--methods: annealing and/or learn-to-guide, got {args.methods!r}")
    generator = torch.Generator(device=device).manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    if args.full:
        from training.run_parts import resolve_precision

        for full in args.full.split(","):
            info = full_info(full)
            cls = info.spec
            dtype = resolve_precision(args.precision, device, cls.half_precision(info))  # as the trainer decides it
            if args.dry_run:
                network = build_full(full, "meta", dtype)
                print(f"{full}: {sum(p.numel() for p in network.parameters()) / 1e9:.3f} B parameters (meta device)")
                continue
            on_gpu = device.type == "cuda" and not args.latent_size_given
            resolution = cls.default_resolution if on_gpu else args.latent_size * (16 if full == "wan22" else 8)
            frames = (cls.default_frames if on_gpu else args.frames) if cls.video else 1
            torch.manual_seed(0)
            network = build_full(full, device, dtype)
            backend = full_backend(info, network, device, dtype, resolution, frames)
            grid = backend.grid(args.grid_steps)
            print(f"{full} ({sum(p.numel() for p in network.parameters()) / 1e9:.2f} B parameters, random weights) on {name}, frozen network in "
                  f"{str(dtype).replace('torch.', '')}, latent {' x '.join(map(str, backend.sample_shape))} ({resolution} px"
                  f"{f', {frames} frames' if cls.video else ''}), {args.repeats} rounds after {args.warmup} warm-up")
            for batch in [int(b) for b in args.batches.split(",")]:
                on = checkpointing_decision(backend, grid, batch, forced)
                rows.append(measure(f"{full}{' ckpt' if on else ''}", backend, grid, batch, args.repeats, args.warmup, generator, methods,
                                    args.particles))
            del network, backend
            if device.type == "cuda":
                torch.cuda.empty_cache()
    elif args.full_sdxl:
        dtype = resolve_dtype(args.precision, device)
        if args.dry_run:
            unet = build_full_sdxl("meta", dtype)
            print(f"full-size SDXL UNet config builds: {sum(p.numel() for p in unet.parameters()) / 1e9:.3f} B parameters (meta device)")
            return
        torch.manual_seed(0)
        unet = build_full_sdxl(device, dtype)
        backend = full_sdxl_backend(unet, device, dtype, args.latent_size)
        grid = backend.grid(50)
        print(f"full-size SDXL UNet ({sum(p.numel() for p in unet.parameters()) / 1e9:.2f} B parameters, random weights) on {name}, "
              f"torch {torch.__version__}, frozen network in {str(dtype).replace('torch.', '')}, latent 4 x {args.latent_size} x "
              f"{args.latent_size} ({args.latent_size * 8} px), {args.repeats} rounds after {args.warmup} warm-up")
        for batch in [int(b) for b in args.batches.split(",")]:
            on = checkpointing_decision(backend, grid, batch, forced)
            rows.append(measure(f"sdxl-full{' ckpt' if on else ''}", backend, grid, batch, args.repeats, args.warmup, generator, methods,
                                args.particles))
    else:
        print(f"tiny models on {name}, torch {torch.__version__}, 64 px (8 x 8 latents), {args.repeats} rounds after {args.warmup} warm-up")
        with tempfile.TemporaryDirectory() as tmp:
            for kind in args.kinds.split(","):
                backend, grid = tiny_backend(kind, Path(tmp), args.device, args.precision, forced)
                for batch in [int(b) for b in args.batches.split(",")]:
                    rows.append(measure(f"{kind}-tiny", backend, grid, batch, args.repeats, args.warmup, generator, methods, args.particles))
    print()
    print_rows(rows, "GiB" if device.type == "cuda" else "RSS GiB")


# ------------------------------------------------------------------------------------------------------------ the reward


def run_reward_memory(args) -> None:
    """Peak memory (and time) of a Learn to Guide step with and without the CLIP reward, full-size SD1.5 + VAE + CLIP."""
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    import annealing
    from annealing.training_grid import VPGrid
    from training.algorithm import CADSConfig
    from training.backends import ModelInfo, TextCondition, UNetBackend
    from training.learn_to_guide import learn_to_guide_loss
    from training.reward import ClipReward, latent_reward
    from training.run_parts import initial_l2g_network
    from training.tiny_models import CLIP_VIT_L14_CONFIG, SD15_UNET_CONFIG, SD_VAE_CONFIG, make_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, size = torch.device(args.device), torch.float32, args.latent_size
    torch.manual_seed(0)
    with torch.device(device):
        unet, vae = UNet2DConditionModel(**SD15_UNET_CONFIG), AutoencoderKL(**SD_VAE_CONFIG)
        clip = CLIPModel(CLIPConfig(**CLIP_VIT_L14_CONFIG))
    info = ModelInfo(family="sd15", prediction_type="epsilon", pipeline_class="StableDiffusionPipeline", scheduler_class="DDIMScheduler",
                     scheduler_config={}, source=Path("sd15-random"), config_folder=Path("."), network_config=dict(SD15_UNET_CONFIG))
    scheduler = SimpleNamespace(alphas_cumprod=VPGrid().alphas_cumprod().float())
    backend = UNetBackend(info, unet.to(dtype), vae.to(dtype), None, dtype, device, CADSConfig(), size * 8, "zeros", scheduler=scheduler)
    grid = backend.grid(50)
    reward = ClipReward(clip.to(dtype), make_tokenizer())
    counts = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in (("UNet", unet), ("VAE", vae), ("CLIP", clip))}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"reward memory: SD1.5 UNet {counts['UNet']:.0f} M + VAE {counts['VAE']:.0f} M + CLIP ViT-L/14 {counts['CLIP']:.0f} M parameters "
          f"(random weights, fp32) on {name}, torch {torch.__version__}, latent 4 x {size} x {size} ({size * 8} px), "
          f"{args.particles} particles, micro-batch 1")
    generator = torch.Generator(device=device).manual_seed(0)
    cond = TextCondition(torch.randn(1, 77, 768, generator=generator, device=device))
    uncond = TextCondition(torch.zeros(1, 77, 768, device=device))
    x0 = torch.randn(1, 4, size, size, generator=generator, device=device)
    schedule = annealing.CheckpointMetadata(model_family="sd15", training_grid=grid.training_grid, method="learn_to_guide")
    net = initial_l2g_network(annealing.LearnToGuideConfig(prompt_dim=768, prompt_embedding="mean_tokens"), 3.0, schedule).to(device)
    prompt = cond.embeds.mean(dim=1)

    def step(with_reward: bool):
        score = latent_reward(vae, reward, ["a photograph of a cat"]) if with_reward else None
        terms = learn_to_guide_loss(backend, net, x0, cond, uncond, grid, prompt, particles=args.particles, generator=generator,
                                    reward=score, reward_weight=1.0)
        terms.total.backward()
        net.zero_grad(set_to_none=True)

    print(f"{'phase':18} {'seconds':>8}  peak {'GiB' if device.type == 'cuda' else 'RSS GiB'}")
    for label, with_reward in (("l2g step", False), ("l2g step + reward", True)):
        for _ in range(max(args.repeats, 1)):
            with PeakMemory(device) as peak:
                start = time.perf_counter()
                step(with_reward)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
            print(f"{label:18} {seconds:8.1f}  {peak.text()}", flush=True)


# ------------------------------------------------------------------------------------------------------------ whole trainer


def tiny_child(kind: str, steps: int, accumulation: int, batch: int, threads: int, method: str = "annealing") -> dict:
    """One tiny-model training run in this process; returns the measured numbers."""
    import torch

    from training.config import TrainConfig
    from training.tiny_models import make_image_dataset, make_tiny_model
    from training.trainer import train

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(kind, root / kind)
        data = make_image_dataset(root / "data", count=32)
        config = TrainConfig(model=str(model), dataset=str(data), output=str(root / "out"), resolution=64, max_steps=steps,
                             gradient_accumulation=accumulation, batch_size=batch, num_workers=0, device="cpu", checkpoint_every=10**6,
                             method=method, frames=1)  # the video families train on the images as one-frame clips
        result = train(config, progress=False)
    return {"kind": kind, "method": method, "images_per_second": result.images_per_second, "images": result.images_seen, "seconds": result.seconds,
            "peak_rss_mib": result.peak_memory_bytes / 2**20, "batch": batch}


def run_trainer(args) -> None:
    import torch

    threads = args.threads or 1
    print(f"whole trainer, tiny models on CPU: torch {torch.__version__}, {threads} thread(s), {args.steps} steps x {args.accumulation} "
          f"micro-batches of {args.batch}, 64 px")
    print(f"{'model':6} {'method':15} {'images/s':>9} {'peak RSS MiB':>13}")
    for kind in args.kinds.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps), "--accumulation", str(args.accumulation),
                   "--batch", str(args.batch), "--threads", str(threads), "--methods", method]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{kind} {method}: failed\n{done.stderr[-2000:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{kind:6} {method:15} {row['images_per_second']:9.2f} {row['peak_rss_mib']:13.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="sd15,sdxl,sd3,wan21,wan22,qwen_image,chroma", help="tiny models to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="auto", help="frozen network dtype as the trainer's --precision (auto: the trainer's default)")
    parser.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto", help="gradient checkpointing (auto: as the trainer decides)")
    parser.add_argument("--batches", default="1", help="micro-batch sizes B")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; --trainer: 1)")
    parser.add_argument("--methods", default="annealing,learn-to-guide", help="training methods to time (comma-separated)")
    parser.add_argument("--particles", type=int, default=4, help="learn-to-guide particles per image (the trainer's default 4)")
    parser.add_argument("--full-sdxl", action="store_true", help="full-size SDXL UNet with random weights")
    parser.add_argument("--full", help="full-size networks of other families (comma-separated FULL_SIZE keys: wan21_1.3b, wan21, wan22, ...)")
    parser.add_argument("--latent-size", type=int, default=None, help="--full-sdxl: latent side (default 128 = 1024 px); --full: latent side on "
                        "the CPU (default 16 = 128 px; on a GPU the family's default resolution unless given)")
    parser.add_argument("--frames", type=int, default=5, help="--full, video families on the CPU: frames (1 + 4k)")
    parser.add_argument("--grid-steps", type=int, default=50, help="--full: training grid steps")
    parser.add_argument("--dry-run", action="store_true", help="with --full-sdxl: build the config on the meta device only")
    parser.add_argument("--trainer", action="store_true", help="the whole trainer end to end on tiny models")
    parser.add_argument("--reward-memory", action="store_true", help="Learn to Guide's CLIP reward on SD1.5 + VAE + CLIP ViT-L/14 "
                        "(random weights): peak memory of a step with and without it (--latent-size 64: 512 px)")
    parser.add_argument("--steps", type=int, default=8, help="--trainer: optimizer steps")
    parser.add_argument("--accumulation", type=int, default=4, help="--trainer: micro-batches per step")
    parser.add_argument("--batch", type=int, default=1, help="--trainer: micro-batch size")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.latent_size_given = args.latent_size is not None
    if args.latent_size is None:
        args.latent_size = 16 if args.full else 128
    if args.child:
        print(json.dumps(tiny_child(args.child, args.steps, args.accumulation, args.batch, args.threads or 1, args.methods)))
    elif args.trainer:
        run_trainer(args)
    elif args.reward_memory:
        run_reward_memory(args)
    else:
        run_models(args)


if __name__ == "__main__":
    from training.interrupt import exit_on_ctrl_c

    with exit_on_ctrl_c("nothing was written: run it again for the numbers"):
        main()
