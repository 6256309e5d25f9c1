"""Annealing Schedule Plot (what a run applied) and Annealing Model Explorer (what a checkpoint does)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..annealing import prompt_embedding
from ..annealing.plots import figure_to_tensor, parse_lambdas, plot_model_explorer, plot_trace
from ..annealing.recorder import GuidanceTrace
from .hook import find_hook
from .schema import CATEGORY, LAMBDA, AnnealingGuidanceModel


class AnnealingSchedulePlot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnnealingSchedulePlot",
            display_name="Annealing Schedule Plot",
            category=CATEGORY,
            description="After sampling: the CFG-equivalent scale omega applied at every step (one line per batch item), "
            "the MLP's w and the delta norm it saw.",
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
        run, matched = hook.find_run(latent)
        lam = hook.options.lam
        if run is None:
            fig = plot_trace(GuidanceTrace(steps=[]), title=f"{hook.source}: no sampling run recorded yet")
        else:
            what = "learn_to_guide" if hook.learned else f"lambda {lam:g}"
            title = f"{hook.source}: {what}, {run.sampler_name or 'unknown sampler'}\n{run.rule}"
            note = None if matched else "these samples match none of this guider's runs: showing its latest run"
            fig = plot_trace(run.trace, title=title, note=note, learned=hook.learned)
        image = figure_to_tensor(fig)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


class AnnealingModelExplorer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnnealingModelExplorer",
            display_name="Annealing Model Explorer",
            category=CATEGORY,
            description="What a checkpoint does, no sampling needed: the CFG-equivalent scale and w over its training grid, "
            "per lambda, at a few delta norms; for a Learn to Guide checkpoint, its CFG scale along the grid for the connected prompt.",
            is_output_node=True,
            inputs=[
                AnnealingGuidanceModel.Input("annealing_model", tooltip="The guidance-scale MLP to inspect."),
                io.String.Input(
                    "lambdas", default="0.0, 0.2, 0.4, 0.6, 0.8, 1.0",
                    tooltip=f"{LAMBDA} values to plot, separated by commas or spaces; each in [0, 1], at most 12 (annealing checkpoints).",
                ),
                io.Conditioning.Input(
                    "positive", optional=True,
                    tooltip="Learn to Guide checkpoints only: the prompt whose CFG scale to draw (without it, the zero embedding).",
                ),
            ],
            outputs=[io.Image.Output(tooltip="The plot as an image.")],
        )

    @classmethod
    def validate_inputs(cls, lambdas):  # only this input: ComfyUI files the message under every input the function takes
        if isinstance(lambdas, str):  # linked values arrive at execution time
            try:
                parse_lambdas(lambdas)
            except ValueError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, annealing_model, lambdas, positive=None) -> io.NodeOutput:
        prompts = None
        if positive and getattr(annealing_model.metadata, "method", "annealing") == "learn_to_guide":
            config = annealing_model.config
            prompts = {"the connected prompt": prompt_embedding(positive[0][0], positive[0][1].get("pooled_output"), config.prompt_embedding,
                                                                config.prompt_dim)[0]}
        image = figure_to_tensor(plot_model_explorer(annealing_model, parse_lambdas(lambdas), prompts=prompts))
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))
