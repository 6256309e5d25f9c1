"""The pack as a user meets it: a real ComfyUI server with its web frontend, driven in headless Chromium.

Starts ComfyUI (``--cpu``, on 127.0.0.1, a free port) with the pack and a test-only node pack in a temporary base directory,
opens the frontend, loads every UI-format workflow and checks that no node type is missing and no node has errors; then
runs the guider workflow (with a tiny model in place of the SDXL checkpoint loader) through the frontend's Run button and
waits for the schedule plot to appear on its node. Screenshots go to ``out/browser-screenshots/`` in the repository (or
``$ANNEALING_SCREENSHOTS``).

Needs COMFYUI_PATH (ComfyUI's interpreter runs the server), Debian's ``chromium`` (or ``$CHROMIUM``) and the ``playwright``
package in the interpreter running the test; it skips, saying which is missing. It never downloads a browser.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from reference_data import UPSTREAM_PT

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
SCREENSHOTS = Path(os.environ.get("ANNEALING_SCREENSHOTS", REPO / "out" / "browser-screenshots"))
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

TEST_NODES = '''
"""Test-only nodes: a checkpoint loader that returns a tiny model, a fake CLIP and a fake VAE (no weights on disk)."""
import sys

sys.path.insert(0, {tests!r})
import comfy_tiny_models


NODE_CLASS_MAPPINGS = {{"TinyCheckpointLoaderForTests": comfy_tiny_models.TinyCheckpointLoaderForTests}}
'''


def problem() -> str | None:
    if not os.environ.get("COMFYUI_PATH"):
        return "COMFYUI_PATH is unset: the browser test starts a real ComfyUI server"
    if not Path(os.environ["COMFYUI_PATH"], "main.py").is_file():
        return f"COMFYUI_PATH={os.environ['COMFYUI_PATH']} has no main.py"
    if not chromium():
        return "no Chromium: install Debian's chromium package (apt-get install -y chromium) or set CHROMIUM"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"the playwright package is not installed in {sys.executable} (pip install playwright; never `playwright install`)"
    return None


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def comfy_python() -> str:
    return os.environ.get("COMFY_PY") or sys.executable


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = problem()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("comfy_base")
    custom = base / "custom_nodes"
    custom.mkdir()
    (custom / "annealing-guidance").symlink_to(REPO, target_is_directory=True)
    (custom / "tiny_test_nodes").mkdir()
    (custom / "tiny_test_nodes" / "__init__.py").write_text(TEST_NODES.format(tests=str(REPO / "tests" / "comfyui")))
    models = base / "models"
    (models / "annealing_guidance").mkdir(parents=True)
    (models / "checkpoints").mkdir()
    write_guidance_checkpoints(models / "annealing_guidance")
    for name in ("sd_xl_base_1.0.safetensors", "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"):
        (models / "checkpoints" / name).write_bytes(b"placeholder: the workflows only need the name listed")
    port = free_port()
    log = (base / "server.log").open("w")
    process = subprocess.Popen(
        [comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--disable-auto-launch"],
        cwd=os.environ["COMFYUI_PATH"], stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}; log: {base / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{url}/object_info/AnnealingGuider", timeout=2) as response:
                    if "AnnealingGuider" in json.loads(response.read()):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer on {url} within 180 s; log: {base / 'server.log'}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def write_guidance_checkpoints(folder: Path) -> None:
    """The names the workflows load: the released checkpoint where present, else a random-weight one with its metadata."""
    sys.path.insert(0, str(REPO))
    import annealing

    if UPSTREAM_PT is not None:
        shutil.copyfile(UPSTREAM_PT, folder / "annealing_sdxl.pt")
    else:
        annealing.save_guidance_model(annealing.GuidanceScaleModel(metadata=annealing.upstream_metadata()), folder / "annealing_sdxl.pt")
    flow = annealing.CheckpointMetadata(model_family="sd3", prediction_space="velocity", timestep_convention="sigma_x1000")
    annealing.save_guidance_model(annealing.GuidanceScaleModel(metadata=flow), folder / "annealing_sd3_my_training.safetensors")


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        page = context.new_page()
        page.goto(server, wait_until="domcontentloaded")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        page.wait_for_timeout(1000)
        close_dialogs(page)  # a first visit opens the template browser over the canvas
        yield page
        browser.close()


def close_dialogs(page) -> None:
    for _ in range(3):
        if not page.locator(".p-dialog-mask").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


NODE_STATE = """() => window.app.graph.nodes.map(n => ({
    id: n.id, type: n.type, registered: !!window.LiteGraph.registered_node_types[n.type], errors: !!n.has_errors,
    widgets: (n.widgets || []).map(w => w.label || w.name),
    box: [n.pos[0], n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + window.LiteGraph.NODE_TITLE_HEIGHT],
}))"""


def overlapping(nodes: list[dict]) -> list[tuple[str, str]]:
    """Pairs of nodes whose boxes (title bar included) overlap as the frontend lays them out."""
    pairs = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                pairs.append((f"{a['id']} {a['type']}", f"{b['id']} {b['type']}"))
    return pairs


def load_workflow(page, workflow: dict) -> list[dict]:
    page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
    page.wait_for_timeout(500)
    close_dialogs(page)
    return page.evaluate(NODE_STATE)


@pytest.mark.parametrize("path", sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith(".api.json") and p.name != "node_types.json"),
                         ids=lambda p: p.stem)
def test_every_workflow_loads_with_no_missing_or_red_node(page, path):
    nodes = load_workflow(page, json.loads(path.read_text()))
    page.screenshot(path=str(SCREENSHOTS / f"{path.stem}.png"))
    assert nodes, f"{path.name}: nothing loaded (screenshot: {SCREENSHOTS / (path.stem + '.png')})"
    missing = [n["type"] for n in nodes if not n["registered"]]
    red = [n["type"] for n in nodes if n["errors"]]
    assert not missing and not red, f"{path.name}: missing {missing}, with errors {red}; screenshot in {SCREENSHOTS}"
    assert not overlapping(nodes), f"{path.name}: nodes drawn on top of each other: {overlapping(nodes)}"
    for node in nodes:
        if node["type"] in ("AnnealingGuider", "ApplyAnnealingGuidance"):
            assert "lambda" in node["widgets"] and "lam" not in node["widgets"], node["widgets"]


def test_guider_workflow_runs_from_the_run_button_and_shows_the_schedule_plot(page):
    workflow = json.loads((WORKFLOWS / "sdxl_annealing_guider.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["type"] = "TinyCheckpointLoaderForTests"
        if node["type"] == "BasicScheduler":
            node["widgets_values"][1] = 4  # steps
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:3] = [128, 128, 1]
    nodes = load_workflow(page, workflow)
    assert all(n["registered"] for n in nodes), [n["type"] for n in nodes if not n["registered"]]
    plot_id = next(n["id"] for n in nodes if n["type"] == "AnnealingSchedulePlot")
    page.get_by_role("button", name="Run", exact=True).first.click()
    try:
        page.wait_for_function(
            "(id) => { const out = window.app.nodeOutputs && window.app.nodeOutputs[String(id)]; return out && out.images && out.images.length > 0; }",
            arg=plot_id, timeout=180_000)
        # the picture is on the node itself, not only in the output store
        page.wait_for_function("(id) => { const n = window.app.graph.getNodeById(id); return n && n.imgs && n.imgs.length > 0 && n.imgs[0].complete; }",
                               arg=plot_id, timeout=30_000)
        page.wait_for_timeout(500)
    finally:
        page.screenshot(path=str(SCREENSHOTS / "guider-run.png"))
    image = page.evaluate("(id) => window.app.nodeOutputs[String(id)].images[0]", plot_id)
    assert image["filename"].endswith(".png") and image["type"] == "temp", image
