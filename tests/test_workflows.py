"""The example workflows: valid JSON, known node types, UI and API twins consistent, files up to date with their generator.

Runs everywhere (no ComfyUI). tests/comfyui checks the same files against a real ComfyUI: the core node types and their
inputs exist there, ComfyUI's own prompt validation accepts every API twin, and one workflow runs end to end.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith(".api.json") and p.name != "node_types.json")
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def api_twin(ui_path: Path) -> Path:
    return ui_path.with_name(ui_path.name[: -len(".json")] + ".api.json")


def pack_node_ids() -> set[str]:
    """node_id=... of every schema in nodes/*.py (read as text: no ComfyUI needed)."""
    ids = set()
    for path in (REPO / "nodes").glob("*.py"):
        ids |= set(re.findall(r'node_id="([A-Za-z0-9_]+)"', path.read_text()))
    return ids


def widget_values_by_name(node: dict) -> dict:
    """Map a UI node's widgets_values onto its widget inputs (seed widgets are followed by a control-after-generate value)."""
    names = [entry["name"] for entry in node["inputs"] if "widget" in entry]
    values = list(node["widgets_values"])
    mapped = {}
    for name in names:
        assert values, f"node {node['id']} ({node['type']}): no value for widget {name}"
        mapped[name] = values.pop(0)
        if name.endswith("seed"):
            assert values and values[0] in CONTROL_VALUES, f"node {node['id']}: {name} must be followed by a control value"
            values.pop(0)
    assert not values, f"node {node['id']} ({node['type']}): extra widget values {values}"
    return mapped


def test_every_workflow_the_builder_describes_has_both_twins_and_a_row_in_the_readme():
    """The folder holds exactly the builder's workflows, each as a UI file and an API twin, and the README's table of
    workflows names each of them (a workflow added, renamed or dropped in one place and not the others fails here)."""
    described = set(builder_module().WORKFLOWS)
    assert {p.stem for p in UI_FILES} == described
    assert {p.name.removesuffix(".api.json") for p in WORKFLOWS.glob("*.api.json")} == described
    readme = (WORKFLOWS.parent / "README.md").read_text(encoding="utf-8")
    in_table = set(re.findall(r"^\| `([a-z0-9_]+)\.json` \|", readme, flags=re.M))
    assert in_table == described, f"README workflow table: missing {described - in_table}, stale {in_table - described}"


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_node_types_are_ours_or_listed_core(ui_path):
    listed = load(WORKFLOWS / "node_types.json")
    assert set(listed["pack"]) <= pack_node_ids()
    known = set(listed["pack"]) | set(listed["core"])
    for node in load(ui_path)["nodes"]:
        assert node["type"] in known, f"{ui_path.name}: unknown node type {node['type']}"
    for node in load(api_twin(ui_path)).values():
        assert node["class_type"] in known


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_ui_and_api_twins_agree(ui_path):
    ui, api = load(ui_path), load(api_twin(ui_path))
    assert ui["version"] == 0.4
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(link[0] for link in ui["links"])
    assert set(api) == {str(i) for i in nodes}
    linked = set()
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        target_input = nodes[dst]["inputs"][dst_slot]
        assert target_input["link"] == link_id and target_input["type"] == kind
        source_output = nodes[src]["outputs"][src_slot]
        assert link_id in source_output["links"] and source_output["type"] == kind
        assert api[str(dst)]["inputs"][target_input["name"]] == [str(src), src_slot]
        linked.add((str(dst), target_input["name"]))
    for node_id, node in nodes.items():
        entry = api[str(node_id)]
        assert entry["class_type"] == node["type"]
        widgets = widget_values_by_name(node)
        api_links = {name for name, value in entry["inputs"].items() if isinstance(value, list)}
        assert {(str(node_id), name) for name in api_links} <= linked, f"{ui_path.name} node {node_id}: API link without a UI link"
        assert {name: v for name, v in entry["inputs"].items() if name not in api_links} == widgets
        for socket in node["inputs"]:
            if "widget" not in socket and socket["link"] is None:
                assert socket.get("shape") == 7, f"{ui_path.name} node {node_id}: required input {socket['name']} is unconnected"


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_every_output_node_path_ends_in_a_saved_or_plotted_image(ui_path):
    api = load(api_twin(ui_path))
    types = [node["class_type"] for node in api.values()]
    assert "SaveImage" in types and "AnnealingSchedulePlot" in types
    plot = next(node for node in api.values() if node["class_type"] == "AnnealingSchedulePlot")
    sampler = api[plot["inputs"]["samples"][0]]["class_type"]
    assert sampler in ("KSampler", "SamplerCustomAdvanced")  # the plot runs after the sampler it depends on
    assert ("guider" in plot["inputs"]) != ("model" in plot["inputs"])


def builder_module():
    spec = importlib.util.spec_from_file_location("build_workflows_under_test", WORKFLOWS / "build_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder


def test_files_match_their_generator():
    for name, build in builder_module().WORKFLOWS.items():
        workflow = build()
        assert load(WORKFLOWS / f"{name}.json") == json.loads(json.dumps(workflow.ui())), f"{name}.json is stale: run workflows/build_workflows.py"
        assert load(WORKFLOWS / f"{name}.api.json") == json.loads(json.dumps(workflow.api())), f"{name}.api.json is stale"


#: What the newest frontend (1.58) may draw at most, per node, as this test estimates it independently of the builder: a
#: 34 px title bar above the position, rows of 30 px for sockets (inputs beside outputs) and widgets, 7 px a title character.
DRAWN_TITLE, DRAWN_ROW, DRAWN_CHAR, CLEARANCE = 34, 30, 7, 40
PREVIEW_NODES = {"SaveImage", "AnnealingSchedulePlot", "AnnealingModelExplorer"}  # show an image in their body


def drawn_box(node: dict) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) the node may cover: the larger of its stored size and the estimate above."""
    widgets = [i for i in node["inputs"] if "widget" in i]
    sockets = [i for i in node["inputs"] if "widget" not in i]
    rows = max(len(sockets), len(node["outputs"])) + len(widgets) + sum(i["name"].endswith("seed") for i in widgets)
    height = 40 + DRAWN_ROW * rows + (300 if node["type"] in PREVIEW_NODES else 0)
    width = max(320, DRAWN_CHAR * len(node.get("title") or node["type"]) + 60)
    x, y = node["pos"]
    return x, y - DRAWN_TITLE, x + max(width, node["size"][0]), y + max(height, node["size"][1])


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_no_node_is_drawn_over_another_with_room_to_spare(ui_path):
    """Newer frontends draw nodes larger than the sizes stored in the file (in 1.58.1 the Stage-wise Guidance node covered a
    KSampler): every node, at the larger of its stored size and a generous estimate, keeps 40 px from every other, and
    its stored size is at least that estimate (so the file, not the frontend, decides the room)."""
    nodes = load(ui_path)["nodes"]
    boxes = {node["id"]: drawn_box(node) for node in nodes}
    for node in nodes:
        x0, y0, x1, y1 = boxes[node["id"]]
        assert node["size"][0] >= x1 - x0 and node["size"][1] >= y1 - y0 - DRAWN_TITLE, f"{ui_path.name}: node {node['id']} is stored too small"
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            ax0, ay0, ax1, ay1 = boxes[a]
            bx0, by0, bx1, by1 = boxes[b]
            apart = ax1 + CLEARANCE <= bx0 or bx1 + CLEARANCE <= ax0 or ay1 + CLEARANCE <= by0 or by1 + CLEARANCE <= ay0
            assert apart, f"{ui_path.name}: nodes {a} and {b} come within {CLEARANCE} px of each other"


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_the_opening_view_shows_the_schedule_plot_at_a_readable_scale(ui_path):
    """The view a workflow opens with (extra.ds) shows its Schedule Plot node (the frontend only draws, and only loads
    the image of, nodes in view) in a 1600 x 1000 window, at a scale the frontend still draws text at (0.6 and up)."""
    ui = load(ui_path)
    view = ui["extra"]["ds"]
    scale, (dx, dy) = view["scale"], view["offset"]
    assert 0.6 <= scale <= 1.0
    for node in ui["nodes"]:
        if node["type"] == "AnnealingSchedulePlot":
            x, y = (node["pos"][0] + dx) * scale, (node["pos"][1] + dy) * scale
            assert 50 <= x <= 1500 and 0 <= y <= 900, f"{ui_path.name}: the plot opens at ({x:.0f}, {y:.0f}), out of view"
