"""Annealing Schedule Plot (what a run applied) and Annealing Model Explorer (what a checkpoint does)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .common import CATEGORY, AnnealingGuidanceModel
from .helpers import explorer_plot, find_hook, parse_lambdas, schedule_plot


class AnnealingSchedulePlot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnnealingSchedulePlot",
            display_name="Annealing Schedule Plot",
            category=CATEGORY,
            description="After sampling: w applied at every step (one line per batch item), the delta norm, and the CFG-equivalent w*k.",
            is_output_node=True,
            inputs=[
                io.Latent.Input("samples", tooltip="The sampler's output latent: makes this node run after that sampler, and picks its run."),
                io.Guider.Input("guider", optional=True, tooltip="The Annealing Guider used by the sampler (or connect model)."),
                io.Model.Input("model", optional=True, tooltip="The model from Apply Annealing Guidance used by the KSampler (or connect guider)."),
            ],
            outputs=[io.Image.Output(tooltip="The plot as an image.")],
        )

    @classmethod
    def execute(cls, samples, guider=None, model=None) -> io.NodeOutput:
        hook = None
        if guider is not None:
            hook = getattr(guider, "annealing_hook", None) or find_hook(getattr(guider, "model_options", None))
        if hook is None and model is not None:
            hook = find_hook(getattr(model, "model_options", None))
        if hook is None:
            raise ValueError("connect the Annealing Guider (guider) or the model from Apply Annealing Guidance (model) that the sampler used")
        latent = samples.get("samples") if isinstance(samples, dict) else None
        run = hook.find_run(latent)
        image = schedule_plot(run, hook.options.lam, hook.source)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


class AnnealingModelExplorer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnnealingModelExplorer",
            display_name="Annealing Model Explorer",
            category=CATEGORY,
            description="What a checkpoint does, no sampling needed: w over timestep and delta norm for chosen lambdas.",
            is_output_node=True,
            inputs=[
                AnnealingGuidanceModel.Input("annealing_model", tooltip="The guidance-scale MLP to inspect."),
                io.String.Input(
                    "lambdas", default="0.0, 0.2, 0.4, 0.6, 0.8, 1.0",
                    tooltip="Lambda values to plot, separated by commas or spaces; each in [0, 1], at most 12.",
                ),
            ],
            outputs=[io.Image.Output(tooltip="The plot as an image.")],
        )

    @classmethod
    def validate_inputs(cls, lambdas, **kwargs):
        if isinstance(lambdas, str):  # linked values arrive at execution time
            try:
                parse_lambdas(lambdas)
            except ValueError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, annealing_model, lambdas) -> io.NodeOutput:
        image = explorer_plot(annealing_model, parse_lambdas(lambdas))
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))
