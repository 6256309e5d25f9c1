"""Per-step cost of the pack inside a real ComfyUI sampling loop, against ComfyUI's own CFGGuider on the same model.

    COMFYUI_PATH=/path/to/ComfyUI $COMFY_PY benchmarks/comfy_step_overhead.py [--threads 2] [--steps 200] [--repeats 7]
                                                                                [--device cpu|cuda] [--batch 1] [--keep-denormals]

Both guiders sample the same tiny network at SDXL's latent shape 4 x 128 x 128 with euler, so the model itself costs little
and the difference is ours. The A/B compares equal work: the two guiders steer the latent to different values, so the
network's cost must not depend on them. It is one 3x3 convolution plus time and prompt biases, clamped (no transcendental
function, no branch on a value), and denormal floats are flushed to zero: without that, plain CFG 7 drives the tiny model's
activations into denormals, which the CPU computes many times slower, and the baseline looked slower than the pack
(--keep-denormals shows it). The network's own cost on ordinary and on denormal inputs is printed to show it is the same.

The annealing side is the Annealing Guider node as a user builds it (hook, both sampling wrappers, the guidance and the
recorder, anchored mode), from the pack loaded the way ComfyUI loads custom nodes. Each pair runs both in a random order;
the overhead per step is the median over pairs of (annealing - CFG) / steps. A second figure times the pack's post-CFG
function itself inside the same loop (the hook and the guidance; the two wrappers run once per sampling run), which a noisy
machine moves far less than whole runs. On CUDA every run is synchronised at its end only, so a synchronisation inside a
step would show up as time.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_comfy(device: str):
    """ComfyUI from COMFYUI_PATH and the pack loaded into it, through the tests' helper for ComfyUI internals."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout and run with ComfyUI's python ($COMFY_PY)")
    sys.path.insert(0, str(REPO / "tests" / "comfyui"))
    import comfy_internals

    _, comfy_nodes = comfy_internals.import_comfy(path, cpu=device == "cpu")
    if not hasattr(comfy_nodes, "load_custom_node"):
        raise SystemExit(f"the module 'nodes' imported from {getattr(comfy_nodes, '__file__', '?')} is not ComfyUI's nodes.py")
    loaded, _, package = comfy_internals.load_pack(comfy_nodes, REPO)
    if not loaded:
        raise SystemExit("ComfyUI could not load the pack")
    return comfy_nodes, package


def fixed_cost_network(torch, context_dim: int):
    """The stand-in for the UNet: the same arithmetic whatever values it is given (see the module docstring)."""

    class FixedCostNetwork(torch.nn.Module):
        def __init__(self, channels=4):
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
            self.context = torch.nn.Linear(context_dim, channels)
            self.time = torch.nn.Linear(1, channels)

        @property
        def dtype(self):  # BaseModel.get_dtype() reads it
            return self.conv.weight.dtype

        def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
            h = self.conv(x) + self.time((timesteps.float() / 1000.0)[:, None].to(x.dtype))[:, :, None, None]
            if context is not None:
                h = h + self.context(context.mean(1).to(h.dtype))[:, :, None, None]
            return h.clamp(-2.0, 2.0)

    return FixedCostNetwork()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, what CI has)")
    parser.add_argument("--steps", type=int, default=200, help="euler steps per sampling run (default 200)")
    parser.add_argument("--repeats", type=int, default=7, help="A/B pairs (default 7)")
    parser.add_argument("--batch", type=int, default=1, help="latent batch (default 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormal floats (shows how they slow the baseline; not a fair comparison)")
    args = parser.parse_args(argv)

    comfy_nodes, package = load_comfy(args.device)
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy_tiny_models as tiny
    import torch

    torch.set_num_threads(args.threads)
    flushed = False if args.keep_denormals else torch.set_flush_denormal(True)  # False where the CPU cannot flush
    annealing = sys.modules[package.__name__ + ".annealing"]
    torch.manual_seed(0)
    mlp = annealing.GuidanceScaleModel(metadata=annealing.upstream_metadata()).eval().requires_grad_(False)  # the released size
    model = tiny.make_tiny_model("eps", seed=0)
    model.model.diffusion_model = fixed_cost_network(torch, tiny.CONTEXT_DIM)
    pos, neg = tiny.make_cond(1), tiny.make_cond(2)
    latent = torch.zeros(args.batch, 4, 128, 128)
    noise = comfy.sample.prepare_noise(latent, 1)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", args.steps).float()

    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(pos, neg)
    plain.set_cfg(7.0)
    settings = {"lambda": 0.4, "mode": "anchored", "normalize_delta_norm": True, "clamp_w": False, "w_min": 0.0, "w_max": 3.0,
                "active_start": 0.0, "active_end": 1.0}
    node = comfy_nodes.NODE_CLASS_MAPPINGS["AnnealingGuider"]
    annealed = node.execute(model=model, positive=pos, negative=neg, annealing_model=mlp, fallback_cfg=7.0, **settings).args[0]
    sampler = comfy.samplers.sampler_object("euler")
    device = comfy.model_management.get_torch_device()

    def timed(guider) -> float:
        with torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

    hook = annealed.annealing_hook
    inner, spent = hook.post_cfg, []

    def clocked(hook_args):  # the post-CFG function as ComfyUI calls it, timed (on CUDA, synchronised around it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = inner(hook_args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        spent.append(time.perf_counter() - start)
        return out

    timed(plain), timed(annealed)  # warm-up: model loading, first-call allocations, the grid table on the device
    network = network_cost(torch, model, device, args.batch)
    order = random.Random(0)
    pairs = []
    for _ in range(args.repeats):
        if order.random() < 0.5:
            p = timed(plain)
            pairs.append((p, timed(annealed)))
        else:
            a = timed(annealed)
            pairs.append((timed(plain), a))
    hook.post_cfg = clocked
    timed(annealed)
    hook.post_cfg = inner
    per_step = [(a - p) / args.steps * 1e3 for p, a in pairs]
    cfg_step = statistics.median(p for p, _ in pairs) / args.steps * 1e3
    ann_step = statistics.median(a for _, a in pairs) / args.steps * 1e3
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {args.threads} threads"
    denormals = "flushed" if flushed else ("kept (--keep-denormals)" if args.keep_denormals else "kept (this CPU cannot flush them)")
    print(f"device: {name}; torch {torch.__version__}; euler, {args.steps} steps, latent {args.batch}x4x128x128, {args.repeats} A/B pairs; "
          f"denormals {denormals}")
    print(f"network alone:    {network['normal']:.3f} ms per call on N(0,1) latents, {network['denormal']:.3f} ms on denormal ones "
          f"(cond and uncond batched, as both guiders call it)")
    print(f"CFGGuider:       {cfg_step:.3f} ms per step")
    print(f"Annealing Guider: {ann_step:.3f} ms per step")
    print(f"overhead:         {statistics.median(per_step):.3f} ms per step (median over pairs; min {min(per_step):.3f}, max {max(per_step):.3f})")
    fastest_cfg, fastest_ann = (min(run for run in side) / args.steps * 1e3 for side in zip(*pairs))
    print(f"fastest runs:     CFGGuider {fastest_cfg:.3f}, Annealing Guider {fastest_ann:.3f}, difference {fastest_ann - fastest_cfg:.3f} ms "
          f"per step (what a busy machine disturbs least)")
    print(f"post-CFG hook:    {statistics.median(spent) * 1e3:.3f} ms per step (median over {len(spent)} steps of one run; "
          f"ComfyUI's own CFG combine, which runs either way, is not in it)")


def network_cost(torch, model, device, batch: int, calls: int = 50) -> dict[str, float]:
    """Median ms of one network call (batch 2 x ``batch``: cond and uncond) on ordinary and on denormal inputs."""
    network = model.model.diffusion_model.to(device)
    t = torch.full((2 * batch,), 500.0, device=device)
    context = torch.randn(2 * batch, 3, 8, device=device)
    inputs = {"normal": torch.randn(2 * batch, 4, 128, 128, device=device)}
    inputs["denormal"] = inputs["normal"] * 1e-40  # below float32's smallest normal, 1.2e-38
    cost = {}
    with torch.inference_mode():
        for kind, x in inputs.items():
            times = []
            for _ in range(calls):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                network(x, t, context=context)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            cost[kind] = statistics.median(times) * 1e3
    return cost


if __name__ == "__main__":
    sys.path.append(str(REPO))  # last: ComfyUI's own 'nodes' module must stay first on the path
    from training.interrupt import exit_on_ctrl_c

    with exit_on_ctrl_c("nothing was written: run it again for the numbers"):
        main()
