"""The pack as a user meets it: a real ComfyUI server with its web frontend, driven in headless Chromium.

Starts ComfyUI (``--cpu``, on 127.0.0.1, a free port) with the pack and a test-only node pack in a temporary base directory,
opens the frontend, closes what a first start opens over the canvas (the newer frontends' template browser) by its close
button, loads every UI-format workflow and checks that no node type is missing, no node has errors and no two nodes are
drawn on top of each other (their boxes as the frontend lays them out); then runs the guider workflow (with a tiny model in
place of the SDXL checkpoint loader) through the frontend's Run button and waits for the schedule plot to appear on its node.

The frontend is the one the ComfyUI release pins (its own ``comfyui-frontend-package``), or the one in the folder
``$ANNEALING_FRONTEND_ROOT`` names (passed as ``--front-end-root``; ``.ci/run`` puts the newest release from PyPI there).
``$ANNEALING_FRONTEND_VERSION`` says which version that folder holds, and the test checks the page runs it. The browser is
offline: every request that does not go to the test's own server is refused (and listed in the screenshot folder).
Screenshots go to ``out/browser-screenshots/comfyui-<release>_frontend-<version>/`` (the base folder: ``$ANNEALING_SCREENSHOTS``).

Needs COMFYUI_PATH (ComfyUI's interpreter runs the server), Debian's ``chromium`` (or ``$CHROMIUM``) and the ``playwright``
package in the interpreter running the test; it skips, saying which is missing. It never downloads a browser.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import comfy_internals
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


def frontend_root() -> str | None:
    return os.environ.get("ANNEALING_FRONTEND_ROOT") or None


def pinned_frontend(comfy_path: str) -> str | None:
    """The comfyui-frontend-package version the release's requirements.txt pins."""
    requirements = Path(comfy_path, "requirements.txt")
    if requirements.is_file():
        match = re.search(r"^comfyui-frontend-package==([\w.]+)", requirements.read_text(), re.M)
        if match:
            return match[1]
    return None


def expected_frontend() -> str | None:
    if frontend_root():
        return os.environ.get("ANNEALING_FRONTEND_VERSION") or None
    return pinned_frontend(os.environ["COMFYUI_PATH"])


def problem() -> str | None:
    if not os.environ.get("COMFYUI_PATH"):
        return "COMFYUI_PATH is unset: the browser test starts a real ComfyUI server"
    if not Path(os.environ["COMFYUI_PATH"], "main.py").is_file():
        return f"COMFYUI_PATH={os.environ['COMFYUI_PATH']} has no main.py"
    if frontend_root() and not Path(frontend_root(), "index.html").is_file():
        return f"ANNEALING_FRONTEND_ROOT={frontend_root()} holds no frontend (no index.html)"
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
    command = [comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
               "--disable-auto-launch"]
    if frontend_root():
        command += ["--front-end-root", frontend_root()]
    process = subprocess.Popen(command, cwd=os.environ["COMFYUI_PATH"], stdout=log, stderr=subprocess.STDOUT)
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


@dataclass
class Browser:
    page: object
    frontend: str  # the version the page reports
    shots: Path  # this host's and frontend's screenshot folder
    refused: list[str] = field(default_factory=list)  # requests that would have left the machine

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chrome = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        context = chrome.new_context(viewport={"width": 1600, "height": 1000})
        refused: list[str] = []

        def offline(route):  # the test's server and inline data only: the page must work with no internet
            url = route.request.url
            if url.startswith((server, "data:", "blob:")):
                route.continue_()
            else:
                refused.append(url)
                route.abort("internetdisconnected")

        context.route("**/*", offline)
        page = context.new_page()
        page.goto(server, wait_until="domcontentloaded")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        page.wait_for_timeout(1500)
        version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
        shots = SCREENSHOTS / f"comfyui-{comfy_internals.comfy_version(os.environ['COMFYUI_PATH'])}_frontend-{version}"
        shots.mkdir(parents=True, exist_ok=True)
        session = Browser(page, version, shots, refused)
        session.screenshot("first-start")
        close_dialogs(session)  # a first visit to the newer frontends opens the template browser over the canvas
        yield session
        (shots / "refused-requests.txt").write_text("".join(f"{url}\n" for url in refused))
        chrome.close()


DIALOGS = "[role='dialog'], .p-dialog"
CLOSE = re.compile(r"^close\b", re.I)  # the button's accessible name: "Close" (PrimeVue), "Close dialog" (frontend 1.5x)


def close_dialogs(session: Browser) -> None:
    """Close every dialog over the canvas as a user would: by clicking its close button (not Escape, not script)."""
    page = session.page
    for _ in range(5):
        dialogs = page.locator(DIALOGS).filter(visible=True)
        if not dialogs.count():
            return
        dialog = dialogs.first
        close = dialog.get_by_role("button", name=CLOSE).filter(visible=True)
        if not close.count():
            shot = session.screenshot("dialog-without-close-button")
            pytest.fail(f"a dialog over the canvas has no close button to click: {dialog.inner_text()[:200]!r} (screenshot: {shot})")
        close.first.click()
        dialog.wait_for(state="hidden", timeout=10_000)
    pytest.fail(f"dialogs kept opening over the canvas (screenshot: {session.screenshot('dialogs')})")


NODE_STATE = """() => window.app.graph.nodes.map(n => {
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const box = n.getBounding ? Array.from(n.getBounding()) : [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title];
    return {id: n.id, type: n.type, registered: !!window.LiteGraph.registered_node_types[n.type], errors: !!n.has_errors,
            widgets: (n.widgets || []).map(w => w.label || w.name), box};
})"""


def overlapping(nodes: list[dict]) -> list[tuple[str, str]]:
    """Pairs of nodes whose boxes (title bar included) overlap as the frontend lays them out."""
    pairs = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                pairs.append((f"{a['id']} {a['type']}", f"{b['id']} {b['type']}"))
    return pairs


def test_overlap_detection_sees_boxes_that_share_area():
    nodes = [{"id": 1, "type": "A", "box": [0, 0, 100, 50]}, {"id": 2, "type": "B", "box": [99, 49, 10, 10]},
             {"id": 3, "type": "C", "box": [100, 0, 10, 10]}, {"id": 4, "type": "D", "box": [0, 50, 10, 10]}]
    assert overlapping(nodes) == [("1 A", "2 B")]  # touching edges (3, 4) is not overlapping


def load_workflow(session: Browser, workflow: dict) -> list[dict]:
    page = session.page
    page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
    page.wait_for_timeout(800)  # the frontend resizes nodes to their widgets after the first draw
    close_dialogs(session)
    return page.evaluate(NODE_STATE)


def test_the_page_runs_the_frontend_asked_for(browser):
    expected = expected_frontend()
    if expected is None:
        pytest.skip("no frontend version to check against (set ANNEALING_FRONTEND_VERSION with ANNEALING_FRONTEND_ROOT)")
    assert browser.frontend == expected, f"the page runs frontend {browser.frontend}, not {expected}"


@pytest.mark.parametrize("path", sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith(".api.json") and p.name != "node_types.json"),
                         ids=lambda p: p.stem)
def test_every_workflow_loads_with_no_missing_red_or_overlapping_node(browser, path):
    nodes = load_workflow(browser, json.loads(path.read_text()))
    shot = browser.screenshot(path.stem)
    where = f"frontend {browser.frontend}; screenshot {shot}"
    assert nodes, f"{path.name}: nothing loaded ({where})"
    missing = [n["type"] for n in nodes if not n["registered"]]
    red = [n["type"] for n in nodes if n["errors"]]
    assert not missing and not red, f"{path.name}: missing {missing}, with errors {red} ({where})"
    assert not overlapping(nodes), f"{path.name}: nodes drawn on top of each other: {overlapping(nodes)} ({where})"
    for node in nodes:
        if node["type"] in ("AnnealingGuider", "ApplyAnnealingGuidance"):
            assert "lambda" in node["widgets"] and "lam" not in node["widgets"], node["widgets"]


def run_button(session: Browser):
    """The frontend's Run (queue prompt) button, found as a user finds it: a visible button labelled Run."""
    buttons = session.page.get_by_role("button", name=re.compile(r"^\s*Run\b")).filter(visible=True)
    if not buttons.count():
        names = session.page.evaluate("() => [...document.querySelectorAll('button')].map(b => (b.innerText || b.ariaLabel || '').trim()).filter(Boolean)")
        pytest.fail(f"no visible Run button in frontend {session.frontend}; buttons: {names[:40]} (screenshot: {session.screenshot('no-run-button')})")
    return buttons.first


def test_guider_workflow_runs_from_the_run_button_and_shows_the_schedule_plot(browser):
    page = browser.page
    workflow = json.loads((WORKFLOWS / "sdxl_annealing_guider.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["type"] = "TinyCheckpointLoaderForTests"
        if node["type"] == "BasicScheduler":
            node["widgets_values"][1] = 4  # steps
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:3] = [128, 128, 1]
    nodes = load_workflow(browser, workflow)
    assert all(n["registered"] for n in nodes), [n["type"] for n in nodes if not n["registered"]]
    plot_id = next(n["id"] for n in nodes if n["type"] == "AnnealingSchedulePlot")
    run_button(browser).click()
    try:
        page.wait_for_function(
            "(id) => { const out = window.app.nodeOutputs && window.app.nodeOutputs[String(id)]; return out && out.images && out.images.length > 0; }",
            arg=plot_id, timeout=180_000)
        # the picture is on the node itself, not only in the output store
        page.wait_for_function("(id) => { const n = window.app.graph.getNodeById(id); return n && n.imgs && n.imgs.length > 0 && n.imgs[0].complete; }",
                               arg=plot_id, timeout=30_000)
        page.wait_for_timeout(500)
    finally:
        browser.screenshot("guider-run")
    image = page.evaluate("(id) => window.app.nodeOutputs[String(id)].images[0]", plot_id)
    assert image["filename"].endswith(".png") and image["type"] == "temp", image
