"""The pack's ComfyExtension: registers the model folder (at import) and lists the nodes."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .adg import AngleDomainGuidanceNode
from .guider import AnnealingGuider, ApplyAnnealingGuidance
from .loader import LoadAnnealingGuidanceModel
from .model_folder import register_model_folder
from .plots import AnnealingModelExplorer, AnnealingSchedulePlot
from .tvcfg import StageWiseGuidanceNode

MODEL_FOLDER_PATH = register_model_folder(folder_paths.folder_names_and_paths, folder_paths.models_dir)

NODES = [LoadAnnealingGuidanceModel, AnnealingGuider, ApplyAnnealingGuidance, AnnealingSchedulePlot, AnnealingModelExplorer,
         StageWiseGuidanceNode, AngleDomainGuidanceNode]


class AnnealingGuidanceExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> AnnealingGuidanceExtension:
    return AnnealingGuidanceExtension()
