"""The ComfyUI internals the integration tests touch, in one place, in the shapes of both releases CI runs (0.3.64 and 0.21.0).

Everything a test needs beyond the node API goes through here: importing ComfyUI on the CPU, pointing its folders at a temp
dir, loading the pack as a custom-node folder, ComfyUI's prompt validation, its executor and its output cache. Where the two
releases differ the difference is written once, here, keyed on what the host has (a parameter name, a coroutine), not on its
version number; a shape neither release has fails with one line naming it instead of a TypeError deep in ComfyUI.

Import only after ComfyUI is on sys.path (the ``comfy_host`` fixture puts it there).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path

HOST_LACKS = "this ComfyUI has no "  # how a skip for a feature the release at hand lacks begins (allowed in CI's strict mode)


def skip_unless_host_has(present: bool, feature: str) -> None:
    """Skip a test of ``feature`` on a release without it, in the words CI's strict mode lets through."""
    if not present:
        import pytest

        pytest.skip(HOST_LACKS + feature)


class FakeServer:
    """What execution.PromptExecutor needs of ComfyUI's server (PromptServer): no client, messages dropped."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


def comfy_version(path: str | Path) -> str:
    """The release at ``path`` as its comfyui_version.py says (releases before it had none: "unknown")."""
    file = Path(path, "comfyui_version.py")
    if not file.is_file():
        return "unknown"
    for line in file.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def import_comfy(path: str, cpu: bool = True):
    """Import ComfyUI from ``path`` (on the CPU unless ``cpu`` is False); returns (folder_paths, nodes), ComfyUI's own modules."""
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu  # before comfy.model_management is imported (it reads args at import)
    # ComfyUI's utils package first, as main.py imports it: nodes.py then puts comfy/ on sys.path, whose utils.py would
    # shadow it, and 0.21's GLSL and node-replacement built-ins would fail to load
    import folder_paths
    import utils.extra_config  # noqa: F401

    import nodes as comfy_nodes  # ComfyUI's top-level nodes.py

    return folder_paths, comfy_nodes


def use_folders(folder_paths, base: Path) -> None:
    """Models, input, output and temp folders under ``base``; nothing is written into the ComfyUI checkout."""
    folder_paths.models_dir = str(base / "models")
    for name in ("models/checkpoints", "models/annealing_guidance", "input", "output", "temp"):
        (base / name).mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(base / "models" / "checkpoints")], folder_paths.supported_pt_extensions)
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_input_directory(str(base / "input"))


def load_pack(comfy_nodes, repo: Path):
    """ComfyUI's built-in extra nodes, then the pack as ComfyUI loads a custom-node folder.

    Returns (loaded, new node types, the pack's package module as ComfyUI named it in sys.modules)."""

    async def load():
        await comfy_nodes.init_builtin_extra_nodes()
        before = set(comfy_nodes.NODE_CLASS_MAPPINGS)
        ok = await comfy_nodes.load_custom_node(str(repo), module_parent="custom_nodes")
        return ok, sorted(set(comfy_nodes.NODE_CLASS_MAPPINGS) - before)

    loaded, new_nodes = asyncio.run(load())
    name = str(repo).replace(".", "_x_")  # both releases register a custom-node folder under its path, "." -> "_x_"
    if name not in sys.modules:
        raise RuntimeError(f"ComfyUI did not register {repo} as the module {name!r} (loaded: {loaded})")
    package = sys.modules[name]
    return loaded, new_nodes, package


def validate(prompt: dict, prompt_id: str):
    """ComfyUI's own prompt validation: (valid, error, output node ids, node_errors)."""
    import execution

    result = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    valid, error, outputs, node_errors = result[:4]  # later releases may append fields
    return valid, error, outputs, node_errors


def make_executor():
    """An execution.PromptExecutor with the classic cache, built as the release's main.py builds it.

    0.3.64 takes ``cache_size``; 0.21 takes ``cache_args`` and reads ``cache_args["ram"]`` (RAM headroom in GiB; main.py's
    default, 0, means no RAM-pressure cache) on every execute."""
    import execution

    params = inspect.signature(execution.PromptExecutor).parameters
    classic = getattr(getattr(execution, "CacheType", None), "CLASSIC", False)
    if "cache_args" in params:
        return execution.PromptExecutor(FakeServer(), cache_type=classic, cache_args={"lru": 0, "ram": 0})
    if "cache_size" in params:
        return execution.PromptExecutor(FakeServer(), cache_type=classic, cache_size=None)
    raise RuntimeError(f"execution.PromptExecutor{inspect.signature(execution.PromptExecutor)}: neither 0.3.64's cache_size nor 0.21's cache_args")


def execute(prompt: dict, prompt_id: str, outputs: list[str]):
    """Run a validated prompt through ComfyUI's executor; returns the executor (its .success, .status_messages,
    .history_result and .caches)."""
    executor = make_executor()
    executor.execute(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
    return executor


def validate_and_execute(prompt: dict, prompt_id: str):
    """Validation (which must pass), then execution: what the server does with a queued prompt. Returns the executor."""
    valid, error, outputs, node_errors = validate(prompt, prompt_id)
    assert valid, (error, node_errors)
    return execute(prompt, prompt_id, outputs)


def execution_errors(executor) -> list[dict]:
    """The execution_error messages the UI would get."""
    return [data for event, data in executor.status_messages if event == "execution_error"]


def cached_output(executor, node_id: str):
    """The first output of a node from ComfyUI's output cache (0.21's cache.get is a coroutine and returns a CacheEntry)."""
    entry = executor.caches.outputs.get(node_id)
    if inspect.isawaitable(entry):
        entry = asyncio.run(entry)
    if entry is None:
        raise KeyError(f"node {node_id} has no output in ComfyUI's cache")
    outputs = entry.outputs if hasattr(entry, "outputs") else entry
    return outputs[0][0]
