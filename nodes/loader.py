"""Load Annealing Guidance Model: a file from models/annealing_guidance -> ANNEALING_GUIDANCE_MODEL."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..annealing import CheckpointError, load_guidance_model
from .model_folder import MODEL_FOLDER
from .schema import CATEGORY, AnnealingGuidanceModel


class LoadAnnealingGuidanceModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadAnnealingGuidanceModel",
            display_name="Load Annealing Guidance Model",
            category=CATEGORY,
            description="Loads a learned guidance checkpoint with the metadata that says how to use it: an annealing MLP (the "
            "upstream .pt or this pack's .safetensors) or a Learn to Guide network trained with python -m training.",
            inputs=[
                io.Combo.Input(
                    "model_name", options=folder_paths.get_filename_list(MODEL_FOLDER),
                    tooltip="A checkpoint in models/annealing_guidance (.safetensors or .pt), e.g. the upstream SDXL checkpoint.",
                ),
            ],
            outputs=[AnnealingGuidanceModel.Output(display_name="annealing_model", tooltip="The guidance network (annealing or "
                                                   "learn_to_guide, as its metadata says) and its metadata.")],
        )

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(MODEL_FOLDER, model_name)
        if path is None:
            raise CheckpointError(model_name, f"not found in models/{MODEL_FOLDER} (or the folders extra_model_paths.yaml gives it)")
        return io.NodeOutput(load_guidance_model(path))  # a broken file raises CheckpointError: one line naming file and problem
