"""Every figure the pack draws, rendered from small inputs and checked the way a reader would need it (tests/figure_checks.py):
no wider than a README column, text large enough and inside the image, no text over another, every line and band named
in a legend or on the plot, axis labels on every axis with tick labels. Plus what each figure promises in particular:
coinciding batch items stay visible and are said to coincide, the explorer has no empty panel and labels both ends of
its timestep axis, the step-count plot draws real error bars, the palette stays apart for colour-blind readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from figure_checks import all_axes, check_figure, check_lines_named, check_text, drawn_texts
from matplotlib.container import ErrorbarContainer

from annealing import figure_style as style
from annealing.plots import DELTA_NORM_MULTIPLES, DELTA_NORMS_HELP, plot_model_explorer, plot_trace
from annealing.recorder import GuidanceTrace

REPO = Path(__file__).resolve().parents[1]


def legend_texts(fig) -> list[str]:
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    for sub in fig.subfigs:
        texts += legend_texts(sub)
    for ax in fig.axes:
        if ax.get_legend() is not None:
            texts += [t.get_text() for t in ax.get_legend().get_texts()]
    return texts


# ------------------------------------------------------------------------------------------------------ schedule plot


def trace_of(omega: np.ndarray, w: np.ndarray, active: np.ndarray | None = None) -> GuidanceTrace:
    """A recorded run, (steps, batch) per field, as the recorder hands it to the Schedule Plot node."""
    steps, batch = omega.shape
    sigma = np.tile(np.linspace(14.6, 0.03, steps)[:, None], (1, batch))
    values = {"sigma": sigma, "timestep": np.tile(np.linspace(999, 0, steps)[:, None], (1, batch)), "delta_norm": 5 * w,
              "mlp_delta_norm": 5 * w + 0.1 * np.arange(batch), "w": w, "scale": omega + 1, "omega": omega,
              "active": np.ones_like(w) if active is None else active}
    return GuidanceTrace(steps=list(range(steps)), values=values, evaluations=steps)


def three_items(steps: int = 20, offset: float = 0.0):
    """Items 0 and 2 on (nearly, with ``offset``) the same curve, item 1 apart."""
    t = np.linspace(0, 1, steps)
    w0 = 2.0 - 0.3 * t
    w = np.stack([w0, w0 - 0.05 * np.sin(3 * t), w0 + offset], axis=1)
    omega = w * (10 + 8 * np.sin(np.pi * t))[:, None]
    return omega, w


def test_schedule_plot_reads_at_natural_size_and_names_every_line():
    omega, w = three_items()
    active = np.ones_like(w)
    active[-3:] = 0
    fig = plot_trace(trace_of(omega, w + np.array([0, 0, 1e-3]), active), title="a checkpoint: lambda 0.4, euler")
    check_figure(fig)
    texts = legend_texts(fig)
    assert any("dotted" in t and "‖δ‖" in t for t in texts), texts  # the dotted lines have their entry
    assert any("outside the active range" in t for t in texts)
    for legend in fig.legends:  # below the axes, not beside the title
        box = legend.get_window_extent()
        assert box.y1 <= min(ax.get_window_extent().y0 for ax in fig.axes) + 1


def test_schedule_plot_keeps_coinciding_items_visible_and_says_so():
    """Items 0 and 2 within a hair of each other: each keeps its own look (colour, marker, line width, so the thinner one
    drawn on top leaves the other showing) and the legend says item 2 lies on item 0. Identical items share one entry."""
    omega, w = three_items(offset=1e-3)
    top = plot_trace(trace_of(omega, w)).axes[0]
    item_lines = [line for line in top.get_lines() if line.get_label().startswith("item")]
    assert len(item_lines) == 3
    looks = {(line.get_color(), line.get_marker(), line.get_linewidth()) for line in item_lines}
    assert len(looks) == 3
    zero, two = item_lines[0], item_lines[2]
    assert zero.get_linewidth() > two.get_linewidth() and two.get_zorder() > zero.get_zorder()
    assert "within 1 % of item 0" in two.get_label()
    assert "within" not in item_lines[1].get_label()

    omega, w = three_items(offset=0.0)
    fig = plot_trace(trace_of(omega, w))
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["items 0, 2 (identical)", "item 1"]
    check_lines_named(fig)


def test_schedule_plot_names_items_that_coincide_in_one_panel_only():
    """Three items on one omega curve whose w differ: the omega panel says, next to its curves, that they coincide there."""
    t = np.linspace(0, 1, 30)
    w = np.stack([2.0 - 0.3 * t, 2.0 - 0.2 * t, 2.0 - 0.1 * t], axis=1)
    omega = np.tile((20 + 8 * np.sin(np.pi * t))[:, None], (1, 3)) * np.array([1.0, 1.002, 0.998])
    fig = plot_trace(trace_of(omega, w))
    top, bottom = fig.axes[:2]
    notes = [t.get_text() for t in top.texts] + [top.get_title()]
    assert any("items 0, 1, 2 lie within 1 % of each other here" in n for n in notes), notes
    assert not any("within 1 %" in t.get_text() for t in bottom.texts)
    check_figure(fig)


def test_schedule_plot_of_a_large_batch_and_of_no_run():
    t = np.linspace(0, 1, 12)[:, None]
    w = 1.5 + 0.1 * np.arange(12)[None, :] * t
    check_figure(plot_trace(trace_of(w * 10, w)))
    empty = plot_trace(GuidanceTrace(steps=[]))
    check_text(empty)
    assert "run a sampler first" in " ".join(t.get_text() for t in drawn_texts(empty))


def test_schedule_plot_note_sits_above_the_plot_clear_of_the_titles():
    omega, w = three_items()
    fig = plot_trace(trace_of(omega, w), title="a long title of a checkpoint file name: lambda 0.4, dpmpp_2m\nsome rule",
                     note="these samples match none of this guider's runs: showing its latest run")
    check_figure(fig)


# ----------------------------------------------------------------------------------------------------------- explorer


def test_explorer_reads_at_natural_size(make_guidance_model):
    fig = plot_model_explorer(make_guidance_model())
    check_figure(fig)
    axes = all_axes(fig)
    assert all(ax.has_data() or not ax.axison for ax in axes)
    shown = [ax for ax in axes if ax.axison and ax.get_images()]
    assert len(shown) == 6  # one heatmap per default lambda
    hidden = [ax for ax in axes if not ax.axison]
    assert not hidden  # six heatmaps fill a 3 x 2 grid: no empty quarter


def test_explorer_timestep_axis_runs_as_sampling_does_and_labels_its_ends(make_guidance_model):
    fig = plot_model_explorer(make_guidance_model(), lambdas=[0.0, 1.0])
    fig.canvas.draw()
    line_axes = [ax for ax in all_axes(fig) if ax.get_lines()]
    for ax in line_axes:
        left, right = ax.get_xlim()
        assert left > right  # the noisiest timestep first
        ticks = ax.get_xticks()
        assert ticks[0] == 999 and ticks[-1] == 0
        labels = [t.get_text() for t in ax.get_xticklabels()]  # the visible ones: the row above shares the bottom row's
        assert not labels or (labels[0] == "999" and labels[-1] == "0")
    assert sum(bool(ax.get_xticklabels()) for ax in line_axes) == 4  # one labelled row of four panels
    words = " ".join(t.get_text().replace("\n", " ") for t in drawn_texts(fig))
    assert "sampling runs left to right" in words


def test_explorer_explains_its_bands_and_draws_the_delta_norms_the_help_names(make_guidance_model, capsys):
    model = make_guidance_model()
    fig = plot_model_explorer(model, lambdas=[0.4])
    words = " ".join(t.get_text().replace("\n", " ") for t in drawn_texts(fig))
    norm = model.config.delta_embed_normalization
    assert "horizontal bands" in words and f"cos(k·‖δ‖/{norm:g})" in words
    period = 2 * np.pi * norm / (model.config.delta_embed_dim - 1)  # the shortest period, written out here
    assert f"{period:.3g}" in words
    titles = [ax.get_title() for ax in all_axes(fig) if ax.get_lines()]
    for multiple in DELTA_NORM_MULTIPLES:
        assert f"ω at ‖δ‖ = {multiple * norm:g}" in titles
    from annealing.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["plot", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert " ".join(DELTA_NORMS_HELP.split()) in help_text
    assert "1, 2, 4 and 6 x" in help_text


def test_explorer_with_few_or_many_lambdas_and_a_flow_checkpoint(make_guidance_model):
    check_figure(plot_model_explorer(make_guidance_model(), lambdas=[0.5]))
    check_figure(plot_model_explorer(make_guidance_model(convention="sigma_x1000"), lambdas=[i / 11 for i in range(12)]))


def test_learned_explorer_reads_at_natural_size():
    from annealing import CheckpointMetadata, LearnToGuideConfig, LearnToGuideNet

    torch.manual_seed(0)
    meta = CheckpointMetadata(model_family="sdxl", timestep_convention="ddpm_index", prediction_space="epsilon", method="learn_to_guide")
    model = LearnToGuideNet(LearnToGuideConfig(prompt_dim=16, prompt_embedding="pooled", hidden_size=32), meta).eval()
    check_figure(plot_model_explorer(model))
    check_figure(plot_model_explorer(model, prompts={"a prompt": torch.randn(16), "another": torch.randn(16)}))


# ---------------------------------------------------------------------------------------------------- training curves


def log_rows(balanced: bool) -> list[dict]:
    return [{"step": s, "quality": 0.5 / s + 0.05, "alignment": 0.002, "w_mean": 1 + 0.01 * s, "w_min": 0.7, "w_max": 1.6,
             "delta_weight": (1 + s) if balanced else 1.0} for s in range(1, 41)]


@pytest.mark.parametrize("balanced", [False, True])
def test_annealing_training_curves_read_at_natural_size(balanced):
    from training.plots import annealing_figure

    fig = annealing_figure(log_rows(balanced))
    check_figure(fig)
    assert len(fig.axes) == (3 if balanced else 2)


def test_learn_to_guide_training_curves_read_at_natural_size():
    from training.plots import learn_to_guide_figure

    rows = [{"step": s, "loss": 0.1 / s - 0.002, "scale_mean": 3 + 0.01 * s, "scale_min": 2, "scale_max": 5} for s in range(1, 41)]
    check_figure(learn_to_guide_figure(rows))


# ------------------------------------------------------------------------------------------------------- 2D benchmark


FAMILIES = {"CFG": ("w", [1.0, 1.5, 2.0, 3.0, 5.0]), "CFG++": ("w", [0.1, 0.2, 0.5]), "annealing": ("lambda", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
            "TV-CFG": ("w_bar", [1.5, 3.0]), "ADG": ("w", [2.0, 3.0]), "APG": ("w", [2.0, 3.0]), "interval": ("w", [2.0, 3.0])}


def metric(mean: float, std: float = 0.01) -> dict:
    return {"mean": mean, "std": std, "per_seed": [mean]}


def small_results(seed: int = 0) -> dict:
    """A results dict like the benchmark's, crowded where the real one is: annealing's six settings within a few pixels."""
    gen = torch.Generator().manual_seed(seed)
    methods = [{"family": "exact", "param_name": None, "param": None, "label": "exact samples",
                "metrics": {"sw": metric(0.02), "mmd": metric(0.0), "off": metric(0.009), "align": metric(0.93), "coverage": metric(1.0)}}]
    for f, (family, (name, params)) in enumerate(FAMILIES.items()):
        for i, p in enumerate(params):
            crowd = family == "annealing"
            sw = 0.65 + 0.002 * i if crowd else 0.4 - 0.05 * i + 0.01 * f
            align = 1.0 if crowd else 0.6 + 0.08 * i + 0.005 * f
            off = 0.999 if crowd else 0.004 + 0.003 * i * f
            methods.append({"family": family, "param_name": name, "param": p, "label": f"{family} {name}={p:g}",
                            "metrics": {"sw": metric(sw), "mmd": metric(10.0), "off": metric(off), "align": metric(min(align, 1.0)),
                                        "coverage": metric(1.0)}})
    methods.append({"family": "learn-to-guide", "param_name": None, "param": None, "label": "learn-to-guide",
                    "metrics": {"sw": metric(0.29), "mmd": metric(6.8), "off": metric(0.003), "align": metric(0.78), "coverage": metric(1.0)}})
    labels = torch.arange(3).repeat_interleave(40)
    samples = {m["label"]: torch.randn(120, 2, generator=gen) * 0.3 + torch.tensor([1.0, 0.0]) for m in methods}
    samples["annealing lambda=1"] = samples["annealing lambda=1"] + torch.tensor([1.3, 0.0])  # a cluster beyond the ring
    timesteps = list(np.linspace(980, 0, 50))
    traces = {lam: 2.0 - 0.3 * torch.linspace(0, 1, 50)[:, None] + 0.05 * lam * torch.rand(50, 120, generator=gen) for lam in (0.0, 0.4, 1.0)}
    rows = []
    for family, name, param in (("CFG++", "w", 0.2), ("annealing", "lambda", 0.4)):
        for mode in ("anchored", "per_step"):
            for steps in (10, 20, 50):
                align = 1.0 if family == "annealing" else 0.9 - (0.1 if mode == "per_step" and steps != 20 else 0)
                rows.append({"family": family, "param_name": name, "param": param, "mode": mode, "steps": steps,
                             "metrics": {"sw": metric(0.2 + 0.1 * (family == "annealing") + 0.01 * steps / 10 * (mode == "per_step"), 0.02),
                                         "align": metric(align, 0.01), "off": metric(0.01), "mmd": metric(1.0), "coverage": metric(1.0)}})
    return {"config": {"seeds": [0, 1], "sampling_steps": 20, "samples_per_class": 40},
            "methods": methods, "timesteps": timesteps, "_samples": samples, "_labels": labels, "_traces": traces,
            "step_study": {"training_steps": 20, "step_counts": [10, 20, 50], "modes": ["anchored", "per_step"], "rows": rows}}


@pytest.fixture()
def drawn(monkeypatch):
    """The figures the report functions draw, by file name, instead of PNGs on disk."""
    from training.toy import report

    figures = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.__setitem__(Path(path).name, fig))
    return figures


def test_toy_figures_read_at_natural_size(drawn):
    from training.toy import report
    from training.toy.problem import RingProblem

    results, problem = small_results(), RingProblem()
    report.plot_front(results, Path("toy-front.png"))
    report.plot_samples(results, problem, Path("toy-samples.png"))
    report.plot_w_trajectories(results, problem, Path("toy-w-trajectories.png"))
    report.plot_step_counts(results, Path("toy-step-counts.png"))
    assert set(drawn) == {"toy-front.png", "toy-samples.png", "toy-w-trajectories.png", "toy-step-counts.png"}
    for fig in drawn.values():
        check_figure(fig)


def test_toy_front_labels_every_setting_and_zooms_on_a_crowd(drawn):
    """Each family's settings appear as labels on the plot (or in its legend entry); annealing's six settings, a few pixels
    apart, each get their own label in a zoomed inset."""
    from training.toy import report

    report.plot_front(small_results(), Path("toy-front.png"))
    fig = drawn["toy-front.png"]
    fig.canvas.draw()
    sw_axes = fig.axes[0]
    insets = sw_axes.child_axes
    assert len(insets) == 1
    assert {t.get_text() for t in insets[0].texts} == {"0", "0.2", "0.4", "0.6", "0.8", "1"}
    legend = " ".join(legend_texts(fig))
    for family, (_, params) in FAMILIES.items():
        if family == "annealing":
            continue
        for ax in fig.axes:
            shown = {t.get_text() for t in ax.texts if t.get_color() == style.family_style(family)[0]}
            for p in params:
                assert f"{p:g}" in shown or f"{p:g}" in legend, (family, p)


def test_toy_front_of_the_committed_results_reads_at_natural_size(drawn):
    from training.toy import report

    results = json.loads((REPO / "docs" / "toy-results" / "main.json").read_text())
    report.plot_front(results, Path("toy-front.png"))
    report.plot_step_counts(results, Path("toy-step-counts.png"))
    for fig in drawn.values():
        check_figure(fig)


def test_toy_step_counts_draw_error_bars_and_name_a_hidden_line(drawn):
    from training.toy import report

    report.plot_step_counts(small_results(), Path("toy-step-counts.png"))
    fig = drawn["toy-step-counts.png"]
    fig.canvas.draw()
    for ax in fig.axes:
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 4 and all(c.has_yerr for c in bars)
        for container in bars:
            segments = container.lines[2][0].get_segments()
            assert all(abs(seg[1][1] - seg[0][1]) > 0 for seg in segments)  # real bars, of the std's length
    # annealing's alignment is 1.0 in both readings: the dashed line lies on the solid one, and the plot says so
    align_axes = fig.axes[1]
    said = [t.get_text() for t in align_axes.texts] + legend_texts(fig)
    assert any("per_step on anchored" in t or "on the anchored line" in t for t in said), said
    assert "± one std" in fig._suptitle.get_text().replace("\n", " ")


def test_toy_samples_clip_no_cluster(drawn):
    from training.toy import report
    from training.toy.problem import RingProblem

    results = small_results()
    report.plot_samples(results, RingProblem(), Path("toy-samples.png"))
    fig = drawn["toy-samples.png"]
    for ax in fig.axes:
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for collection in ax.collections:
            offsets = np.asarray(collection.get_offsets())
            if len(offsets) and offsets.shape[1] == 2:
                inside = (offsets[:, 0] >= x0) & (offsets[:, 0] <= x1) & (offsets[:, 1] >= y0) & (offsets[:, 1] <= y1)
                assert inside.mean() >= 0.995, ax.get_title()


# ------------------------------------------------------------------------------------------------------------ palette


def _simulate(rgb: np.ndarray, kind: str) -> np.ndarray:
    """Dichromat vision of sRGB colours, in linear RGB (Viénot, Brettel and Mollon 1999, as used by colour-blindness
    simulators), written out here rather than taken from the style module."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrices = {"protan": [[0.11238, 0.88762, 0.0], [0.11238, 0.88762, 0.0], [0.00401, -0.00401, 1.0]],
                "deutan": [[0.29275, 0.70725, 0.0], [0.29275, 0.70725, 0.0], [-0.02234, 0.02234, 1.0]],
                "tritan": [[1.0, 0.14461, -0.14461], [0.0, 0.85924, 0.14076], [0.0, 0.85924, 0.14076]]}
    return np.clip(linear @ np.array(matrices[kind]).T, 0, 1)


def _lab(linear: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of linear RGB."""
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    f = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(f > 0.008856, np.cbrt(f), 7.787 * f + 16 / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def test_method_colours_stay_apart_for_colour_blind_readers():
    """Every pair of method colours differs under protanopia, deuteranopia and tritanopia by a colour difference of at
    least 10 (CIE76; the closest pairs of the Okabe-Ito palette), and every method has its own marker as well. The issue's
    pair, CFG++ and annealing in near-identical hues, now differs by far more."""
    from matplotlib.colors import to_rgb

    names = list(style.FAMILY_STYLE)
    colours = np.array([to_rgb(style.FAMILY_STYLE[n][0]) for n in names])
    markers = [style.FAMILY_STYLE[n][1] for n in names]
    assert len(set(markers)) == len(markers)
    for kind in ("protan", "deutan", "tritan"):
        seen = _lab(_simulate(colours, kind))
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                assert np.linalg.norm(seen[i] - seen[j]) >= 10, (kind, names[i], names[j])
        pair = [names.index("CFG++"), names.index("annealing")]
        assert np.linalg.norm(seen[pair[0]] - seen[pair[1]]) >= 40, kind


def test_every_text_size_of_the_style_reads_at_natural_size():
    for size in (style.TICK_PT, style.LABEL_PT, style.LEGEND_PT, style.TITLE_PT, style.SUPTITLE_PT):
        assert size >= style.MIN_FONT_PT >= 9.5
    assert style.DPI * style.MAX_WIDTH_IN <= 1100

