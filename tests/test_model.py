"""The guidance-scale model reproduces the released checkpoint and computes in float32."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import annealing
from annealing import GuidanceModelConfig, GuidanceScaleModel


def test_reproduces_every_golden_row_batched(upstream_model, golden_rows):
    rows = torch.tensor(golden_rows, dtype=torch.float64)
    w = upstream_model(rows[:, 0], rows[:, 1], rows[:, 2])
    assert w.shape == (len(golden_rows),) and w.dtype == torch.float32
    torch.testing.assert_close(w.double(), rows[:, 3], rtol=0, atol=1e-5)


def test_reproduces_golden_rows_one_at_a_time_with_python_floats(upstream_model, golden_rows):
    for t, d, lam, expected in golden_rows[:32]:
        w = upstream_model(t, d, lam)
        assert w.shape == (1,)
        assert abs(w.item() - expected) < 1e-5


def test_scalar_inputs_broadcast_against_a_batch(upstream_model):
    deltas = torch.tensor([0.5, 5.0, 40.0])
    batched = upstream_model(500.0, deltas, 0.4)
    single = torch.stack([upstream_model(500.0, d, 0.4)[0] for d in deltas])
    torch.testing.assert_close(batched, single)
    assert len(set(batched.tolist())) == 3  # one w per sample, not one per batch


def test_half_precision_inputs_run_in_float32(upstream_model, golden_rows):
    rows = torch.tensor(golden_rows[:64])
    reference = upstream_model(rows[:, 0], rows[:, 1], rows[:, 2])
    for dtype in (torch.float16, torch.bfloat16):
        w = upstream_model(rows[:, 0].to(dtype), rows[:, 1].to(dtype), rows[:, 2].to(dtype))
        assert w.dtype == torch.float32
        # only the inputs are rounded; the MLP itself stays float32
        rounded = upstream_model(*(rows[:, i].to(dtype).float() for i in range(3)))
        torch.testing.assert_close(w, rounded)
        assert (w - reference).abs().max() < 0.05


def test_mismatched_batch_sizes_are_refused(upstream_model):
    with pytest.raises(ValueError, match="delta_norm"):
        upstream_model(torch.ones(3), torch.ones(2), 0.5)


def test_other_architectures_build_from_config():
    config = GuidanceModelConfig(hidden_size=16, n_layers=1, t_embed_dim=3, delta_embed_dim=2, lambda_embed_dim=5, w_bias=0.5)
    model = GuidanceScaleModel(config)
    assert model.combined_head[0].in_features == 10
    assert set(model.state_dict()) == set(config.expected_shapes())
    assert model(torch.arange(4.0), torch.ones(4), 0.3).shape == (4,)


def test_invalid_config_values_are_refused():
    with pytest.raises(ValueError, match="hidden_size"):
        GuidanceModelConfig(hidden_size=0)
    with pytest.raises(ValueError, match="delta_embed_normalization"):
        GuidanceModelConfig(delta_embed_normalization=float("nan"))


def test_architecture_bounds_accept_every_real_mlp_and_refuse_bombs():
    """The bounds (model.py) sit far above the released 12-128x4-1 MLP; what lies at a bound builds, one past it is refused
    before any layer is allocated."""
    from annealing.model import MAX_EMBED_DIM, MAX_HIDDEN_SIZE, MAX_LAYERS, MAX_PARAMETERS

    assert GuidanceModelConfig().num_parameters == 12 * 128 + 128 + 3 * (128 * 128 + 128) + 128 + 1  # 51,329
    for edge in (dict(hidden_size=MAX_HIDDEN_SIZE, n_layers=0), dict(hidden_size=4, n_layers=MAX_LAYERS),
                 dict(hidden_size=4, t_embed_dim=MAX_EMBED_DIM, delta_embed_dim=MAX_EMBED_DIM, lambda_embed_dim=MAX_EMBED_DIM)):
        config = GuidanceModelConfig(**edge)
        assert sum(p.numel() for p in GuidanceScaleModel(config).parameters()) == config.num_parameters
    for name, value in (("hidden_size", MAX_HIDDEN_SIZE + 1), ("n_layers", MAX_LAYERS + 1), ("t_embed_dim", MAX_EMBED_DIM + 1),
                        ("n_layers", -1), ("hidden_size", 10**400), ("hidden_size", 8.0), ("n_layers", True)):
        with pytest.raises(ValueError, match=name):
            GuidanceModelConfig(**{name: value})
    with pytest.raises(ValueError, match=f"more than the {MAX_PARAMETERS:,}"):
        GuidanceModelConfig(hidden_size=MAX_HIDDEN_SIZE, n_layers=2)  # 33.6 million parameters
    with pytest.raises(ValueError, match="w_scale must be a finite number, got an integer of about 401 digits"):
        GuidanceModelConfig.from_dict({"w_scale": 10**400})  # float() of it would raise OverflowError


def test_every_core_name_the_docs_cite_exists_and_the_package_exports_what_it_lists():
    """`annealing.X.Y` in backticks in the README and docs/ resolves (a renamed or removed function breaks the docs, and
    this test), and every name in ``annealing.__all__`` is an attribute of the package."""
    import importlib
    import re

    repo = Path(__file__).resolve().parents[1]
    cited = set()
    for doc in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        for span in re.findall(r"`([^`\n]+)`", doc.read_text(encoding="utf-8")):
            cited.update(re.findall(r"(?<![\w/.])annealing(?:\.[A-Za-z_]\w*)+(?![\w/])", span))
    cited = {name for name in cited if not name.endswith((".json", ".pt", ".safetensors", ".png"))}
    assert "annealing.load_guidance_model" in cited and len(cited) >= 8  # the docs do cite the core
    for name in sorted(cited):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attribute in parts[cut:]:
            assert hasattr(obj, attribute), f"the docs cite {name}, which does not exist"
            obj = getattr(obj, attribute)
    missing = [name for name in annealing.__all__ if not hasattr(annealing, name)]
    assert not missing, f"annealing.__all__ lists names the package does not have: {missing}"


def test_output_scale_bias_and_normalisations_are_bounded_while_parsing():
    """Huge, tiny or non-finite scalars make w inf or NaN at every step: refused with the architecture, naming the field."""
    from annealing.model import W_LIMIT

    for name, value in (("w_scale", 1e308), ("w_scale", 1e-300), ("w_scale", 0.0), ("w_scale", math.inf), ("w_bias", 1e308),
                        ("w_bias", -2 * W_LIMIT), ("t_embed_normalization", 1e-300), ("t_embed_normalization", 1e300),
                        ("delta_embed_normalization", 1e-7), ("delta_embed_normalization", -math.inf)):
        with pytest.raises(ValueError, match=f"^{name} must be a finite number"):
            GuidanceModelConfig(**{name: value})
        with pytest.raises(ValueError, match=name):
            GuidanceModelConfig.from_dict({name: value})
    # at the bounds, and negative values of an allowed magnitude, are fine
    GuidanceModelConfig(w_scale=-W_LIMIT, w_bias=W_LIMIT, t_embed_normalization=-1e6, delta_embed_normalization=1e-6)
    with pytest.raises(ValueError, match="t_embed_normalization"):
        annealing.LearnToGuideConfig(t_embed_normalization=1e-300)
