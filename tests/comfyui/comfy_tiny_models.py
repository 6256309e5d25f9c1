"""Tiny real ComfyUI models for the integration tests (a ComfyUI BaseModel whose diffusion model is a small conv net, or an
exact Gaussian denoiser), and the stand-ins a workflow needs around them: a checkpoint loader node returning a tiny model,
a CLIP and a VAE with just enough of ComfyUI's interface (the fake server for PromptExecutor is in comfy_internals.py).

Import only after ComfyUI is on sys.path (the ``comfy_host`` fixture does that; the browser test's server does it too).
"""

from __future__ import annotations

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import torch

CONTEXT_DIM = 8


class TinyDiffusionModel(torch.nn.Module):
    """Stands in for the UNet/DiT: called as diffusion_model(x, t, context=..., transformer_options=..., **extra)."""

    def __init__(self, channels=4, context_dim=CONTEXT_DIM):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.context = torch.nn.Linear(context_dim, channels)
        self.time = torch.nn.Linear(1, channels)

    @property
    def dtype(self):  # BaseModel.get_dtype() reads it
        return self.conv.weight.dtype

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
        h = self.conv(x)
        h = h + self.time((timesteps.float() / 1000.0)[:, None].to(h.dtype))[:, :, None, None]
        if context is not None:
            h = h + self.context(context.mean(1).to(h.dtype))[:, :, None, None]
        return 2.0 * torch.tanh(h)


class TinyConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.LatentFormat
    sampling_settings = {}


class TinySDXL(TinyConfig):
    """Named like ComfyUI's SDXL config, so the family check sees 'sdxl'."""


TinySDXL.__name__ = "SDXL"


class TinySD3(TinyConfig):
    pass


TinySD3.__name__ = "SD3"


def make_tiny_model(kind: str = "eps", seed: int = 0, dtype=torch.float32, config=None):
    """A ModelPatcher around a tiny BaseModel: kind 'eps' (SDXL-like discrete), 'v' or 'const' (SD3-like flow, shift 3)."""
    torch.manual_seed(seed)
    model_type = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION,
                  "const": comfy.model_base.ModelType.FLOW}[kind]
    config_class = config or (TinySD3 if kind == "const" else TinySDXL)
    cfg = config_class({"disable_unet_model_creation": True})
    cfg.sampling_settings = {"shift": 3.0, "multiplier": 1000} if kind == "const" else {}
    base = comfy.model_base.BaseModel(cfg, model_type=model_type, device=torch.device("cpu"))
    base.diffusion_model = TinyDiffusionModel().to(dtype)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def make_cond(seed: int, tokens: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CONTEXT_DIM, generator=generator), {}]]


class GaussianDiffusionModel(torch.nn.Module):
    """The exact denoiser of x0 ~ N(mu(context), tau^2 I), returning what ComfyUI expects from the network (eps for EPS,
    the velocity for CONST). A well-trained model is smooth in x; this one is linear, so a sampler's error is its own
    discretisation error: the convergence tests use it (the random conv net above is stiff under strong guidance: plain
    CFG 14 on it is still 9 % away from 400 Euler steps at 200)."""

    def __init__(self, kind: str, channels=4, context_dim=CONTEXT_DIM, tau=0.6, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.kind, self.tau2 = kind, tau**2
        self.register_buffer("projection", torch.randn(context_dim, channels, generator=generator))
        self.register_buffer("pattern", torch.randn(channels, 8, 8, generator=generator))

    @property
    def dtype(self):
        return self.projection.dtype

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
        sigma = transformer_options["sigmas"].to(torch.float64).reshape(-1, 1, 1, 1)  # ComfyUI passes the exact sigmas here
        sigma = sigma.repeat(x.shape[0] // sigma.shape[0], 1, 1, 1)  # cond and uncond batched together
        x = x.to(torch.float64)
        mu = (context.to(torch.float64).mean(1) @ self.projection.double())[:, :, None, None] * self.pattern.double()
        if self.kind == "const":
            alpha = 1 - sigma
        else:  # EPS / V-prediction x-space: x = x0 + sigma eps, and the network sees x / sqrt(1 + sigma^2)
            x, alpha = x * (1 + sigma**2).sqrt(), torch.ones_like(sigma)
        x0 = mu + alpha * self.tau2 / (alpha**2 * self.tau2 + sigma**2) * (x - alpha * mu)
        return ((x - alpha * x0) / sigma if self.kind == "eps" else (x - x0) / sigma).float()


def make_gaussian_model(kind: str = "eps", seed: int = 0):
    """A ModelPatcher like :func:`make_tiny_model`, whose network is the exact :class:`GaussianDiffusionModel`."""
    patcher = make_tiny_model(kind, seed=seed)
    patcher.model.diffusion_model = GaussianDiffusionModel(kind, seed=seed)
    return patcher


class FakeClip:
    """Just enough of comfy.sd.CLIP for CLIPTextEncode: deterministic context vectors per prompt."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        generator = torch.Generator().manual_seed(sum(map(ord, tokens)) + len(tokens))
        return [[torch.randn(1, 3, CONTEXT_DIM, generator=generator), {}]]


class FakeVae:
    """Just enough of comfy.sd.VAE for VAEDecode: latent (B, 4, h, w) -> image (B, h, w, 3) in [0, 1]."""

    def decode(self, samples):
        return torch.sigmoid(samples[:, :3]).movedim(1, -1).float()


class TinyCheckpointLoaderForTests:
    """A checkpoint loader node (ComfyUI's V1 API) that returns the tiny EPS model, a FakeClip and a FakeVae."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's V1 API)
        return {"required": {"ckpt_name": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name):
        return (make_tiny_model("eps", seed=0), FakeClip(), FakeVae())
