"""The 2D benchmark's Learn to Guide, trained as the image trainer trains it (continuous (s, t), the unbiased energy
distance, omega >= 0, no other term), and the paper's toy claim on a short run: with an accurate model the learned omega
goes to 0 (unguided) from its start at 2; with the under-trained (leaky) one it stays near the 1 that undoes the leak."""

from __future__ import annotations

import pytest
import torch
from training_fixtures import one_thread

import annealing
from training.algorithm import SamplingGrid
from training.toy.learn_to_guide import LearnToGuideConfig, scale_table, train_learn_to_guide
from training.toy.problem import RingProblem

SHORT = LearnToGuideConfig(iterations=250, batch_per_class=64)


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def grid():
    return SamplingGrid.vp_ddim(50)


def test_an_accurate_model_learns_no_guidance(grid):
    problem = RingProblem(condition_leak=0.0)
    net = train_learn_to_guide(problem, grid, SHORT, seed=0, progress=False)
    omega = scale_table(net, problem, grid) - 1
    assert torch.equal(omega, torch.zeros_like(omega))  # the ReLU's 0, exactly: unguided at every step and class


def test_an_under_trained_model_learns_guidance(grid):
    problem = RingProblem(condition_leak=0.5)
    history: list[float] = []
    net = train_learn_to_guide(problem, grid, SHORT, seed=0, progress=False, history=history)
    omega = scale_table(net, problem, grid) - 1
    assert bool((omega >= 0).all()) and 0.5 < float(omega[:, 0].mean()) < 1.5 and float(omega.mean()) > 0.5
    assert sum(history[-50:]) < sum(history[:50])  # it trained


def test_the_table_is_the_networks_scale_for_each_grid_step(grid, tmp_path):
    """Sampling a grid applies 1 + omega(c, t_i -> t_{i+1}), clean data (timestep -1) after the last point: s is the
    sampler's own next time. The network is a real checkpoint: it saves, loads and gives the same table."""
    problem = RingProblem()
    net = train_learn_to_guide(problem, grid, LearnToGuideConfig(iterations=3, batch_per_class=8), seed=1, progress=False)
    table = scale_table(net, problem, grid)
    with torch.no_grad():
        for c, i in ((0, 0), (2, 17), (1, 49)):
            s = grid.mlp_timesteps[i + 1] if i + 1 < len(grid) else torch.tensor(-1.0)
            expected = 1 + net(grid.mlp_timesteps[i : i + 1], s.reshape(1), problem.one_hot(torch.tensor([c])))
            assert float(table[c, i]) == pytest.approx(float(expected), rel=1e-6)
    assert net.metadata.method == "learn_to_guide" and net.metadata.model_family == "toy2d"
    assert (net.config.output, net.config.time_input, net.config.trained_s) == ("relu", "log_snr", "continuous")
    annealing.save_guidance_model(net, tmp_path / "toy_l2g.safetensors")
    torch.testing.assert_close(scale_table(annealing.load_guidance_model(tmp_path / "toy_l2g.safetensors"), problem, grid), table)
