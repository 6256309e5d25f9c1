"""The hook with a Learn to Guide checkpoint, driven as ComfyUI drives it (stand-ins for its objects): each sample of a
batch gets the omega of its own prompt. ComfyUI hands the post-CFG function the positive conditioning's processed parts,
whose ``pooled_output`` / ``cross_attn`` keep one row per prompt, and gives latent b the row b mod rows
(``comfy.utils.repeat_to_batch_size``); the hook maps the rows the same way. s is the end of the sampler's step."""

from __future__ import annotations

import pytest
import torch
from comfy_fakes import FakeBaseModel, FakeSampler, _import, core, post_cfg_args, sample_euler

AnnealingHook = _import("nodes.hook").AnnealingHook
PROMPT_DIM = 12


def l2g_checkpoint(kind="pooled", dim=PROMPT_DIM):
    torch.manual_seed(3)
    meta = core.CheckpointMetadata(model_family="sdxl", method="learn_to_guide", training_grid=core.VPGrid(num_steps=20))
    net = core.LearnToGuideNet(core.LearnToGuideConfig(prompt_dim=dim, prompt_embedding=kind, hidden_size=16), meta)
    with torch.no_grad():  # omega of a few, depending on the prompt
        net.head[-1].bias.fill_(2.0)
        net.prompt_projection.weight.mul_(3.0)
    net.source_path = "/models/annealing_guidance/l2g.safetensors"
    return net.eval()


def sd_sigmas(steps):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - abar) / abar).sqrt()[torch.tensor(steps)].float()
    return torch.cat([sigmas, torch.zeros(1)])


def evaluate(hook, batch, conds, step=1):
    schedule = sd_sigmas([900, 700, 400, 100])
    gen = torch.Generator().manual_seed(batch)
    d_cond, d_uncond = torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 4, 8, 8, generator=gen)
    hook.begin_run()
    hook.set_sampler(FakeSampler(sample_euler))
    args = post_cfg_args(FakeBaseModel("eps", "SDXL"), schedule[step].expand(batch), d_cond, d_uncond, schedule)
    args["cond"] = conds
    out = hook.post_cfg(args)
    run = hook.end_run(out)
    return out, d_cond, d_uncond, run


@pytest.mark.parametrize("batch, rows", [(4, 2), (3, 3), (2, 1), (2, 4), (5, 3)])
def test_each_sample_gets_the_omega_of_its_own_prompt(batch, rows):
    net = l2g_checkpoint()
    pooled = torch.randn(rows, PROMPT_DIM, generator=torch.Generator().manual_seed(10))
    hook = AnnealingHook(net, core.AnnealingOptions())
    out, d_cond, d_uncond, run = evaluate(hook, batch, [{"pooled_output": pooled, "cross_attn": torch.randn(rows, 5, 8)}])
    per_sample = pooled[torch.arange(batch) % rows]  # what ComfyUI's repeat_to_batch_size gives sample b
    with torch.no_grad():
        scale = 1 + net(torch.full((batch,), 700.0), torch.full((batch,), 400.0), per_sample)  # s: the sampler's next point
    torch.testing.assert_close(out, d_uncond + scale.view(-1, 1, 1, 1) * (d_cond - d_uncond), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(run.trace["omega"][0]), scale, rtol=1e-4, atol=1e-5)  # (steps, batch)
    if rows > 1 and batch > 1:  # different prompts really got different scales
        assert float(scale.max() - scale.min()) > 1e-3
    assert "end of the sampler's own step" in run.rule


def test_mean_token_prompts_are_read_per_row_too():
    net = l2g_checkpoint(kind="mean_tokens", dim=8)
    tokens = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(11))
    hook = AnnealingHook(net, core.AnnealingOptions(mode="per_step"))
    out, d_cond, d_uncond, _ = evaluate(hook, 2, [{"cross_attn": tokens}])
    with torch.no_grad():
        scale = 1 + net(torch.full((2,), 700.0), torch.full((2,), 400.0), tokens.mean(dim=1))
    torch.testing.assert_close(out, d_uncond + scale.view(-1, 1, 1, 1) * (d_cond - d_uncond), rtol=1e-4, atol=1e-5)


def test_the_prompt_is_read_once_per_run_and_again_for_the_next_run():
    net = l2g_checkpoint()
    hook = AnnealingHook(net, core.AnnealingOptions())
    first = torch.randn(2, PROMPT_DIM)
    evaluate(hook, 2, [{"pooled_output": first}])
    second = torch.randn(2, PROMPT_DIM)
    out, d_cond, d_uncond, _ = evaluate(hook, 2, [{"pooled_output": second}])
    with torch.no_grad():
        scale = 1 + net(torch.full((2,), 700.0), torch.full((2,), 400.0), second)
    torch.testing.assert_close(out, d_uncond + scale.view(-1, 1, 1, 1) * (d_cond - d_uncond), rtol=1e-4, atol=1e-5)
