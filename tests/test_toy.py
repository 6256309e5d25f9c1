"""The 2D benchmark: the exact denoiser against Monte Carlo, the training backend, the inference path on the trained
checkpoint, the metrics, and the CLI pipeline in quick mode (pipeline and maths, never the ranking)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import annealing
from annealing import AnnealingGuidance, AnnealingOptions
from annealing.training_grid import VPGrid
from training.algorithm import CADSConfig, SamplingGrid, annealing_loss
from training.toy import checked_docs as toy_docs
from training.toy.__main__ import build_config, main, parse_args
from training.toy.metrics import Evaluator, manifold_threshold, sliced_wasserstein
from training.toy.problem import ExactRingDenoiser, RingProblem
from training.toy.report import step_table
from training.toy.samplers import Annealing, CFGPlusPlus, ReadAnnealing, ReadCFGPlusPlus, ToySampler
from training.toy.train import TOY_MODEL_CONFIG

ABAR = VPGrid().alphas_cumprod()


def _model_samples(problem: RingProblem, cond: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """x0 ~ the model's mixture under condition ``cond`` (1, C): component by its weight pi_k, then N(mu_k, s^2 I)."""
    weights = problem.log_mode_weights(cond.double()).exp().reshape(-1)
    comp = torch.multinomial(weights, count, replacement=True, generator=gen)
    return problem.means(torch.float64)[comp] + problem.mode_std * torch.randn(count, 2, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("leak", [0.0, 0.5])
@pytest.mark.parametrize("timestep", [100, 450, 900])
def test_exact_eps_matches_a_monte_carlo_posterior_mean(timestep, leak):
    """E[eps | z] by self-normalised importance sampling over prior draws x0: weights N(z; a x0, sig^2 I), eps = (z - a x0) / sig."""
    problem = RingProblem(condition_leak=leak)
    gen = torch.Generator().manual_seed(timestep)
    a, sig = float(ABAR[timestep].sqrt()), float((1 - ABAR[timestep]).sqrt())
    conds = [problem.one_hot(torch.tensor([1]), torch.float64), problem.uncond(1, torch.float64)]
    z = torch.tensor([[0.9, 0.3], [-0.2, 0.7], [0.1, -1.1]], dtype=torch.float64) * a + torch.tensor([[0.1, -0.2], [0.3, 0.1], [-0.2, 0.2]], dtype=torch.float64) * sig
    for cond in conds:
        x0 = _model_samples(problem, cond, 400_000, gen)
        exact = problem.eps(z, a, sig, cond.expand(z.shape[0], -1))
        for i in range(z.shape[0]):
            logw = -((z[i] - a * x0) ** 2).sum(1) / (2 * sig**2)
            weights = torch.softmax(logw, 0)
            eps_samples = (z[i] - a * x0) / sig
            estimate = weights @ eps_samples
            # standard error of the self-normalised estimate, from the effective sample size
            ess = 1.0 / float((weights**2).sum())
            spread = float(((eps_samples - estimate) ** 2).sum(1).mul(weights).sum().sqrt())
            tolerance = 5 * spread / math.sqrt(ess) + 1e-6
            assert ess > 200, f"too few effective samples ({ess:.0f}) for a meaningful check"
            assert float((exact[i] - estimate).norm()) < tolerance, (timestep, leak, i, exact[i], estimate, tolerance)


def test_exact_eps_is_tweedie_on_the_closed_form_marginal():
    """eps = -sig * grad_z log p_t(z), with p_t the mixture of N(a mu_k, (a^2 s^2 + sig^2) I): an independent exact identity."""
    problem = RingProblem()
    a, sig = 0.6, 0.8
    z = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    cond = problem.one_hot(torch.arange(16) % 3, torch.float64)
    log_marginal = torch.logsumexp(problem.component_log_joint(z, cond, a, sig), dim=1).sum()
    (grad,) = torch.autograd.grad(log_marginal, z)
    torch.testing.assert_close(problem.eps(z.detach(), a, sig, cond), -sig * grad)


def test_condition_vectors_and_leak():
    problem = RingProblem(condition_leak=0.5)
    one_hot = problem.one_hot(torch.tensor([0, 2]))
    torch.testing.assert_close(problem.class_weights(one_hot), torch.tensor([[2 / 3, 1 / 6, 1 / 6], [1 / 6, 1 / 6, 2 / 3]]))
    torch.testing.assert_close(problem.class_weights(problem.uncond(2)), torch.full((2, 3), 1 / 3))
    exact = RingProblem(condition_leak=0.0)
    torch.testing.assert_close(exact.class_weights(one_hot), one_hot)
    # class c owns the arc of modes 4c .. 4c + 3, and samples of class c land nearest to those modes
    assert exact.mode_class().tolist() == [0] * 4 + [1] * 4 + [2] * 4
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2]).repeat(500)
    x = exact.sample(labels, gen)
    assert (exact.mode_class()[exact.nearest_mode(x)] == labels).double().mean() > 0.8
    with pytest.raises(ValueError, match="condition_leak"):
        RingProblem(condition_leak=1.0)
    with pytest.raises(ValueError, match="multiple"):
        RingProblem(num_modes=10, num_classes=3)


def test_backend_trains_through_annealing_loss_and_pass_two_is_differentiable():
    problem = RingProblem()
    backend = ExactRingDenoiser(problem, ABAR)
    grid = SamplingGrid.vp_ddim(50)
    model = annealing.GuidanceScaleModel(TOY_MODEL_CONFIG)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (64,), generator=gen)
    x0 = problem.sample(labels, gen)
    # lambda = 1: only the alignment term, which reaches the MLP only through pass 2 (the exact denoiser at z_{t-1})
    terms = annealing_loss(backend, model, x0, problem.one_hot(labels), problem.uncond(64), grid, lam=torch.ones(64),
                           grid_index=torch.full((64,), 30), generator=gen)
    terms.total.backward()
    assert float(terms.quality) == 0.0 and float(terms.alignment) > 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_cads_analogue_perturbs_only_at_high_noise():
    problem = RingProblem()
    backend = ExactRingDenoiser(problem, ABAR, CADSConfig())
    cond = problem.one_hot(torch.tensor([0, 1, 2, 0]))
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(backend.perturb(cond, torch.zeros(4), gen), cond)  # t = 0: gamma = 1, unchanged
    noisy = backend.perturb(cond, torch.full((4,), 0.98), gen)
    assert not torch.allclose(noisy, cond)
    weights = problem.class_weights(noisy)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    assert torch.all(weights >= 0)


def test_metrics_behave_on_known_cases():
    problem = RingProblem()
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(1000)
    reference = problem.sample(labels, gen)
    evaluator = Evaluator(problem, reference, labels, manifold_threshold(problem, gen, count=50_000), gen)
    exact = evaluator(problem.sample(labels, gen))
    assert exact["coverage"] == 1.0
    assert 0.0 <= exact["off"] < 0.03  # ~1% by construction
    assert exact["sw"] < 0.06 and abs(exact["mmd"]) < 5
    assert 0.85 < exact["align"] < 0.99  # neighbouring arcs overlap
    # every sample of a class on one mode: coverage 1/4 of the modes, far from p(x | c)
    collapsed = problem.means()[labels * 4 + 1]
    worse = evaluator(collapsed)
    assert worse["coverage"] == pytest.approx(0.25) and worse["sw"] > exact["sw"] and worse["mmd"] > 50
    # far outside the ring: all off the manifold
    assert evaluator(3 * reference)["off"] > 0.99
    # SW of a translated copy: |delta| * sqrt(mean cos^2) ~ |delta| / sqrt(2)
    directions = evaluator.directions
    x = reference[:1000].double()
    assert sliced_wasserstein(x, x, directions) == 0.0
    shifted = sliced_wasserstein(x, x + torch.tensor([0.3, 0.0], dtype=torch.float64), directions)
    assert shifted == pytest.approx(0.3 / math.sqrt(2), rel=0.1)


# ------------------------------------------------------------------------------------------------ the pipeline (CLI)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    assert main(["--out", str(out), "--quick", "--no-progress", "--samples", "120"]) == 0
    return out


def test_quick_run_writes_every_result(quick_run, capsys):
    names = {p.name for p in quick_run.iterdir()}
    expected = {"results.json", "results.md", "toy-front.png", "toy-samples.png", "toy-w-trajectories.png", "toy-step-counts.png",
                "annealing_toy2d_seed0.safetensors"}
    assert expected <= names
    assert not [n for n in names if n.endswith(".tmp")]
    for png in ("toy-front.png", "toy-samples.png", "toy-w-trajectories.png", "toy-step-counts.png"):
        size = (quick_run / png).stat().st_size
        assert 10_000 < size < 300_000, (png, size)
    data = json.loads((quick_run / "results.json").read_text())
    families = {row["family"] for row in data["methods"]}
    assert families == {"exact", "CFG", "CFG++", "annealing", "TV-CFG", "ADG", "APG", "interval", "learn-to-guide"}
    for row in data["methods"]:
        for metric, summary in row["metrics"].items():
            assert math.isfinite(summary["mean"]) and len(summary["per_seed"]) == 1, (row["label"], metric)
    table = (quick_run / "results.md").read_text()
    assert "| annealing | lambda=0.4 |" in table and "| learn-to-guide |" in table


def test_checkpoint_metadata(quick_run):
    model = annealing.load_guidance_model(quick_run / "annealing_toy2d_seed0.safetensors")
    meta = model.metadata
    assert (meta.model_family, meta.prediction_space, meta.timestep_convention) == ("toy2d", "epsilon", "ddpm_index")
    assert meta.trained_latent_numel == 2 and meta.sampling_steps == 50
    assert meta.training["seed"] == 0 and meta.training["problem"]["num_classes"] == 3
    assert model.config == TOY_MODEL_CONFIG


def test_refuses_a_non_empty_output_folder(quick_run, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(quick_run), "--quick"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--force" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["--out", str(quick_run / "x"), "--samples", "3"])
    assert "--samples" in capsys.readouterr().err


def test_help_states_the_defaults_the_benchmark_runs_with(capsys):
    """The defaults --help promises are the ones the benchmark's config really has (full and --quick runs)."""
    from training.toy.benchmark import BenchmarkConfig

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    full, quick = BenchmarkConfig(), BenchmarkConfig.quick_mode()

    def spaced(values):
        return " ".join(str(v) for v in values)

    assert f"default {spaced(full.seeds)}, or {spaced(quick.seeds)} with --quick" in text
    assert f"default {full.samples_per_class}, or {quick.samples_per_class} with --quick" in text
    assert f"{quick.samples_per_class} samples per class" in text
    assert f"default {spaced(full.step_counts)}; {spaced(quick.step_counts)} with --quick" in text
    assert f"default {full.sampling_steps}, as upstream" in text


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_trained_checkpoint_cfgpp_loop_equals_guide_with_euler(quick_run, lam):
    """The inference path: AnnealingGuidance.guide with a plain Euler sampler in x-space (k factor) retraces the DDIM CFG++
    loop the benchmark samples with, on the checkpoint the benchmark trained and saved."""
    model = annealing.load_guidance_model(quick_run / "annealing_toy2d_seed0.safetensors")
    problem = RingProblem()
    grid = SamplingGrid.vp_ddim(50)
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(3).repeat(8)
    noise = torch.randn(labels.shape[0], 2, generator=gen, dtype=torch.float64)
    reference = ToySampler(problem, grid, ABAR).run(Annealing(lam, model), noise, labels)

    schedule = ((1 - ABAR) / ABAR).sqrt()
    sigmas = torch.cat([schedule[grid.model_timesteps.long()], torch.zeros(1, dtype=torch.float64)])
    guide = AnnealingGuidance(model, AnnealingOptions(lam=lam))
    cond, uncond = problem.one_hot(labels, torch.float64), problem.uncond(labels.shape[0], torch.float64)
    x = noise * (1 + sigmas[0] ** 2).sqrt()  # z_T -> x = z / a = z sqrt(1 + sigma^2)
    for i in range(len(grid)):
        s = sigmas[i]
        a, sig = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
        d_c = problem.posterior_mean(x * a, a, sig, cond)
        d_u = problem.posterior_mean(x * a, a, sig, uncond)
        d = guide.guide(s.expand(labels.shape[0]), d_c, d_u, sampling="eps")  # anchored: on the training grid, the CFG++ step
        x = x + (sigmas[i + 1] - s) * (x - d) / s
    torch.testing.assert_close(x, reference.double(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------- the step-count study


def _run(method, steps: int, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return ToySampler(RingProblem(), SamplingGrid.vp_ddim(steps), ABAR).run(method, noise, labels)


def test_per_step_reading_is_the_cfgpp_step_and_both_readings_agree_on_the_training_grid(quick_run):
    """The core's scale rule under a plain DDIM sampler: per_step reproduces the CFG++ step at any step count; on the
    training grid anchored is the same step; elsewhere the two readings differ."""
    model = annealing.load_guidance_model(quick_run / "annealing_toy2d_seed0.safetensors")
    train = VPGrid(50)
    labels = torch.arange(3).repeat(20)
    noise = torch.randn(labels.shape[0], 2, generator=torch.Generator().manual_seed(5))
    for steps in (20, 50):
        cfgpp = _run(CFGPlusPlus(0.2), steps, labels, noise)
        anneal = _run(Annealing(0.4, model), steps, labels, noise)
        torch.testing.assert_close(_run(ReadCFGPlusPlus(0.2, "per_step", train), steps, labels, noise), cfgpp, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(_run(ReadAnnealing(0.4, model, "per_step"), steps, labels, noise), anneal, atol=1e-4, rtol=1e-4)
        anchored_cfgpp = _run(ReadCFGPlusPlus(0.2, "anchored", train), steps, labels, noise)
        anchored_anneal = _run(ReadAnnealing(0.4, model, "anchored"), steps, labels, noise)
        if steps == 50:
            torch.testing.assert_close(anchored_cfgpp, cfgpp, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(anchored_anneal, anneal, atol=1e-4, rtol=1e-4)
        else:
            assert float((anchored_cfgpp - cfgpp).norm(dim=1).mean()) > 0.1
            assert float((anchored_anneal - anneal).norm(dim=1).mean()) > 0.1


def test_anchored_reading_converges_with_the_step_count_and_per_step_does_not():
    """Anchored, w = 0.2 is one CFG scale per noise level, so DDIM converges to its ODE as steps grow (here towards 1000
    steps, the finest leading grid that still starts near t = 999); per_step's guidance grows with the step count."""
    train = VPGrid(50)
    labels = torch.arange(3).repeat(30)
    noise = torch.randn(labels.shape[0], 2, generator=torch.Generator().manual_seed(6))
    gaps = {}
    for mode in ("anchored", "per_step"):
        runs = {n: _run(ReadCFGPlusPlus(0.2, mode, train), n, labels, noise) for n in (25, 100, 200, 1000)}
        gaps[mode] = [float((runs[n] - runs[1000]).norm(dim=1).mean()) for n in (25, 100, 200)]
    anchored, per_step = gaps["anchored"], gaps["per_step"]
    assert anchored[0] > anchored[1] > anchored[2] and anchored[2] < 0.02, gaps
    assert min(per_step) > 0.3 and per_step[2] > 10 * anchored[2], gaps


def test_quick_run_reports_the_step_count_study(quick_run):
    data = json.loads((quick_run / "results.json").read_text())
    study, config = data["step_study"], data["config"]
    assert study["step_counts"] == config["step_counts"] == [10, 50] and study["training_steps"] == 50
    keys = {(r["family"], r["param"], r["mode"], r["steps"]) for r in study["rows"]}
    settings = [(family, p) for family, params in config["step_study_settings"].items() for p in params]
    assert keys == {(f, p, mode, n) for f, p in settings for mode in ("anchored", "per_step") for n in (10, 50)}
    rows = {(r["family"], r["param"], r["mode"], r["steps"]): r["metrics"] for r in study["rows"]}
    main_rows = {(r["family"], r["param"]): r["metrics"] for r in data["methods"]}
    for family, param in settings:
        # on the training grid both readings are the benchmark's own sampler: the main table's numbers
        for mode in ("anchored", "per_step"):
            assert rows[(family, param, mode, 50)]["sw"]["mean"] == pytest.approx(main_rows[(family, param)]["sw"]["mean"], abs=2e-3)
        assert rows[(family, param, "anchored", 10)]["sw"]["mean"] != pytest.approx(rows[(family, param, "per_step", 10)]["sw"]["mean"], abs=1e-3)
    table = (quick_run / "results.md").read_text()
    assert "| CFG++ | w=0.2 | anchored |" in table and "| annealing | lambda=0.4 | per_step |" in table
    stats = data["annealing_w"]["per_lambda"]["0.4"]
    assert stats["w_min"] <= stats["w_mean_last"] <= stats["w_max"] and 0 <= stats["non_monotone_fraction"] <= 1
    assert 0 <= stats["delta_norm_p01"] < stats["delta_norm_p99"]


def test_step_counts_option():
    assert build_config(parse_args(["--out", "x"])).step_counts == (10, 20, 50, 100, 200)
    assert build_config(parse_args(["--out", "x", "--quick"])).step_counts == (10, 50)
    assert build_config(parse_args(["--out", "x", "--step-counts", "15", "30"])).step_counts == (15, 30)
    assert build_config(parse_args(["--out", "x", "--step-counts"])).step_counts == ()


@pytest.mark.parametrize("counts", [["1"], ["10", "10"], ["2000"]])
def test_step_counts_option_is_validated(counts, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x"), "--step-counts", *counts])
    assert exc.value.code == 2 and "--step-counts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------- the docs generator


def _table_rows(lines: list[str]) -> list[list[str]]:
    """Cells of a markdown table's body rows; asserts every row has the header's column count."""
    width = lines[0].count(" | ") + 1
    assert set(lines[1].replace("|", "")) <= {"-", ":"}, lines[1]
    body = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]
    assert all(len(cells) == width for cells in body), lines
    return body


def test_generated_tables_are_well_formed_and_carry_the_results_numbers(quick_run):
    data = json.loads((quick_run / "results.json").read_text())
    by_family = {}
    for r in data["methods"]:
        by_family.setdefault(r["family"], []).append(r)
    body = _table_rows(toy_docs.best_table(data))
    assert body[0][0] == "exact samples" and body[1][0] == "CFG w = 1 (no guidance)"
    for cells in body[2:]:
        family = next(f for f in toy_docs.README_FAMILIES if cells[0] == "Learn to Guide" and f == "learn-to-guide"
                      or cells[0].startswith(f + " "))
        lowest = min(by_family[family], key=lambda r: r["metrics"]["sw"]["mean"])  # the stated rule
        if family != "learn-to-guide":
            assert cells[0].endswith(f"= {lowest['param']:g}")
        for column, metric, digits in ((1, "sw", 3), (2, "align", 3), (3, "off", 3), (4, "coverage", 2)):
            assert cells[column] == f"{lowest['metrics'][metric]['mean']:.{digits}f}", (cells, metric)
    assert len(body) == 2 + len(toy_docs.README_FAMILIES)

    study = _table_rows(step_table(data))
    rows = {(r["family"], r["param"], r["mode"], r["steps"]): r["metrics"] for r in data["step_study"]["rows"]}
    assert len(study) == len({k[:3] for k in rows})
    for cells in study:
        family, param, mode = cells[0], float(cells[1].split("=")[1]), cells[2]
        for n, cell in zip(data["step_study"]["step_counts"], cells[3:]):
            metrics = rows[(family, param, mode, n)]
            assert cell == f"{metrics['sw']['mean']:.3f} / {metrics['align']['mean']:.3f}"


def test_committed_docs_are_what_the_committed_results_say(capsys):
    """docs/toy-benchmark.md and the README's 2D-benchmark section equal what the generator makes of docs/toy-results."""
    assert toy_docs.main(["--check"]) == 0, capsys.readouterr().err
    readme = (toy_docs.ROOT / "README.md").read_text()
    assert readme.count("<!-- toy-table:start") == 1 and toy_docs.BEST_RULE.split(":")[0] in readme.replace("\n", " ")
    for plot in toy_docs.PLOTS:
        assert (toy_docs.ROOT / "docs" / "images" / plot).is_file()


def test_the_check_notices_a_stale_doc_and_the_generator_rewrites_it(tmp_path, capsys):
    root = tmp_path / "repo"
    for path in (toy_docs.RESULTS / "main.json", toy_docs.RESULTS / "leak0.json", toy_docs.DOC, toy_docs.README):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text((toy_docs.ROOT / path).read_text())
    rendered = toy_docs.render(root)
    assert rendered[root / toy_docs.DOC] == (root / toy_docs.DOC).read_text()
    # a number changed by hand inside a block is overwritten; text outside the blocks is kept
    doc = (root / toy_docs.DOC).read_text()
    tampered = doc.replace("| CFG | w=3 | ", "| CFG | w=3 | 9", 1) + "\nhand-written tail\n"
    assert tampered != doc + "\nhand-written tail\n"
    (root / toy_docs.DOC).write_text(tampered)
    again = toy_docs.render(root)[root / toy_docs.DOC]
    assert again == doc + "\nhand-written tail\n"
    with pytest.raises(ValueError, match="toy-steps"):
        toy_docs.fill(doc.replace("<!-- toy-steps:end -->", ""), {"toy-steps": "x"}, "doc")


def test_a_sentence_the_results_contradict_stops_the_generator():
    runs = toy_docs.load_runs()
    main_run = runs["main"]
    toy_docs.reading(main_run)  # the committed results support every sentence
    for r in main_run["methods"]:
        if r["family"] == "annealing":  # pretend annealing stayed on the ring
            r["metrics"]["off"]["mean"] = 0.004
    with pytest.raises(toy_docs.StaleClaim, match="over-guides"):
        toy_docs.reading(main_run)


def test_the_docs_say_which_regime_the_benchmark_tests_and_check_it():
    """The page says plainly that annealing over-guides here, with the scale it applies against CFG's best; a run where
    it did not would stop the generator."""
    main_run = toy_docs.load_runs()["main"]
    text = " ".join(toy_docs.regime(main_run).split())
    omega = min(s["omega_mean_first"] for s in main_run["annealing_w"]["per_lambda"].values())
    assert "over-guides" in text and f"ω ≈ {omega:.0f} at the first step" in text
    assert f"w = {toy_docs.best(main_run, 'CFG')['param']:g}" in text
    assert "<!-- toy-regime:start" in (toy_docs.ROOT / toy_docs.DOC).read_text()
    for stats in main_run["annealing_w"]["per_lambda"].values():  # pretend annealing learned CFG's scale
        stats["omega_mean_first"] = 3.0
    with pytest.raises(toy_docs.StaleClaim, match="over-guides"):
        toy_docs.regime(main_run)


def test_import_copies_a_run_into_the_docs(quick_run, tmp_path):
    root = tmp_path / "repo"
    (root / "docs" / "images").mkdir(parents=True)
    written = toy_docs.import_run(quick_run, "main", root)
    assert (root / toy_docs.RESULTS / "main.json").read_text() == (quick_run / "results.json").read_text()
    assert {p.name for p in written} == {"main.json", *toy_docs.PLOTS}
    with pytest.raises(FileNotFoundError, match="results.json"):
        toy_docs.import_run(tmp_path / "nowhere", "leak0", root)
