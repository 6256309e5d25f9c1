"""The training grid and k_train against values written out here from the definitions (and against diffusers' own
schedulers where diffusers is installed)."""

from __future__ import annotations

import math

import pytest
import torch

from annealing.training_grid import FlowGrid, GridLookup, VPGrid, anchored_omega, grid_from_dict, k_train


def sd_sigmas() -> torch.Tensor:
    """Karras sigma of each DDPM timestep of SD's scaled_linear schedule, written from the definition."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()


def test_upstream_grid_is_980_to_0_and_its_k_by_hand():
    grid = VPGrid()
    assert grid.timesteps().tolist() == list(range(980, -1, -20))
    sig = sd_sigmas()[torch.arange(980, -1, -20)]
    sig_next = torch.cat([sig[1:], torch.zeros(1, dtype=torch.float64)])
    expected_k = sig / (sig - sig_next)  # EPS: k = sigma / (sigma - sigma_next); the last step ends at 0 (k = 1)
    torch.testing.assert_close(grid.sigmas()[:-1], sig)
    torch.testing.assert_close(k_train(grid, sig), expected_k)
    assert float(expected_k[-1]) == 1.0 and 9.0 < float(expected_k[0]) < 9.2
    # between two grid points: linear in log sigma
    mid = (sig[10].log() * 0.25 + sig[11].log() * 0.75).exp()
    torch.testing.assert_close(k_train(grid, mid.reshape(1)), (0.25 * expected_k[10] + 0.75 * expected_k[11]).reshape(1))
    # beyond the ends: the end values
    torch.testing.assert_close(k_train(grid, torch.tensor([100.0, 1e-4, 0.0])).float(),
                               torch.tensor([float(expected_k[0]), 1.0, 1.0]))


def test_flow_grid_and_its_k_by_hand():
    grid = FlowGrid(num_steps=28, shift=3.0, spacing="diffusers")
    shift = lambda u: 3.0 * u / (1 + 2.0 * u)  # noqa: E731
    u = torch.linspace(1.0, shift(torch.tensor(1 / 1000, dtype=torch.float64)).item(), 28, dtype=torch.float64)
    sig = shift(u)
    torch.testing.assert_close(grid.sigmas()[:-1], sig)
    assert abs(float(sig[-1]) - 0.0089) < 1e-4  # diffusers' SD3 scheduler ends at 0.0089, not ComfyUI's 0.100
    nxt = torch.cat([sig[1:], torch.zeros(1, dtype=torch.float64)])
    expected_k = sig * (1 - nxt) / (sig * (1 - nxt) - nxt * (1 - sig))  # CONST: alpha = 1 - sigma
    torch.testing.assert_close(k_train(grid, sig), expected_k)
    simple = FlowGrid(num_steps=28, spacing="simple").sigmas()
    assert abs(float(simple[-2]) - shift(torch.tensor(1 / 28, dtype=torch.float64)).item()) < 1e-12


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [50, 30, 7])
def test_vp_grid_timesteps_equal_diffusers_ddim(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing,
                                        steps_offset=1 if spacing == "leading" else 0)
    scheduler.set_timesteps(steps)
    grid = VPGrid(num_steps=steps, spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    assert grid.timesteps().tolist() == scheduler.timesteps.tolist()
    torch.testing.assert_close(grid.alphas_cumprod().float(), scheduler.alphas_cumprod)


@pytest.mark.parametrize("steps, shift", [(28, 3.0), (10, 1.0), (50, 6.0)])
def test_flow_grid_equals_diffusers_flow_match(steps, shift):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(FlowGrid(num_steps=steps, shift=shift).sigmas().float(), scheduler.sigmas.float(), atol=1e-6, rtol=1e-6)


def test_lookup_gives_ddpm_index_and_k_in_one_call():
    grid = VPGrid()
    lookup = GridLookup(grid, "ddpm_index")
    sig = sd_sigmas()
    points = torch.tensor([999, 980, 500, 37, 0])
    t, k, s_next = lookup(sig[points].float())
    torch.testing.assert_close(t, points.float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(k, k_train(grid, sig[points]).float(), rtol=1e-5, atol=1e-5)
    # where the trained step from each point ends: 980 -> 960, ..., 0 -> clean (-1); above the grid: its first step's end
    torch.testing.assert_close(s_next[[0, 1, 2, 4]], torch.tensor([960.0, 960.0, 480.0, -1.0]), atol=1e-3, rtol=0)
    # t = 37 lies between the grid points 40 (its step ends at 20) and 20 (ends at 0): in between, linear in log sigma
    frac = float((sig[37].log() - sig[40].log()) / (sig[20].log() - sig[40].log()))
    assert float(s_next[3]) == pytest.approx(20.0 * (1 - frac), abs=1e-3)
    assert lookup.timestep(torch.tensor([0.0, float(sig[500])])).tolist() == pytest.approx([-1.0, 500.0], abs=2e-3)
    between = (sig[500].log() * 0.5 + sig[501].log() * 0.5).exp().float().reshape(1)
    assert abs(float(lookup(between)[0]) - 500.5) < 1e-2
    flow = GridLookup(FlowGrid(), "sigma_x1000")
    t, k, _ = flow(torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(t, torch.tensor([500.0, 250.0]))
    with pytest.raises(ValueError, match="ddpm_index"):
        GridLookup(grid, "sigma_x1000")


def test_anchored_omega_is_w_times_k_train():
    grid = VPGrid()
    sig = grid.sigmas()[:-1]
    w = torch.linspace(0.7, 1.5, sig.shape[0], dtype=torch.float64)
    torch.testing.assert_close(anchored_omega(w, sig, grid), w * k_train(grid, sig))


def test_grid_from_dict_round_trip_and_bounds():
    for grid in (VPGrid(num_steps=30, spacing="trailing"), FlowGrid(num_steps=20, shift=6.0, spacing="simple")):
        assert grid_from_dict(grid.to_dict()) == grid
    bad = [({"kind": "vp", "num_steps": 10**6}, "num_steps"), ({"kind": "vp", "spacing": "sideways"}, "spacing"),
           ({"kind": "flow", "shift": math.inf}, "shift"), ({"kind": "flow", "shift": -1.0}, "shift"), ({"kind": "edm"}, "kind"),
           ({"kind": "vp", "num_train_timesteps": 10**9}, "num_train_timesteps"), ({"kind": "vp", "beta_start": 2.0}, "beta_start"),
           ({"kind": "vp", "extra": 1}, "extra"), ({"kind": "vp", "num_steps": True}, "num_steps"), ("vp", "JSON object")]
    for data, word in bad:
        with pytest.raises(ValueError, match=word):
            grid_from_dict(data)


@pytest.mark.parametrize("grid, words", [
    (dict(beta_start=1.0, beta_end=1.0), "every sigma is inf"),  # 1 - beta = 0: abar is 0 everywhere
    (dict(beta_start=1e-300, beta_end=1e-300), "every sigma is 0"),  # 1 - beta rounds to 1: no noise anywhere
    (dict(beta_start=0.00085, beta_end=1.0), "some sigma is inf"),
    (dict(beta_start=1e-300, beta_end=0.012), "some sigma is 0"),
])
def test_betas_that_describe_no_schedule_are_refused(grid, words):
    with pytest.raises(ValueError, match=words):
        VPGrid(**grid)
    with pytest.raises(ValueError, match=words):
        grid_from_dict({"kind": "vp", **grid})


def test_a_flow_shift_that_describes_no_schedule_is_refused():
    for shift in (1e-300, 1e-30):
        with pytest.raises(ValueError, match="sigma is inf"):
            FlowGrid(shift=shift)
    for shift in (1e-6, 0.1, 100.0):  # tiny and large shifts that still give finite, decreasing sigmas are fine
        sigmas = FlowGrid(shift=shift, num_steps=1000).sigmas()[:-1]
        assert bool((sigmas[1:] < sigmas[:-1]).all()) and bool((sigmas > 0).all())
