"""The run plan: everything a training run decides before it loads a weight or writes a byte, as one frozen record.

:func:`plan_run` performs every check that bad input can fail (settings, output folder, dataset, model kind and
prediction type, embeddings, the network's architecture, the resume state and what the folder holds), in that order,
each a one-line :class:`TrainingError`. A plan that exists is a run that can start: the trainer only loads and trains.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import annealing

from .backends import ModelInfo, default_resolution, detect_model
from .config import TrainConfig
from .data import DatasetScan, EmbeddingStore, scan_dataset
from .errors import TrainingError
from .files import shown
from .resume_state import LOCKED_DEFAULTS, UnusableResumeState, read_resume_state, resume_shape_problem, run_name
from .run_folder import RESUME_FILE, FolderPlan, ResumeFile, RunFolder, default_output_name, ensure_writable


@dataclass(frozen=True)
class RunPlan:
    """What a run is, decided before it starts (built by :func:`plan_run`; nothing here changes afterwards)."""

    config: TrainConfig  # the checked settings (a copy: the caller's object may change, the plan does not)
    scan: DatasetScan  # the dataset's samples and the images skipped for a missing caption
    info: ModelInfo  # what the model is, from its configs
    family: str  # written into the checkpoint (``--model-family`` or the detected one)
    resolution: int
    frames: int  # frames per clip (1 for image families)
    latent_shape: tuple[int, ...]  # (C, H, W) or (C, F, H, W) of one latent at ``resolution`` and ``frames``
    embeddings: EmbeddingStore | None  # precomputed text embeddings; the text encoders are then not loaded
    network_config: annealing.GuidanceModelConfig | annealing.LearnToGuideConfig  # what is trained
    prompt_kind: str | None  # Learn to Guide: the prompt embedding its network reads (None for annealing)
    locked: Mapping[str, object]  # the settings a resumed run must share with this one
    resume_state: dict | None  # the checked state ``--resume`` continues from
    folder: RunFolder  # the output folder and this run's name in it
    folder_plan: FolderPlan  # what starting the run removes, and the line that says so

    @property
    def l2g(self) -> bool:
        return self.config.method == "learn-to-guide"

    @property
    def output(self) -> Path:
        return self.folder.path

    @property
    def output_name(self) -> str:
        return self.folder.name


def plan_run(config: TrainConfig) -> RunPlan:
    """Check everything and decide the run (see the module docstring); nothing is loaded or written."""
    cfg = dataclasses.replace(config.validate())
    output = Path(cfg.output)
    ensure_writable(output)
    scan_dataset(cfg.dataset, cfg.caption_extension, skip_missing_captions=True, videos=True)  # dataset errors first, as always
    info = detect_model(cfg.model, cfg.config_folder)
    # then the samples the family reads (clips only for the video families), with the caption rule asked for
    scan = scan_dataset(cfg.dataset, cfg.caption_extension, cfg.skip_missing_captions, videos=info.spec.video)
    family = cfg.model_family or info.family
    resolution = cfg.resolution or default_resolution(info.family, info.prediction_type)
    frames = cfg.frames or info.default_frames  # 1 for image families
    latent_shape = tuple(info.latent_shape(resolution, frames))
    info.spec.check_options(info, cfg.expert, cfg.fsdp, cfg.precision)
    embeddings = _embeddings(cfg, info, scan, resolution, frames, latent_shape)
    l2g = cfg.method == "learn-to-guide"
    prompt_kind = None
    if l2g:  # the prompt input's width comes from the model's configs: the architecture is known before any load
        prompt_kind, prompt_dim = info.prompt_embedding()
        try:
            network_config = cfg.l2g_network_config(prompt_dim, prompt_kind, l2g_normalization(info))
        except ValueError as exc:
            raise TrainingError(f"learn-to-guide network settings (l2g_hidden, l2g_layers, l2g_projection): {exc}") from None
        if cfg.l2g_reward == "clip":
            from .reward import check_clip_folder

            check_clip_folder(cfg.l2g_reward_model)
    else:
        network_config = annealing.GuidanceModelConfig(hidden_size=cfg.mlp_hidden, n_layers=cfg.mlp_layers,
                                                       delta_embed_normalization=cfg.delta_normalization)
    locked = {
        "method": cfg.method,
        "mlp_hidden": None if l2g else cfg.mlp_hidden,  # annealing's architecture; None where it does not apply
        "mlp_layers": None if l2g else cfg.mlp_layers,
        "delta_normalization": None if l2g else cfg.delta_normalization,
        "grid_steps": cfg.grid_steps,
        "flow_spacing": cfg.flow_spacing if info.prediction_type == "flow" else None,  # the grid of flow models
        "model_family_resolved": family,
        "resolution_resolved": resolution,
        "frames_resolved": frames,  # the latent shape, with the resolution
        "expert": cfg.expert,  # Wan 2.2 A14B: which network, and which part of the grid
    }
    if l2g:  # continuous (s, t) draws since this pack's paper-faithful trainer; the time input's clamp is part of the network
        locked.update(l2g_step_draw="continuous", l2g_hidden=cfg.l2g_hidden, l2g_layers=cfg.l2g_layers, l2g_projection=cfg.l2g_projection,
                      l2g_time_input=cfg.l2g_time_input, l2g_s_min=cfg.l2g_s_min, l2g_zeta=cfg.l2g_zeta)

    state, resume_file = _existing_resume_state(output, cfg.resume)
    if cfg.resume:
        _check_resumable(output / RESUME_FILE, state, locked, network_config)
    name = cfg.output_name or (resume_file.owner if cfg.resume else None) or default_output_name(cfg.method, family)
    if cfg.resume and name != resume_file.owner:
        raise TrainingError(f"{output / RESUME_FILE}: cannot resume, output_name was {shown(resume_file.owner)} and is now {shown(name)}")
    folder = RunFolder(output, name)
    folder_plan = folder.plan(resume_file, resume=cfg.resume, overwrite=cfg.overwrite)
    return RunPlan(config=cfg, scan=scan, info=info, family=family, resolution=resolution, frames=frames, latent_shape=latent_shape,
                   embeddings=embeddings,
                   network_config=network_config, prompt_kind=prompt_kind, locked=MappingProxyType(locked),
                   resume_state=state if cfg.resume else None, folder=folder, folder_plan=folder_plan)


def l2g_normalization(info: ModelInfo) -> float:
    """T of a Learn to Guide network's normalised time u = timestep / T: the DDPM schedule's timestep count, 1000 for
    flow models (timesteps are sigma x 1000)."""
    if info.prediction_type == "flow":
        return 1000.0
    count = info.scheduler_config.get("num_train_timesteps", 1000)  # the grid built from it refuses a bad one at load
    return float(count) if isinstance(count, int) and not isinstance(count, bool) and 2 <= count <= 10_000 else 1000.0


def _embeddings(cfg: TrainConfig, info: ModelInfo, scan: DatasetScan, resolution: int, frames: int, latent_shape: tuple) -> EmbeddingStore | None:
    if not cfg.embeddings:
        return None
    store = EmbeddingStore(cfg.embeddings)
    if store.latents is not None:
        store.check_latents(resolution, frames, cfg.frame_stride, latent_shape)
    if store.model_family != info.family:
        raise TrainingError(f"{cfg.embeddings}: embeddings were made for a {store.model_family} model, the model is {info.family}")
    missing = store.missing([s.caption for s in scan.samples])
    if missing:
        raise TrainingError(f"{cfg.embeddings}: {len(missing)} captions have no embedding (e.g. {missing[0][:60]!r}); re-run `python -m training embed`")
    return store


def _existing_resume_state(output: Path, resume: bool) -> tuple[dict | None, ResumeFile]:
    """The folder's resume state, read once through the bounded reader: (the state, what the folder plan needs of it).
    With ``resume`` an unusable or missing one is an error; without, it only makes the folder's earlier run one that left
    no usable state."""
    path = output / RESUME_FILE
    if not (path.exists() or path.is_symlink()):
        if resume:
            raise TrainingError(f"{path}: --resume given but there is no resume state in the output folder")
        return None, ResumeFile()
    try:
        state = read_resume_state(path)
    except UnusableResumeState as exc:
        if resume:
            raise
        return None, ResumeFile(problem=exc.reason)
    return state, ResumeFile(owner=run_name(state), step=state["step"])


def _check_resumable(path: Path, state: dict, locked: dict, network_config) -> None:
    saved = json.loads(state["locked"])
    for key, value in locked.items():
        before = saved.get(key, LOCKED_DEFAULTS.get(key))
        if before != value:
            raise TrainingError(f"{path}: cannot resume, {key} was {shown(before)} and is now {shown(value)}")
    problem = resume_shape_problem(state, network_config)
    if problem:
        raise TrainingError(f"{path}: malformed resume state ({problem}); start again without --resume")
