"""The annealing hook's end-of-run bookkeeping says, once and naming the checkpoint file, how many evaluations fell back
to plain CFG because w was not finite or beyond annealing.model.W_LIMIT, and at which sigma (issue 22: never silently
replaced). ComfyUI stand-ins from comfy_fakes; no ComfyUI needed."""

from __future__ import annotations

import torch
from comfy_fakes import FakeBaseModel, FakeSampler, _import, core, post_cfg_args, sample_euler

AnnealingHook = _import("nodes.hook").AnnealingHook


def _unbounded_model():
    """w = 1 + 1e37 * relu(||delta|| / 5): inf for any real delta. Built in memory: no load-time check stands in the way."""
    model = core.GuidanceScaleModel(core.GuidanceModelConfig(hidden_size=1, n_layers=0), core.upstream_metadata())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.combined_head[0].weight[0, 4] = 1.0
        model.combined_head[2].weight[0, 0] = 1e37
    model.source_path = "/models/annealing_guidance/broken_sdxl.safetensors"
    return model.eval().requires_grad_(False)


def test_a_run_whose_w_fell_back_is_said_once_naming_the_checkpoint(caplog):
    base = FakeBaseModel("eps")
    sample_sigmas = torch.cat([base.model_sampling.sigmas[torch.tensor([800, 400])], torch.zeros(1)])
    hook = AnnealingHook(_unbounded_model(), core.AnnealingOptions())
    d_uncond = torch.randn(1, 4, 8, 8)
    with caplog.at_level("WARNING", logger="annealing_guidance"):
        for _ in range(2):  # two identical runs: one warning
            hook.begin_run()
            hook.set_sampler(FakeSampler(sample_euler))
            outs = [hook.post_cfg(post_cfg_args(base, sample_sigmas[i : i + 1], d_uncond + 1, d_uncond, sample_sigmas, cond_scale=5.0))
                    for i in range(2)]
            run = hook.end_run(outs[-1])
    for out in outs:  # plain CFG at the sampler's cfg where w was unusable
        torch.testing.assert_close(out, d_uncond + 5.0)
    assert len(run.trace.fallback_sigmas) == 2 and run.trace["fallback"].all()
    messages = [r.getMessage() for r in caplog.records if "fell back" in r.getMessage() or "not finite" in r.getMessage()]
    assert len(messages) == 1, messages
    message = messages[0]
    assert "broken_sdxl.safetensors" in message and "in 2 of 2 evaluations" in message and "plain CFG" in message
    assert f"{float(sample_sigmas[0]):.4g}" in message and f"{float(sample_sigmas[1]):.4g}" in message


def test_a_run_without_fallbacks_says_nothing(caplog):
    base = FakeBaseModel("eps")
    sample_sigmas = torch.cat([base.model_sampling.sigmas[torch.tensor([800, 400])], torch.zeros(1)])
    model = core.GuidanceScaleModel(core.GuidanceModelConfig(hidden_size=8, n_layers=1), core.upstream_metadata()).eval()
    hook = AnnealingHook(model, core.AnnealingOptions())
    with caplog.at_level("WARNING", logger="annealing_guidance"):
        hook.begin_run()
        out = hook.post_cfg(post_cfg_args(base, sample_sigmas[:1], torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), sample_sigmas))
        run = hook.end_run(out)
    assert run.trace.fallback_sigmas == [] and not caplog.records
