"""The baseline guidance methods of annealing.baselines against their formulas, worked by hand on small cases."""

from __future__ import annotations

import math

import pytest
import torch

from annealing.baselines import angle_domain_guidance, apg, cfg, cfgpp_equivalent_scale, interval_scale, tv_cfg_schedule


def _pair(seed=0, shape=(3, 4, 5, 5)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)


def test_cfg_endpoints_and_per_sample_scale():
    d_c, d_u = _pair()
    torch.testing.assert_close(cfg(d_c, d_u, 1.0), d_c)
    torch.testing.assert_close(cfg(d_c, d_u, 0.0), d_u)
    scales = torch.tensor([1.0, 2.0, 7.5], dtype=torch.float64)
    out = cfg(d_c, d_u, scales)
    for b in range(3):
        torch.testing.assert_close(out[b], d_u[b] + scales[b] * (d_c[b] - d_u[b]))


def test_cfgpp_equivalent_scale_makes_an_euler_step_land_on_the_cfgpp_step():
    d_c, d_u = _pair(1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(d_c.shape, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([3.0, 1.2, 0.4], dtype=torch.float64)
    sigma_next = torch.tensor([2.0, 0.7, 0.0], dtype=torch.float64)
    w = 0.6
    view = (-1, 1, 1, 1)
    # CFG++: guided x0, renoised with the unconditional noise eps_u = (x - D_u) / sigma
    cfgpp = d_u + w * (d_c - d_u) + sigma_next.view(view) * (x - d_u) / sigma.view(view)
    # plain Euler with D = cfg(D_c, D_u, w k)
    scale = cfgpp_equivalent_scale(w, sigma, sigma_next).double()
    denoised = cfg(d_c, d_u, scale)
    euler = x + (sigma_next - sigma).view(view) * (x - denoised) / sigma.view(view)
    torch.testing.assert_close(euler, cfgpp)
    torch.testing.assert_close(scale, w * sigma / (sigma - sigma_next))
    assert float(scale[2]) == pytest.approx(w)  # last step (sigma_next = 0): k = 1


def test_apg_reduces_to_cfg_without_projection_threshold_or_momentum():
    d_c, d_u = _pair(3)
    out, running = apg(d_c, d_u, 4.0, eta=1.0, norm_threshold=0.0, momentum=0.0)
    torch.testing.assert_close(out, cfg(d_c, d_u, 4.0))
    torch.testing.assert_close(running, d_c - d_u)


def test_apg_eta_zero_keeps_only_the_part_orthogonal_to_the_conditional_prediction():
    d_c, d_u = _pair(4)
    out, _ = apg(d_c, d_u, 5.0, eta=0.0)
    update = (out - d_c).reshape(3, -1)
    assert torch.allclose((update * d_c.reshape(3, -1)).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    # and it is (w - 1) times the orthogonal component of D_c - D_u
    g = (d_c - d_u).reshape(3, -1)
    c = d_c.reshape(3, -1)
    orth = g - (g * c).sum(1, keepdim=True) / (c * c).sum(1, keepdim=True) * c
    torch.testing.assert_close(update, 4.0 * orth)


def test_apg_norm_threshold_caps_the_update():
    d_c, d_u = _pair(5)
    r = 0.5
    out, _ = apg(d_c, d_u, 3.0, eta=1.0, norm_threshold=r)
    norms = (out - d_c).reshape(3, -1).norm(dim=1)
    assert torch.all(norms <= 2.0 * r + 1e-9)  # (w - 1) * r
    assert torch.allclose(norms, torch.full_like(norms, 2.0 * r))  # these random updates are all longer than r
    with pytest.raises(ValueError, match="norm_threshold"):
        apg(d_c, d_u, 3.0, norm_threshold=-1.0)


def test_apg_matches_comfyuis_node_formula_with_momentum():
    """ComfyUI's APG node (comfy_extras/nodes_apg.py): running = m * running + g; clip; project on cond; then its cfg w'
    gives D_c + w' * (orth + eta * par). Ours at w = w' + 1 must agree over a short trajectory."""
    eta, threshold, momentum, w_comfy = 0.3, 2.0, -0.5, 4.0
    running_ours = None
    running_comfy = 0
    for step in range(4):
        d_c, d_u = _pair(10 + step)
        ours, running_ours = apg(d_c, d_u, w_comfy + 1, eta=eta, norm_threshold=threshold, momentum=momentum, running=running_ours)
        guidance = d_c - d_u
        running_comfy = guidance if step == 0 else momentum * running_comfy + guidance
        guidance = running_comfy
        norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
        guidance = guidance * torch.minimum(torch.ones_like(norm), threshold / norm)
        unit = torch.nn.functional.normalize(d_c, dim=[-1, -2, -3])
        parallel = (guidance * unit).sum(dim=[-1, -2, -3], keepdim=True) * unit
        modified = (guidance - parallel) + eta * parallel
        modified_cond = (d_u + modified) + (d_c - d_u) / w_comfy
        comfy = d_u + w_comfy * (modified_cond - d_u)
        torch.testing.assert_close(ours, comfy)


def test_tv_cfg_symmetric_schedule():
    steps, mean_scale = 50, 4.0
    schedule = tv_cfg_schedule(steps, mean_scale)
    assert schedule.shape == (steps,)
    assert float(schedule.mean()) == pytest.approx(mean_scale)
    assert float(schedule[0]) == pytest.approx(1.0) and float(schedule[-1]) == pytest.approx(1.0)
    torch.testing.assert_close(schedule, schedule.flip(0))  # symmetric
    rise = schedule[1:25] - schedule[:24]
    assert torch.allclose(rise, rise[0].expand_as(rise))  # linear over the first half
    assert float(schedule.max()) == pytest.approx(2 * mean_scale - 1, rel=0.05)
    torch.testing.assert_close(tv_cfg_schedule(7, 1.0), torch.ones(7, dtype=torch.float64))  # w_bar = 1: no guidance anywhere
    assert tv_cfg_schedule(1, 3.0).tolist() == [3.0]
    with pytest.raises(ValueError):
        tv_cfg_schedule(0, 3.0)


def test_angle_domain_guidance_by_hand_in_2d():
    theta = 0.3
    d_u = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    d_c = torch.tensor([[math.cos(theta), math.sin(theta)]], dtype=torch.float64)
    w = 2.0
    w_prime = (w - 1) + 1e-3
    t_new = w_prime * theta
    # e = (D_c - D_u) minus its projection on D_u = (0, sin theta)
    expected = torch.tensor([[math.cos(t_new) * math.cos(theta), math.cos(t_new) * math.sin(theta) + math.sin(t_new)]], dtype=torch.float64)
    torch.testing.assert_close(angle_domain_guidance(d_c, d_u, w), expected)
    # w = 1 leaves D_c (almost) unchanged; a huge w is capped at theta' = pi / 3
    torch.testing.assert_close(angle_domain_guidance(d_c, d_u, 1.0), d_c, atol=2e-3, rtol=0)
    capped = angle_domain_guidance(d_c, d_u, 100.0)
    cap = math.pi / 3
    expected_capped = torch.tensor([[math.cos(cap) * math.cos(theta), math.cos(cap) * math.sin(theta) + math.sin(cap)]], dtype=torch.float64)
    torch.testing.assert_close(capped, expected_capped)
    # parallel predictions (sin theta <= 1e-3): the fallback gives D_c back
    torch.testing.assert_close(angle_domain_guidance(2 * d_u, d_u, 5.0), 2 * d_u)


def test_angle_domain_guidance_is_per_sample_on_flattened_predictions():
    d_c, d_u = _pair(6)
    batched = angle_domain_guidance(d_c, d_u, torch.tensor([1.5, 3.0, 8.0], dtype=torch.float64))
    for b, w in enumerate((1.5, 3.0, 8.0)):
        torch.testing.assert_close(batched[b : b + 1], angle_domain_guidance(d_c[b : b + 1], d_u[b : b + 1], w))


def test_interval_scale():
    sigma = torch.tensor([14.6, 5.42, 5.0, 1.0, 0.28, 0.1])
    out = interval_scale(sigma, 4.0)
    assert out.tolist() == [1.0, 4.0, 4.0, 4.0, 1.0, 1.0]  # (0.28, 5.42]
    assert interval_scale(sigma, 4.0, sigma_low=0.0, sigma_high=100.0).tolist() == [4.0] * 6
    with pytest.raises(ValueError, match="sigma_low"):
        interval_scale(sigma, 4.0, sigma_low=2.0, sigma_high=1.0)
