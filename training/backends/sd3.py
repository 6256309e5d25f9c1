"""SD3 and SD3.5 (medium, large, large turbo): SD3Transformer2DModel, flow matching (velocity v = eps - x0 at
x = (1 - s) x0 + s eps), FlowMatchEulerDiscreteScheduler.

SD3.5's configs go through the same code: medium's ``dual_attention_layers`` (0..12) and both sizes' ``qk_norm:
rms_norm`` are internal to the transformer, whose call (hidden states, timestep, encoder hidden states, pooled
projections) and text encoders (CLIP-L, CLIP-G, T5-XXL) are SD3's; tests/test_training_families.py builds both configs.

Conditioning, as the pipeline's ``encode_prompt``: [penultimate hiddens of TE1, TE2] zero-padded to the joint width,
followed by T5 (or 256 zero tokens without T5); pooled = [TE1 pooled, TE2 pooled]. The grid: the scheduler's own
(FlowMatchEulerDiscreteScheduler.set_timesteps, checked against the folder's scheduler) or ComfyUI's simple scheduler.
"""

from __future__ import annotations

import torch

from annealing.training_grid import FlowGrid

from ..algorithm import SamplingGrid
from ..errors import TrainingError
from .conditioning import TextCondition
from .flow import FlowSchedule
from .interface import FamilyBackend, ModelInfo, PipelineIndex
from .loading import LOCAL, import_diffusers, load_errors, to_device

T5_TOKENS = 256


class SD3(FamilyBackend):
    key = "sd3"
    title = "SD3 / SD3.5 (medium, large)"
    default_resolution = 1024
    prediction = "velocity"
    block_classes = ("JointTransformerBlock",)

    @classmethod
    def matches(cls, index: PipelineIndex) -> bool:
        return index.component("transformer") == "SD3Transformer2DModel"

    @classmethod
    def describe(cls, index: PipelineIndex) -> ModelInfo:
        folder = index.folder
        network_config = index.config("transformer", what="the transformer config")
        scheduler_config = index.scheduler_config()
        scheduler_class = str(scheduler_config.get("_class_name", ""))
        if not scheduler_class.startswith("FlowMatch"):
            raise TrainingError(f"{folder}: an SD3 transformer needs a flow-matching scheduler, found {scheduler_class}")
        FlowSchedule.from_config(folder, scheduler_config, "diffusers", allow_dynamic=False)
        vae_config = index.config("vae", what="the VAE config")
        return ModelInfo(family=cls.key, prediction_type="flow", pipeline_class=index.pipeline_class, scheduler_class=scheduler_class,
                         scheduler_config=scheduler_config, source=index.source, config_folder=folder, single_file=index.single_file,
                         has_t5=index.component("text_encoder_3") is not None, network_config=network_config, vae_config=vae_config)

    @classmethod
    def schedule(cls, info: ModelInfo) -> FlowSchedule:
        return FlowSchedule.from_config(info.config_folder, info.scheduler_config, "diffusers", allow_dynamic=False)

    @classmethod
    def widths(cls, info: ModelInfo) -> tuple[int, int | None]:
        return info.network_config["joint_attention_dim"], info.network_config["pooled_projection_dim"]

    @classmethod
    def training_grid(cls, info: ModelInfo, num_steps: int, flow_spacing: str = "diffusers", resolution: int | None = None) -> FlowGrid:
        """The flow grid at the scheduler's shift, spaced as FlowMatchEulerDiscreteScheduler (the SD3 pipelines' grid) or
        as ComfyUI's simple scheduler (``flow_spacing="simple"``)."""
        return cls.schedule(info).choose(num_steps, flow_spacing).grid

    @classmethod
    def load(cls, info: ModelInfo, options):
        diffusers = import_diffusers()
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        folder, dtype = str(info.config_folder), options.dtype
        network = vae = text = None
        use_t5 = options.use_t5 and options.load_text_encoders
        with load_errors(info.source):
            if info.single_file:
                extra = {} if use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
                pipe = getattr(diffusers, info.pipeline_class).from_single_file(str(info.source), config=folder, torch_dtype=dtype, **LOCAL, **extra)
                components = dict(pipe.components)
                network = components["transformer"] if options.load_network else None
                vae = components["vae"].to(options.vae_dtype) if options.load_vae else None
                if options.load_text_encoders:
                    names = ["tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"]
                    if use_t5 and components.get("text_encoder_3") is not None:
                        names += ["tokenizer_3", "text_encoder_3"]
                    text = {n: components[n] for n in names}
                scheduler = components["scheduler"]
                del pipe, components
            else:
                if options.load_network:
                    network = diffusers.SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype, **LOCAL)
                if options.load_vae:
                    vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=options.vae_dtype, **LOCAL)
                scheduler = getattr(diffusers, info.scheduler_class).from_pretrained(folder, subfolder="scheduler", **LOCAL)
                if options.load_text_encoders:
                    text = {}
                    for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
                        text[tok] = CLIPTokenizer.from_pretrained(folder, subfolder=tok, **LOCAL)
                        text[enc] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder=enc, torch_dtype=dtype, **LOCAL)
                    if info.has_t5 and use_t5:
                        text["tokenizer_3"] = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_3", **LOCAL)
                        text["text_encoder_3"] = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", torch_dtype=dtype, **LOCAL)
        to_device((network, vae, *(text or {}).values()), options.device)
        if options.gradient_checkpointing and network is not None:
            network.enable_gradient_checkpointing()
        mode = "empty_prompt" if options.uncond == "auto" else options.uncond
        backend = cls(info, network, vae, text, dtype, options.device, options.cads, options.resolution, mode, scheduler=scheduler)
        backend.use_t5 = bool(info.has_t5 and options.use_t5)
        return backend

    def grid(self, num_steps: int, flow_spacing: str = "diffusers") -> SamplingGrid:
        schedule = self.schedule(self.info)
        if flow_spacing == "diffusers":  # the folder's own scheduler must agree (karras/exponential/beta sigmas, shift_terminal, ...)
            schedule.check_scheduler(self.scheduler, num_steps, None, self.info.source)
        return SamplingGrid.from_training_grid(schedule.choose(num_steps, flow_spacing).grid, "sigma_x1000").to(self.device)

    def predict(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        batch = z.shape[0]
        cond = cond.expand(batch) if cond.batch == 1 and batch > 1 else cond
        with self._grad_context(z):
            # float32 timesteps, as the pipeline passes them: bf16 cannot even represent 981 exactly
            return self.network(hidden_states=z.to(self.dtype), timestep=model_timestep.to(torch.float32),
                                encoder_hidden_states=cond.embeds.to(self.dtype),
                                pooled_projections=cond.pooled.to(self.dtype)).sample.float()

    def encode_text(self, captions: list[str]) -> TextCondition:
        self._need_text()
        with torch.no_grad():
            o1 = self.text["text_encoder"](self._ids(self.text["tokenizer"], captions), output_hidden_states=True)
            o2 = self.text["text_encoder_2"](self._ids(self.text["tokenizer_2"], captions), output_hidden_states=True)
            clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
            pooled = torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)
            joint = self.info.network_config["joint_attention_dim"]
            if "text_encoder_3" in self.text:
                tok = self.text["tokenizer_3"]
                ids = tok(captions, padding="max_length", max_length=T5_TOKENS, truncation=True, add_special_tokens=True,
                          return_tensors="pt").input_ids.to(self.device)
                t5 = self.text["text_encoder_3"](ids)[0]
            else:
                t5 = torch.zeros(len(captions), T5_TOKENS, joint, dtype=clip.dtype, device=clip.device)
            clip = torch.nn.functional.pad(clip, (0, joint - clip.shape[-1]))
            return TextCondition(torch.cat([clip, t5.to(clip.dtype)], dim=-2).float(), pooled.float())

    def provenance(self) -> dict:
        # sd3_t5 False: zero T5 tokens, as the pipeline without T5
        return {"trained_latent_shape": list(self.sample_shape), "flow_shift": self.schedule(self.info).shift, "sd3_t5": getattr(self, "use_t5", False)}


FAMILY = SD3
