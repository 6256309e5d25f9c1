"""Learn to Guide training (``python -m training --method learn-to-guide``) on tiny models: the objective's pieces against
their definitions (the MMD family of eq. 9 and eq. 21 as sums over pairs, on tiny particle sets), the (s, t) sampler's
support and marginals against formulas written here, the loss of one batch recomputed by hand from the method
(continuous times, particles, one guided DDIM / flow Euler step, fresh noisings), gradients that reach the network and
never the frozen model, and runs that train, resume bit-identically and load through the nodes' loader and
compatibility check."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from training_fixtures import make_config, one_thread, pack_module, same_weights, state_of, tiny_dataset, tiny_model

import annealing
import training.learn_to_guide as l2g
import training.toy.learn_to_guide as toy_l2g
from training.cli import main as cli_main
from training.config import TrainConfig, TrainingError
from training.run_folder import RESUME_FILE
from training.run_parts import initial_l2g_network
from training.trainer import Trainer, train


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_thread()


def l2g_config(kind, output, **overrides):
    return make_config(kind, output, method="learn-to-guide", **overrides)


def ready_trainer(kind, tmp_path, **overrides) -> Trainer:
    trainer = Trainer(l2g_config(kind, tmp_path / "out", **overrides), progress=False)
    trainer.preflight()
    trainer.setup()
    return trainer


def randomise_output_layer(net, seed=0):
    """The trainer starts the output layer at zero (one CFG scale everywhere); random weights make omega depend on t, s
    and the prompt, so a wrong input would show, and a larger bias (CFG scales around 6 to 12) makes the loss depend on it
    more than on float rounding."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.head[-1].weight.copy_(0.3 * torch.randn(net.head[-1].weight.shape, generator=gen))
        net.head[-1].bias.fill_(8.0)


# ------------------------------------------------------------------------------------------------------------ the objective


def pairwise(a, b):
    return [[float(torch.linalg.vector_norm(a[i].double() - b[j].double())) for j in range(len(b))] for i in range(len(a))]


def test_energy_distance_against_sums_over_pairs():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, 7, generator=gen), torch.randn(3, 5, 7, generator=gen) + 0.5
    unbiased, plain = l2g.energy_distance(x, y), l2g.energy_distance(x, y, unbiased=False)
    for g in range(3):
        xy, xx, yy = pairwise(x[g], y[g]), pairwise(x[g], x[g]), pairwise(y[g], y[g])
        cross = sum(map(sum, xy)) / (4 * 5)
        u = 2 * cross - sum(xx[i][j] for i, j in itertools.permutations(range(4), 2)) / 12 - sum(
            yy[i][j] for i, j in itertools.permutations(range(5), 2)) / 20
        v = 2 * cross - sum(map(sum, xx)) / 16 - sum(map(sum, yy)) / 25
        assert float(unbiased[g]) == pytest.approx(u, rel=1e-5) and float(plain[g]) == pytest.approx(v, rel=1e-5)


def powered(d, beta):
    return [[v**beta for v in row] for row in d]


@pytest.mark.parametrize("beta, lam", [(1.0, 1.0), (0.5, 1.0), (1.75, 0.5), (2.0, 0.0), (1.0, 0.0)])
def test_the_mmd_family_of_eq_9_against_sums_over_pairs(beta, lam):
    """2 E||X - Y||^beta - lambda (E||X - X'||^beta + E||Y - Y'||^beta), self-distances over i != j, on sets of 3 and 4."""
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64), torch.randn(2, 4, 5, generator=gen, dtype=torch.float64) + 0.4
    ours = l2g.mmd_distance(x, y, beta, lam)
    for g in range(2):
        xy, xx, yy = (powered(pairwise(a, b), beta) for a, b in ((x[g], y[g]), (x[g], x[g]), (y[g], y[g])))
        cross = sum(map(sum, xy)) / 12
        within_x = sum(xx[i][j] for i, j in itertools.permutations(range(3), 2)) / 6
        within_y = sum(yy[i][j] for i, j in itertools.permutations(range(4), 2)) / 12
        assert float(ours[g]) == pytest.approx(2 * cross - lam * (within_x + within_y), rel=1e-9)
    with pytest.raises(ValueError, match="beta in"):
        l2g.mmd_distance(x, y, 2.5, 1.0)


def test_l2_is_the_papers_eq_21_the_cross_term_alone():
    """E||x_s(omega) - x_s||^2 over the P x Q independent pairs: the means' squared distance plus both sets' spreads (so it
    penalises the guided particles' spread), i.e. the beta = 2, lambda = 0 member halved."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64), torch.randn(2, 3, 6, generator=gen, dtype=torch.float64) - 0.3
    ours = l2g.cross_distance_sq(x, y)
    for g in range(2):
        by_hand = sum(float((x[g, i] - y[g, j]).pow(2).sum()) for i in range(4) for j in range(3)) / 12
        spreads = float(x[g].var(0, unbiased=False).sum() + y[g].var(0, unbiased=False).sum())
        assert float(ours[g]) == pytest.approx(by_hand, rel=1e-9)
        assert by_hand == pytest.approx(float((x[g].mean(0) - y[g].mean(0)).pow(2).sum()) + spreads, rel=1e-9)
    torch.testing.assert_close(2 * ours, l2g.mmd_distance(x, y, 2.0, 0.0))
    # the per-element image objective: eq. 21 / numel, and the family / numel^(beta / 2)
    torch.testing.assert_close(l2g.set_distance(x, y, "l2"), (ours / 6).float())
    torch.testing.assert_close(l2g.set_distance(x, y, "energy", 1.5, 0.5), (l2g.mmd_distance(x, y, 1.5, 0.5) / 6**0.75).float())


def test_beta_2_lambda_1_is_the_means_distance_the_old_l2_was():
    """The earlier ``l2`` (||mean - mean||^2 minus each set's spread / m, the linear-kernel MMD) is the family at beta 2,
    lambda 1, halved: no option of its own is needed."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64), torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
    means = (x.mean(1) - y.mean(1)).pow(2).sum(-1) - x.var(1).sum(-1) / 4 - y.var(1).sum(-1) / 3
    torch.testing.assert_close(l2g.mmd_distance(x, y, 2.0, 1.0), 2 * means)


def test_unbiased_estimates_vanish_for_equal_distributions_and_the_plain_ones_do_not():
    """Both sets from one distribution: the U-statistics average to 0, the V-statistic to lambda (1/m) x the sets'
    spreads, the bias that would reward collapsing the m = 4 guided particles; eq. 21 averages E||X - Y||^2 = 2 x 2 for
    N(0, I_2) (it has no self-terms to cancel it, by design)."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(20000, 4, 2, generator=gen, dtype=torch.float64), torch.randn(20000, 4, 2, generator=gen, dtype=torch.float64)
    mean_pair_distance = math.sqrt(math.pi)  # E||X - X'|| for X, X' ~ N(0, I_2)
    assert abs(float(l2g.energy_distance(x, y).mean())) < 0.02
    assert float(l2g.energy_distance(x, y, unbiased=False).mean()) == pytest.approx(2 * mean_pair_distance / 4, rel=0.05)
    assert abs(float(l2g.mmd_distance(x, y, 1.75, 1.0).mean())) < 0.04
    assert float(l2g.cross_distance_sq(x, y).mean()) == pytest.approx(4.0, rel=0.02)


def test_guided_step_is_ddim_and_the_flow_euler_step():
    gen = torch.Generator().manual_seed(3)
    z, p_u, p_c = (torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    scale = torch.tensor([1.0, 4.5], dtype=torch.float64)
    a, s, a_n, s_n = (torch.tensor(v, dtype=torch.float64) for v in ([0.6, 0.9], [0.8, 0.43589], [0.7, 1.0], [0.71414, 0.0]))
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    eps = p_c + (col(scale) - 1) * (p_c - p_u)  # x_c + omega (x_c - x_u), omega = scale - 1
    expected = col(a_n) * (z - col(s) * eps) / col(a) + col(s_n) * eps
    torch.testing.assert_close(l2g.guided_step(z, p_u, p_c, scale, a, s, a_n, s_n), expected)
    sig, sig_n = torch.tensor([0.9, 0.3], dtype=torch.float64), torch.tensor([0.7, 0.0], dtype=torch.float64)
    flow = l2g.guided_step(z, p_u, p_c, scale, 1 - sig, sig, 1 - sig_n, sig_n, "velocity")
    torch.testing.assert_close(flow, z + col(sig_n - sig) * (p_u + col(scale) * (p_c - p_u)))  # Euler on the guided velocity
    # affine in the scale: the frozen predictions fix A and B of z_s = A + omega B
    at = [l2g.guided_step(z, p_u, p_c, torch.full((2,), w, dtype=torch.float64), a, s, a_n, s_n) for w in (1.0, 2.0, 3.5)]
    torch.testing.assert_close(at[2] - at[0], 2.5 * (at[1] - at[0]))


def test_the_2d_benchmark_trains_with_the_same_functions():
    assert toy_l2g.learn_to_guide_loss is l2g.learn_to_guide_loss and toy_l2g.TimeRegion is l2g.TimeRegion


# ------------------------------------------------------------------------------------------------------------ the (s, t) draws


def test_the_step_times_are_drawn_over_the_papers_region_with_its_marginals():
    """s ~ U[S_min, 1 - zeta - delta], t = s + U[delta, 1 - zeta - s]: the support, s uniform, t given s uniform, and t's
    marginal CDF F(t) = 1 - r + r log r, r = (1 - zeta - t) / L, L = 1 - zeta - delta - S_min (integrated by hand from
    p(t) = (1 / L) log(L / (1 - zeta - t)))."""
    region = l2g.TimeRegion(s_min=0.02, zeta=0.05, delta=0.1)
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    s, t = region.draw(torch.rand(n, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64))
    assert float(s.min()) >= 0.02 and float(s.max()) <= 0.85 and float(t.max()) <= 0.95 and float((t - s).min()) >= 0.1 - 1e-12
    assert float(s.min()) < 0.021 and float(s.max()) > 0.849 and float((t - s).min()) < 0.101 and float(t.max()) > 0.949
    L = 0.95 - 0.1 - 0.02
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):  # the empirical CDFs against the formulas, to the sampling error (1 / sqrt(n) ~ 0.002)
        point = 0.02 + q * L
        assert float((s <= point).double().mean()) == pytest.approx(q, abs=0.005)
        tq = 0.12 + q * L
        r = (0.95 - tq) / L
        assert float((t <= tq).double().mean()) == pytest.approx(1 - r + r * math.log(r), abs=0.005)
    band = (s > 0.40) & (s < 0.41)  # t given s: uniform on [s + delta, 1 - zeta]
    assert float(t[band].mean()) == pytest.approx((0.405 + 0.1 + 0.95) / 2, abs=0.005)
    # the density the module documents is that CDF's derivative
    tq = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    torch.testing.assert_close(region.t_density(tq), torch.log(L / (0.95 - tq)) / L)
    for bad in ({"delta": 0.0}, {"s_min": 0.0}, {"zeta": 1.0}, {"s_min": 0.5, "delta": 0.3, "zeta": 0.2}):
        with pytest.raises(ValueError):
            l2g.TimeRegion(**bad)


def test_continuous_times_become_the_schedules_noise_levels():
    """DDPM: tau = round(1000 u) (the model's own timesteps), z = sqrt(abar) x0 + sqrt(1 - abar) eps; flow: sigma = u."""
    from training.algorithm import SamplingGrid

    vp = SamplingGrid.vp_ddim(50)
    u = torch.tensor([0.001, 0.4567, 0.999])
    a, sig, model_t, net_t = l2g.noise_levels(vp, u)
    abar = annealing.VPGrid().alphas_cumprod()[torch.tensor([1, 457, 999])]
    torch.testing.assert_close(a, abar.sqrt().float())
    torch.testing.assert_close(sig, (1 - abar).sqrt().float())
    assert model_t.tolist() == net_t.tolist() == [1.0, 457.0, 999.0]
    flow = SamplingGrid.from_training_grid(annealing.FlowGrid(num_steps=10))
    a, sig, model_t, net_t = l2g.noise_levels(flow, u)
    torch.testing.assert_close(sig, u)
    torch.testing.assert_close(a, 1 - u)
    torch.testing.assert_close(model_t, u * 1000)
    torch.testing.assert_close(net_t, u * 1000)


# ------------------------------------------------------------------------------------------------------------ the loss by hand


def mmd_by_hand(guided, target, beta=1.0, lam=1.0):
    """Per image: 2 mean_jk ||x_j - y_k||^b - lam (mean_{j != j'} ||x_j - x_j'||^b + mean_{k != k'} ||y_k - y_k'||^b), per
    element^(b / 2)."""
    m = len(guided)
    cross = sum(map(sum, powered(pairwise(guided, target), beta))) / m**2
    within = [sum(d[i][j] for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
              for d in (powered(pairwise(guided, guided), beta), powered(pairwise(target, target), beta))]
    return (2 * cross - lam * (within[0] + within[1])) / guided[0].numel() ** (beta / 2)


def test_epsilon_loss_by_hand_with_the_mean_token_prompt(tmp_path):
    """SD1.5 (no pooled embedding: the network reads the mean token embedding), 3 particles, continuous times: image 0
    steps from u = 0.9004 to 0.3, image 1 from 0.6 to 0.0014, the DDPM timesteps 900 -> 300 and 600 -> 1 (rounded)."""
    trainer = ready_trainer("sd15", tmp_path, l2g_particles=3)
    backend, unet, net = trainer.backend, trainer.backend.network, trainer.mlp
    randomise_output_layer(net)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    noise, target_noise = torch.randn(2, 3, 4, 8, 8, generator=gen), torch.randn(2, 3, 4, 8, 8, generator=gen)
    cond = backend.encode_text(["a cat", "a dog"])
    times = (torch.tensor([0.3, 0.0014]), torch.tensor([0.9004, 0.6]))
    terms = trainer.compute_loss(x0, cond, None, times=times, noise=noise, target_noise=target_noise)

    with torch.no_grad():
        tok = backend.text["tokenizer"]
        empty = backend.text["text_encoder"](tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
        abar = backend.scheduler.alphas_cumprod.double()
        t, s = [900, 600], [300, 1]
        scales = [1 + float(net(torch.tensor([float(t[b])]), torch.tensor([float(s[b])]), cond.embeds[b].mean(dim=0, keepdim=True)))
                  for b in range(2)]  # the prompt: the mean of the token embeddings

        def loss(scales):
            total = 0.0
            for b in range(2):
                a, sd = math.sqrt(abar[t[b]]), math.sqrt(1 - abar[t[b]])
                a_n, sd_n = math.sqrt(abar[s[b]]), math.sqrt(1 - abar[s[b]])
                guided, target = [], []
                for j in range(3):
                    z = a * x0[b:b + 1] + sd * noise[b, j:j + 1]
                    step = torch.tensor([t[b]])
                    e_u = unet(z, step, encoder_hidden_states=empty).sample
                    e_c = unet(z, step, encoder_hidden_states=cond.embeds[b:b + 1]).sample
                    e_hat = e_c + (scales[b] - 1) * (e_c - e_u)  # x_c + omega (x_c - x_u)
                    guided.append(a_n * (z - sd * e_hat) / a + sd_n * e_hat)
                    target.append(a_n * x0[b:b + 1] + sd_n * target_noise[b, j:j + 1])
                total += mmd_by_hand(guided, target) / 2
            return total

        expected = loss(scales)
        assert abs(loss([1.02 * w for w in scales]) - expected) > 20 * 1e-5 * abs(expected)  # the comparison below can see the scale
    assert float(terms.total.detach()) == pytest.approx(expected, rel=1e-5)
    assert terms.scale.tolist() == pytest.approx(scales, rel=1e-6)
    torch.testing.assert_close(terms.s, times[0]) and torch.testing.assert_close(terms.t, times[1])


@pytest.mark.parametrize("objective, beta, lam", [("energy", 1.0, 1.0), ("energy", 1.75, 0.5), ("l2", 1.0, 1.0)])
def test_flow_loss_by_hand_with_the_pooled_prompt(tmp_path, objective, beta, lam):
    """SD3 (the pooled [TE1, TE2] embedding), 4 particles, continuous flow sigmas (sigma = u), velocity predictions and
    the flow Euler step; the MMD family at two (beta, lambda), and eq. 21."""
    trainer = ready_trainer("sd3", tmp_path, l2g_objective=objective, l2g_beta=beta, l2g_lambda=lam)
    backend, net = trainer.backend, trainer.backend.network
    randomise_output_layer(trainer.mlp, seed=1)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 16, 8, 8, generator=gen)
    noise, target_noise = torch.randn(2, 4, 16, 8, 8, generator=gen), torch.randn(2, 4, 16, 8, 8, generator=gen)
    cond, empty = backend.encode_text(["a cat", "a dog"]), backend.encode_text([""])
    s_sig, t_sig = [0.25, 0.02], [0.95, 0.45]
    terms = trainer.compute_loss(x0, cond, None, times=(torch.tensor(s_sig), torch.tensor(t_sig)), noise=noise, target_noise=target_noise)

    with torch.no_grad():
        scales = [1 + float(trainer.mlp(torch.tensor([t_sig[b] * 1000]), torch.tensor([s_sig[b] * 1000]), cond.pooled[b:b + 1]))
                  for b in range(2)]

        def v(x, sig, c):
            return net(hidden_states=x, timestep=torch.tensor([sig * 1000]), encoder_hidden_states=c.embeds, pooled_projections=c.pooled).sample

        def loss(scales):
            total = 0.0
            for b in range(2):
                sig, sig_n = t_sig[b], s_sig[b]
                guided, target = [], []
                for j in range(4):
                    z = (1 - sig) * x0[b:b + 1] + sig * noise[b, j:j + 1]
                    v_u, v_c = v(z, sig, empty), v(z, sig, row_of(cond, b))
                    guided.append(z + (sig_n - sig) * (v_c + (scales[b] - 1) * (v_c - v_u)))
                    target.append((1 - sig_n) * x0[b:b + 1] + sig_n * target_noise[b, j:j + 1])
                if objective == "energy":
                    total += mmd_by_hand(guided, target, beta, lam) / 2
                else:  # eq. 21: the mean squared distance over the 4 x 4 pairs, per element
                    pairs = [float((g.double() - y.double()).pow(2).sum()) for g in guided for y in target]
                    total += sum(pairs) / 16 / guided[0].numel() / 2
            return total

        expected = loss(scales)
        assert abs(loss([1.02 * w for w in scales]) - expected) > 50 * 1e-5 * abs(expected)
    assert float(terms.total.detach()) == pytest.approx(expected, rel=1e-5)
    assert terms.scale.tolist() == pytest.approx(scales, rel=1e-6)


def row_of(cond, row):
    from training.backends import TextCondition

    return TextCondition(cond.embeds[row:row + 1], cond.pooled[row:row + 1])


def test_training_draws_its_steps_from_the_region_the_network_is_clamped_to(tmp_path):
    """The trainer's own draws (from its generator) lie in [S_min, 1 - zeta] with gaps of at least delta (rounded to the
    DDPM timesteps), and the network's time clamp is that region."""
    trainer = ready_trainer("sdxl", tmp_path, l2g_s_min=0.05, l2g_zeta=0.1, l2g_delta=0.2)
    x0 = torch.randn(16, *trainer.latent_shape)
    cond = trainer.backend.encode_text(["a"] * 16)
    terms = trainer.compute_loss(x0, cond, torch.Generator().manual_seed(0))
    assert float(terms.s.min()) >= 0.05 and float(terms.t.max()) <= 0.9 and float((terms.t - terms.s).min()) >= 0.2
    config = trainer.plan.network_config
    assert (config.time_min, config.time_max, config.time_input, config.output, config.trained_s) == (0.05, 0.9, "log_snr", "relu", "continuous")
    assert trainer.accelerator.unwrap_model(trainer.mlp).metadata.training_grid == trainer.grid.training_grid


# ------------------------------------------------------------------------------------------------------------ gradients


def test_gradients_reach_the_network_and_never_the_frozen_model(tmp_path):
    trainer = ready_trainer("sdxl", tmp_path)
    randomise_output_layer(trainer.mlp)
    network, calls = trainer.backend.network, []
    original = network.forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args[0].shape[0], torch.is_grad_enabled(), out.sample.requires_grad))
        return out

    network.forward = spy
    x0 = torch.randn(2, *trainer.latent_shape)
    terms = trainer.compute_loss(x0, trainer.backend.encode_text(["a", "b"]), torch.Generator().manual_seed(0))
    terms.total.backward()
    assert calls == [(2 * 2 * 4, False, False)]  # one call of batch 2 x B x m, no graph: nothing to backpropagate through
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in trainer.mlp.parameters())
    assert all(not p.requires_grad and p.grad is None for p in network.parameters())


def test_the_initial_network_gives_the_initial_scale_everywhere():
    """ReLU output (and the earlier softplus one): zero output weights and the bias that gives 1 + omega_0 everywhere. An
    unguided start (omega_0 = 0) is refused: the ReLU's gradient there is 0, so that network would never train."""
    for output in ("relu", "softplus"):
        for scale in (1.05, 3.0, 40.0):
            net = initial_l2g_network(annealing.LearnToGuideConfig(prompt_dim=5, output=output), scale)
            out = 1 + net(torch.tensor([999.0, 500.0, 3.0]), torch.tensor([979.0, 480.0, -1.0]), torch.randn(3, 5))
            torch.testing.assert_close(out, torch.full((3,), scale), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="must exceed 1"):
        initial_l2g_network(annealing.LearnToGuideConfig(prompt_dim=5), 1.0)
    zero = initial_l2g_network(annealing.LearnToGuideConfig(prompt_dim=5), 1.5)
    with torch.no_grad():
        zero.head[-1].bias.zero_()  # what an unguided start would be: no gradient reaches any weight
    zero(torch.tensor([500.0]), torch.tensor([100.0]), torch.randn(1, 5)).sum().backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in zero.parameters())


# ------------------------------------------------------------------------------------------------------------ runs


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_a_run_trains_writes_a_checkpoint_the_nodes_load_and_resumes_bit_identically(tmp_path, kind):
    straight = train(l2g_config(kind, tmp_path / "straight", max_steps=4, checkpoint_every=2), progress=False)
    assert straight.steps == 4 and straight.images_seen == 8 and straight.nan_losses == 0 and straight.skipped_steps == 0
    assert straight.checkpoint.name == f"learn_to_guide_{kind}.safetensors"
    assert (tmp_path / "straight" / "checkpoints" / f"learn_to_guide_{kind}-step000002.safetensors").is_file()

    # the loader node's code path (the pack's own annealing) reads it as a Learn to Guide network, and the nodes'
    # compatibility check accepts it for its model, with no warning
    pack_annealing = pack_module("annealing")
    model = pack_annealing.load_guidance_model(straight.checkpoint)
    assert isinstance(model, pack_annealing.LearnToGuideNet) and model.metadata.method == "learn_to_guide"
    compatibility, inspection = pack_module("nodes.compatibility"), pack_module("nodes.model_inspection")
    sampling, config_name, discrete = {"sd15": ("eps", "SD15", True), "sdxl": ("eps", "SDXL", True), "sd3": ("const", "SD3", False)}[kind]
    assert compatibility.compatibility_problems(model.metadata, sampling, inspection.model_family(config_name), discrete) == (None, [])
    trainer = Trainer(l2g_config(kind, tmp_path / "unused"), progress=False)
    trainer.preflight()
    kind_of_prompt, width = trainer.info.prompt_embedding()
    assert (model.config.prompt_embedding, model.config.prompt_dim) == (("mean_tokens", 32) if kind == "sd15" else ("pooled", 32))
    assert (kind_of_prompt, width) == (model.config.prompt_embedding, model.config.prompt_dim)
    meta = model.metadata
    assert meta.model_family == kind and meta.timestep_convention == ("sigma_x1000" if kind == "sd3" else "ddpm_index")
    assert meta.training_grid.to_dict() == trainer.info.training_grid(50).to_dict()  # the pack's own class
    training = meta.training
    assert (training["steps"], training["images"], training["particles"], training["objective"]) == (4, 8, 4, "energy")
    assert (training["beta"], training["lambda"], training["reward"]) == (1.0, 1.0, None)
    assert {k: training["times"][k] for k in ("s_min", "zeta", "delta")} == {"s_min": 0.001, "zeta": 0.001, "delta": 0.1}
    assert training["base_model"] == tiny_model(kind).name and training["initial_scale"] == 3.0
    assert (model.config.output, model.config.time_input, model.config.trained_s) == ("relu", "log_snr", "continuous")
    assert (model.config.time_min, model.config.time_max) == (0.001, 0.999)
    torch.manual_seed(0)
    initial = initial_l2g_network(model.config, 3.0).state_dict()
    assert not same_weights(model.state_dict(), initial)
    out = model(torch.tensor([500.0, 20.0]), torch.tensor([480.0, -1.0]), torch.randn(2, width))
    assert out.shape == (2,) and bool((out >= 0).all())

    rows = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows[1:]] == [1, 2, 3, 4]
    assert all(r["scale_min"] <= r["scale_mean"] <= r["scale_max"] and math.isfinite(r["loss"]) for r in rows[1:])
    assert json.loads((tmp_path / "straight" / "training_report.json").read_text())["last_terms"] == straight.last_terms

    train(l2g_config(kind, tmp_path / "resumed", max_steps=2), progress=False)
    resumed = train(l2g_config(kind, tmp_path / "resumed", max_steps=4, resume=True), progress=False)
    assert resumed.resumed_from == 2
    assert same_weights(state_of(straight.checkpoint), state_of(resumed.checkpoint))
    last = json.loads((tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()[-1])
    assert {k: v for k, v in last.items() if k != "seconds"} == {k: v for k, v in rows[-1].items() if k != "seconds"}


def test_resume_refuses_another_method_or_architecture_and_reads_older_states_as_annealing(tmp_path):
    train(make_config("sd15", tmp_path / "a", max_steps=1), progress=False)
    with pytest.raises(TrainingError, match="cannot resume, method was 'annealing' and is now 'learn-to-guide'"):
        train(l2g_config("sd15", tmp_path / "a", max_steps=2, resume=True), progress=False)
    # a resume state written before the method setting existed belongs to an annealing run
    state = torch.load(tmp_path / "a" / RESUME_FILE, weights_only=True)
    locked = json.loads(state["locked"])
    del locked["method"]
    state["locked"] = json.dumps(locked)
    torch.save(state, tmp_path / "a" / RESUME_FILE)
    assert train(make_config("sd15", tmp_path / "a", max_steps=2, resume=True), progress=False).steps == 2

    train(l2g_config("sd15", tmp_path / "b", max_steps=1), progress=False)
    with pytest.raises(TrainingError, match="cannot resume, l2g_hidden was 128 and is now 64"):
        train(l2g_config("sd15", tmp_path / "b", max_steps=2, resume=True, l2g_hidden=64), progress=False)
    with pytest.raises(TrainingError, match="cannot resume, method was 'learn-to-guide' and is now 'annealing'"):
        train(make_config("sd15", tmp_path / "b", max_steps=2, resume=True), progress=False)
    # an annealing setting does not matter to a learn-to-guide run
    assert train(l2g_config("sd15", tmp_path / "b", max_steps=2, resume=True, mlp_hidden=64), progress=False).steps == 2
    # a state from before continuous (s, t) draws (it lacks their record) trained another distribution: refused
    state = torch.load(tmp_path / "b" / RESUME_FILE, weights_only=True)
    locked = json.loads(state["locked"])
    del locked["l2g_step_draw"]
    state["locked"] = json.dumps(locked)
    torch.save(state, tmp_path / "b" / RESUME_FILE)
    with pytest.raises(TrainingError, match="cannot resume, l2g_step_draw was 'grid' and is now 'continuous'"):
        train(l2g_config("sd15", tmp_path / "b", max_steps=3, resume=True), progress=False)


def test_nan_losses_are_skipped_and_counted(tmp_path, monkeypatch):
    from test_training_run import poison_images

    config = l2g_config("sd15", tmp_path / "out", max_steps=3)
    assert len(poison_images(monkeypatch, (0, 3), config)) == 2  # micro-batches 0 and 3: one in each of the first two steps
    result = train(config, progress=False)
    assert result.nan_losses == 2 and result.steps == 3 and result.images_seen == 4 and result.skipped_steps == 0
    assert all(torch.isfinite(v).all() for v in state_of(result.checkpoint).values())


def test_precomputed_embeddings_train_like_the_text_encoders(tmp_path):
    embeddings = tmp_path / "embeds"
    assert cli_main(["embed", "--model", str(tiny_model("sdxl")), "--dataset", str(tiny_dataset()), "--output", str(embeddings),
                     "--dtype", "float32", "--quiet"]) == 0
    with_embeddings = train(l2g_config("sdxl", tmp_path / "with", embeddings=str(embeddings)), progress=False)
    without = train(l2g_config("sdxl", tmp_path / "without"), progress=False)
    a, b = state_of(with_embeddings.checkpoint), state_of(without.checkpoint)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_command_line_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    status = cli_main(["--method", "learn-to-guide", "--model", str(tiny_model("sdxl")), "--dataset", str(tiny_dataset()), "--output", str(out),
                       "--resolution", "64", "--max-steps", "2", "--gradient-accumulation", "1", "--num-workers", "0", "--device", "cpu",
                       "--l2g-particles", "2", "--l2g-objective", "l2", "--lambda-min", "0.3", "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "note: this learn-to-guide run does not use lambda_min" in printed and "2 particles per image" in printed
    assert "last step: loss" in printed and "CFG scale mean" in printed
    training = annealing.load_guidance_model(out / "learn_to_guide_sdxl.safetensors").metadata.training
    assert (training["particles"], training["objective"]) == (2, "l2") and "lambda_min" not in training
    assert cli_main(["plot", str(out)]) == 0 and (out / "training_curves.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "change, message",
    [
        ({"method": "learn_to_guide"}, "method must be one of annealing, learn-to-guide; got 'learn_to_guide'"),
        ({"l2g_particles": 1}, r"l2g_particles must be an integer in \[2, 64\], got 1"),
        ({"l2g_particles": 65}, r"l2g_particles must be an integer in \[2, 64\], got 65"),
        ({"l2g_objective": "mmd"}, "l2g_objective must be one of energy, l2; got 'mmd'"),
        ({"l2g_beta": 0.0}, r"l2g_beta must be a finite number in \(0, 2\], got 0.0"),
        ({"l2g_beta": 2.5}, r"l2g_beta must be a finite number in \(0, 2\]"),
        ({"l2g_lambda": -0.1}, r"l2g_lambda must be a finite number in \[0, 1\]"),
        ({"l2g_s_min": 0.0}, r"l2g_s_min must be a finite number in \(0, 1\)"),
        ({"l2g_zeta": 1.0}, r"l2g_zeta must be a finite number in \(0, 1\)"),
        ({"l2g_delta": float("inf")}, "l2g_delta must be a finite number"),
        ({"l2g_s_min": 0.5, "l2g_delta": 0.3, "l2g_zeta": 0.25}, r"learn-to-guide times \(l2g_s_min, l2g_delta, l2g_zeta\): s_min \+ delta"),
        ({"l2g_time_input": "fourier"}, "l2g_time_input must be one of log_snr, cosine"),
        ({"l2g_reward": "pickscore"}, "l2g_reward must be one of none, clip"),
        ({"l2g_reward": "clip"}, "l2g_reward clip needs l2g_reward_model"),
        ({"l2g_reward_weight": -1.0}, r"l2g_reward_weight must be a finite number in \[0, 1e\+06\]"),
        ({"l2g_reward_model": "x\0y"}, "l2g_reward_model must be a path"),
        ({"l2g_hidden": 0}, r"l2g_hidden must be an integer in \[1, 2048\]"),
        ({"l2g_layers": 17}, r"l2g_layers must be an integer in \[0, 16\]"),
        ({"l2g_projection": 4096}, r"l2g_projection must be an integer in \[1, 1024\]"),
        ({"l2g_initial_scale": 1.0}, r"l2g_initial_scale must be a finite number in \(1, 100\], got 1.0"),
        ({"l2g_initial_scale": float("nan")}, "l2g_initial_scale must be a finite number"),
        ({"l2g_particles": 4.0}, "l2g_particles must be an integer, got 4.0"),
        ({"l2g_hidden": 2048, "l2g_layers": 16}, "learn-to-guide network settings .* parameters"),
    ],
)
def test_every_new_setting_is_checked_with_one_line_naming_it(change, message):
    with pytest.raises(TrainingError, match=message) as info:
        TrainConfig(**{"model": "m", "dataset": "d", "output": "o", "method": "learn-to-guide", **change}).validate()
    assert "\n" not in str(info.value)


def test_bad_settings_fail_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import training.run_parts

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(training.run_parts, "load_backend", no_loading)
    common = ["--method", "learn-to-guide", "--model", str(tiny_model("sd15")), "--dataset", str(tiny_dataset()), "--output",
              str(tmp_path / "out"), "--quiet"]
    capsys.readouterr()  # what building the tiny model printed (transformers' import notes) is not the CLI's
    # the last one passes the settings' check (a 1-wide prompt fits the core's parameter bound) and fails on the model's
    # prompt width, read from its configs: the tiny SD1.5's 32-wide mean token embedding puts it 19 k parameters over
    too_big = ["--l2g-hidden", "1982", "--l2g-layers", "8", "--l2g-projection", "1024"]
    TrainConfig(model="m", dataset="d", output="o", method="learn-to-guide", l2g_hidden=1982, l2g_layers=8, l2g_projection=1024).validate()
    for flags in (["--l2g-particles", "0"], ["--l2g-initial-scale", "inf"], ["--l2g-hidden", "0"], too_big):
        assert cli_main(common + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "l2g_" in err or "learn-to-guide network settings" in err
    assert "parameters" in err
    assert not (tmp_path / "out").exists()


def test_settings_of_the_other_method_are_named_when_set():
    base = {"model": "m", "dataset": "d", "output": "o"}
    assert TrainConfig(**base, method="learn-to-guide", lambda_min=0.2, balance="on", cads=True).inapplicable() == ["lambda_min", "balance"]
    assert TrainConfig(**base, l2g_particles=8).inapplicable() == ["l2g_particles"]
    assert TrainConfig(**base, method="learn-to-guide").inapplicable() == []
    # within Learn to Guide: l2 has no beta or lambda, and without a reward its weight and model are unused
    assert TrainConfig(**base, method="learn-to-guide", l2g_objective="l2", l2g_beta=1.5, l2g_reward_weight=2.0).inapplicable() == [
        "l2g_beta", "l2g_reward_weight"]
