"""The per-evaluation decision (annealing.scale_rule.evaluation_scale) for every mode and kind of sampler, against the
table in its docstring written out by hand here."""

from __future__ import annotations

import pytest
import torch

from annealing import SamplerInfo, evaluation_scale
from annealing.samplers import ancestral_sigma_down

SIGMAS = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
K_TRAIN = torch.tensor([7.0, 7.0])


def k_eps(s, s_next):
    return s / (s - s_next)


def decide(mode, sampler, sigma=(5.0, 3.0), schedule=SIGMAS):
    """The rule's decision with None (meaning 1) written out as ones."""
    rule = evaluation_scale(mode, torch.tensor(sigma), K_TRAIN, sampling="eps", sampler=SamplerInfo(sampler), sample_sigmas=schedule)
    for name in ("factor", "cfg_factor", "sampler_units"):
        if getattr(rule, name) is None:
            setattr(rule, name, torch.ones(len(sigma)))
    return rule


def test_anchored_with_an_ordinary_sampler_is_k_train_and_needs_no_schedule():
    for sampler in ("euler", "dpmpp_2m", "heun", None):
        rule = decide("anchored", sampler, schedule=None)
        torch.testing.assert_close(rule.factor, K_TRAIN)
        torch.testing.assert_close(rule.cfg_factor, K_TRAIN)


def test_anchored_under_a_cfg_pp_sampler_is_converted_to_its_step_units():
    rule = decide("anchored", "euler_cfg_pp")
    k_step = torch.tensor([k_eps(5.0, 2.0), k_eps(3.0, 2.0)])  # 5 is a point (next 2); 3 is inside the step 5 -> 2
    torch.testing.assert_close(rule.factor, K_TRAIN / k_step)
    torch.testing.assert_close(rule.cfg_factor, K_TRAIN)
    torch.testing.assert_close(rule.sampler_units, 1 / k_step)
    with pytest.raises(ValueError, match="schedule"):
        decide("anchored", "euler_cfg_pp", schedule=None)


def test_ancestral_samplers_and_their_cfg_pp_twins_use_sigma_down():
    down = float(ancestral_sigma_down(torch.tensor(5.0), torch.tensor(2.0), "eps"))
    assert down == pytest.approx(2.0**2 / 5.0)  # eta 1: sigma_down = sigma_next^2 / sigma
    rule = decide("anchored", "euler_ancestral_cfg_pp", sigma=(5.0, 5.0))
    torch.testing.assert_close(rule.factor, K_TRAIN / k_eps(5.0, down))
    rule = decide("per_step", "euler_ancestral", sigma=(5.0, 5.0))
    torch.testing.assert_close(rule.factor, torch.full((2,), k_eps(5.0, down)))


def test_flow_euler_ancestral_cfg_pp_step_units():
    """ComfyUI's euler_ancestral_cfg_pp on a flow model: x' = a' D + d eps_u, d = a' * VE-down(s / a, s' / a'); an ordinary
    step with D' = D_u + s k (D_c - D_u) renoised with its own eps lands there when k = s a' / (s a' - d a)."""
    s, s_next = 0.8, 0.5
    a, a_next = 1 - s, 1 - s_next
    ve_from, ve_to = s / a, s_next / a_next
    d = a_next * ve_to**2 / ve_from
    expected = s * a_next / (s * a_next - d * a)
    rule = evaluation_scale("per_step", torch.tensor([s]), torch.ones(1), sampling="const", sampler=SamplerInfo("euler_ancestral_cfg_pp"),
                            sample_sigmas=torch.tensor([1.0, s, s_next, 0.0]))
    torch.testing.assert_close(rule.cfg_factor, torch.tensor([expected]))


def test_per_step_is_the_k_of_the_samplers_own_step():
    rule = decide("per_step", "euler")
    k_step = torch.tensor([k_eps(5.0, 2.0), k_eps(3.0, 2.0)])
    torch.testing.assert_close(rule.factor, k_step)
    torch.testing.assert_close(rule.cfg_factor, k_step)
    rule = decide("per_step", "euler_cfg_pp")
    torch.testing.assert_close(rule.factor, torch.ones(2))
    torch.testing.assert_close(rule.cfg_factor, k_step)
    with pytest.raises(ValueError, match="sample_sigmas"):
        decide("per_step", "euler", schedule=None)


def test_as_is_and_x0_only_samplers_take_w_unchanged():
    for mode in ("as_is", "anchored", "per_step"):
        rule = decide(mode, "lcm")
        torch.testing.assert_close(rule.factor, torch.ones(2))
    rule = decide("as_is", "euler", schedule=None)
    torch.testing.assert_close(rule.factor, torch.ones(2))
    torch.testing.assert_close(rule.cfg_factor, torch.ones(2))


def test_flow_k_step():
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0])
    rule = evaluation_scale("per_step", torch.tensor([0.8]), torch.ones(1), sampling="const", sampler=SamplerInfo("euler"),
                            sample_sigmas=sigmas)
    expected = 0.8 * 0.5 / (0.8 * 0.5 - 0.5 * 0.2)  # sigma alpha_next / (sigma alpha_next - sigma_next alpha)
    torch.testing.assert_close(rule.factor, torch.tensor([expected]))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        decide("auto", "euler")
