"""Writes the example workflows: UI format (what the ComfyUI frontend saves, version 0.4) and API twins (*.api.json).

One description per workflow feeds both files, so the twins cannot drift apart. Run from anywhere:
    python workflows/build_workflows.py
Node definitions below mirror ComfyUI's (socket inputs, widget order, outputs); tests/comfyui checks them against
the real ComfyUI and tests/test_workflows.py checks the twins against each other.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, for annealing.atomic_write

# type -> (socket inputs [(name, type, optional)], widgets [names], outputs [(name, type)])
NODE_DEFS = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP", False)], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "EmptySD3LatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "ModelSamplingSD3": ([("model", "MODEL", False)], ["shift"], [("MODEL", "MODEL")]),
    "KSampler": (
        [("model", "MODEL", False), ("positive", "CONDITIONING", False), ("negative", "CONDITIONING", False), ("latent_image", "LATENT", False)],
        ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        [("LATENT", "LATENT")],
    ),
    "RandomNoise": ([], ["noise_seed"], [("NOISE", "NOISE")]),
    "KSamplerSelect": ([], ["sampler_name"], [("SAMPLER", "SAMPLER")]),
    "BasicScheduler": ([("model", "MODEL", False)], ["scheduler", "steps", "denoise"], [("SIGMAS", "SIGMAS")]),
    "SamplerCustomAdvanced": (
        [("noise", "NOISE", False), ("guider", "GUIDER", False), ("sampler", "SAMPLER", False), ("sigmas", "SIGMAS", False),
         ("latent_image", "LATENT", False)],
        [],
        [("output", "LATENT"), ("denoised_output", "LATENT")],
    ),
    "VAEDecode": ([("samples", "LATENT", False), ("vae", "VAE", False)], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE", False)], ["filename_prefix"], []),
    # this pack
    "LoadAnnealingGuidanceModel": ([], ["model_name"], [("annealing_model", "ANNEALING_GUIDANCE_MODEL")]),
    "AnnealingGuider": (
        [("model", "MODEL", False), ("positive", "CONDITIONING", False), ("negative", "CONDITIONING", False),
         ("annealing_model", "ANNEALING_GUIDANCE_MODEL", False)],
        ["lambda", "mode", "normalize_delta_norm", "clamp_w", "w_min", "w_max", "active_start", "active_end", "fallback_cfg"],
        [("GUIDER", "GUIDER")],
    ),
    "ApplyAnnealingGuidance": (
        [("model", "MODEL", False), ("annealing_model", "ANNEALING_GUIDANCE_MODEL", False)],
        ["lambda", "mode", "normalize_delta_norm", "clamp_w", "w_min", "w_max", "active_start", "active_end"],
        [("MODEL", "MODEL")],
    ),
    "AnnealingSchedulePlot": ([("samples", "LATENT", False), ("guider", "GUIDER", True), ("model", "MODEL", True)], [], [("IMAGE", "IMAGE")]),
    "AnnealingModelExplorer": ([("annealing_model", "ANNEALING_GUIDANCE_MODEL", False), ("positive", "CONDITIONING", True)], ["lambdas"],
                               [("IMAGE", "IMAGE")]),
    "StageWiseGuidance": (
        [("model", "MODEL", False)],
        ["scale", "schedule", "normalize", "interval_low", "interval_high", "switch", "step_divisor"],
        [("MODEL", "MODEL")],
    ),
    "AngleDomainGuidance": ([("model", "MODEL", False)], ["scale", "max_angle_degrees"], [("MODEL", "MODEL")]),
}

#: Widgets the frontend follows with a "control after generate" value in widgets_values.
SEED_WIDGETS = {("KSampler", "seed"), ("RandomNoise", "noise_seed")}

ANNEALING_DEFAULTS = {"lambda": 0.4, "mode": "anchored", "normalize_delta_norm": True, "clamp_w": False, "w_min": 0.0, "w_max": 3.0,
                      "active_start": 0.0, "active_end": 1.0}

#: TV-CFG's symmetric schedule with the official defaults; scale 0 takes KSampler's cfg as the time-averaged scale.
TV_CFG_DEFAULTS = {"scale": 0.0, "schedule": "symmetric", "normalize": True, "interval_low": 0.15, "interval_high": 0.78, "switch": 0.25,
                   "step_divisor": 3.0}
#: ADG at the official code's defaults: w = 7, the angle capped at 60 degrees (pi / 3).
ADG_DEFAULTS = {"scale": 7.0, "max_angle_degrees": 60.0}

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SDXL_ANNEALING = "annealing_sdxl.pt"  # the name the README tells users to save the released checkpoint under
SD3_CHECKPOINT = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
SD3_ANNEALING = "annealing_sd3_my_training.safetensors"
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, dramatic lighting"


#: Layout. The frontend draws a node's title bar above its position and its body at least at the size stored here; newer
#: frontends (1.58) draw taller widget rows and wider nodes than 1.27 did, so every size below is generous (a row of 36 px
#: where 1.27 needs 26, a width that fits the node's title at 8 px a character) and the gaps leave room besides: no node
#: may reach another however the frontend of the day sizes it. Nodes stand in columns (a position is (column, y)); each
#: column is as wide as its widest node, and the next starts COLUMN_GAP to its right.
TITLE_HEIGHT = 40
ROW = 36
BODY_PADDING = 64
GAP = 80
COLUMN_GAP = 100
MAX_NODE_WIDTH = 540
#: The view a workflow opens with: the whole graph where it fits this canvas (a 1600 x 1000 window less the frontend's
#: bars) at a scale the frontend still draws text at, else that scale from the top left, where the pipeline starts.
CANVAS = (1500, 900)
SCALES = (0.6, 0.8)
#: Extra height of nodes whose body holds more than widget rows: a multiline prompt, an image preview.
EXTRA_HEIGHT = {"CLIPTextEncode": 140, "SaveImage": 380, "AnnealingSchedulePlot": 380, "AnnealingModelExplorer": 380}
WIDTHS = {"CLIPTextEncode": 480, "StageWiseGuidance": 480, "AnnealingGuider": 440, "SaveImage": 480, "AnnealingSchedulePlot": 480,
          "AnnealingModelExplorer": 480}
TITLE_CHAR_PX = 8


def node_size(node_type: str, title: str | None = None) -> list[int]:
    """A generous size: a row per widget (the seed's control-after-generate widget too) and per socket row (inputs on the
    left beside outputs on the right), the extra body of a prompt or image node, and a width that fits the title."""
    sockets, widgets, outputs = NODE_DEFS[node_type]
    rows = max(len(sockets), len(outputs)) + len(widgets) + sum((node_type, w) in SEED_WIDGETS for w in widgets)
    width = max(WIDTHS.get(node_type, 400), TITLE_CHAR_PX * len(title or node_type) + 80)
    if width > MAX_NODE_WIDTH:
        raise ValueError(f"{node_type}: a {width} px node is wider than {MAX_NODE_WIDTH} px (shorten its title {title!r})")
    return [width, BODY_PADDING + ROW * rows + EXTRA_HEIGHT.get(node_type, 0)]


class Workflow:
    def __init__(self):
        self.nodes = []  # dicts: id, type, title, widgets, column, y
        self.links = []  # (id, src, src_slot, dst, dst_input_name, type)

    def add(self, node_type, pos, title=None, **widgets):
        node_id = len(self.nodes) + 1
        missing = set(NODE_DEFS[node_type][1]) - set(widgets)
        if missing:
            raise ValueError(f"{node_type}: missing widget values {sorted(missing)}")
        column, y = pos
        self.nodes.append(dict(id=node_id, type=node_type, title=title, widgets=widgets, column=column, y=y, inputs={},
                               size=node_size(node_type, title)))
        return node_id

    def below(self, node_id, gap=GAP):
        """The position under a node (its title bar and body), in the same column."""
        node = self.nodes[node_id - 1]
        return (node["column"], node["y"] + node["size"][1] + TITLE_HEIGHT + gap)

    def positions(self) -> dict[int, list[int]]:
        """Canvas position of every node: its column's x (the columns before it, each as wide as its widest node, then
        COLUMN_GAP) and its y."""
        widths: dict[int, int] = {}
        for node in self.nodes:
            widths[node["column"]] = max(widths.get(node["column"], 0), node["size"][0])
        x, xs = 0, {}
        for column in sorted(widths):
            xs[column] = x
            x += widths[column] + COLUMN_GAP
        return {node["id"]: [xs[node["column"]], node["y"]] for node in self.nodes}

    def view(self) -> dict:
        """The canvas offset and scale the workflow opens with (see CANVAS, SCALES)."""
        positions = self.positions()
        right = max(positions[n["id"]][0] + n["size"][0] for n in self.nodes)
        bottom = max(n["y"] + n["size"][1] for n in self.nodes)
        top = min(n["y"] for n in self.nodes) - TITLE_HEIGHT
        fit = min(CANVAS[0] / (right + 110), CANVAS[1] / (bottom - top + 40))
        scale = round(min(max(fit, SCALES[0]), SCALES[1]), 2)
        return {"scale": scale, "offset": [90, 20 - top]}  # clear of the frontend's side bar

    def connect(self, src, src_slot, dst, input_name):
        src_type = NODE_DEFS[self.nodes[src - 1]["type"]][2][src_slot][1]
        dst_inputs = {name: kind for name, kind, _ in NODE_DEFS[self.nodes[dst - 1]["type"]][0]}
        if dst_inputs.get(input_name) != src_type:
            raise ValueError(f"cannot link {src_type} into {self.nodes[dst - 1]['type']}.{input_name}")
        link_id = len(self.links) + 1
        self.links.append((link_id, src, src_slot, dst, input_name, src_type))
        self.nodes[dst - 1]["inputs"][input_name] = (src, src_slot, link_id)

    def api(self) -> dict:
        prompt = {}
        for node in self.nodes:
            inputs = dict(node["widgets"])
            for name, (src, slot, _) in node["inputs"].items():
                inputs[name] = [str(src), slot]
            prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node["title"] or node["type"]}}
        return prompt

    def ui(self) -> dict:
        positions = self.positions()
        nodes = []
        for order, node in enumerate(self.nodes):
            sockets, widgets, outputs = NODE_DEFS[node["type"]]
            inputs = []
            for name, kind, optional in sockets:
                entry = {"name": name, "type": kind, "link": node["inputs"].get(name, (None, None, None))[2]}
                if optional:
                    entry["shape"] = 7  # the frontend's optional-input marker
                inputs.append(entry)
            values = []
            for name in widgets:
                value = node["widgets"][name]
                kind = {bool: "BOOLEAN", int: "INT", float: "FLOAT"}.get(type(value), "COMBO" if name not in ("text", "filename_prefix", "lambdas") else "STRING")
                inputs.append({"name": name, "type": kind, "widget": {"name": name}, "link": None})
                values.append(value)
                if (node["type"], name) in SEED_WIDGETS:
                    values.append("fixed")
            out = []
            for slot, (name, kind) in enumerate(outputs):
                out.append({"name": name, "type": kind, "links": [lk[0] for lk in self.links if lk[1] == node["id"] and lk[2] == slot],
                            "slot_index": slot})
            entry = {"id": node["id"], "type": node["type"], "pos": positions[node["id"]], "size": list(node["size"]),
                     "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": out,
                     "properties": {"Node name for S&R": node["type"]}, "widgets_values": values}
            if node["title"]:
                entry["title"] = node["title"]
            nodes.append(entry)
        links = []
        for link_id, src, src_slot, dst, input_name, kind in self.links:
            dst_slot = [i["name"] for i in nodes[dst - 1]["inputs"]].index(input_name)
            links.append([link_id, src, src_slot, dst, dst_slot, kind])
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes, "links": links, "groups": [],
                "config": {}, "extra": {"ds": self.view()}, "version": 0.4}


def _text_encoders(wf, loader, prompt, column=1):
    positive = wf.add("CLIPTextEncode", (column, 80), title="Positive prompt", text=prompt)
    negative = wf.add("CLIPTextEncode", wf.below(positive), title="Negative prompt (empty: what the MLP was trained with)", text="")
    wf.connect(loader, 1, positive, "clip")
    wf.connect(loader, 1, negative, "clip")
    return positive, negative


def _guided_sampling(wf, ckpt, model, positive, negative, annealing, *, fallback_cfg, scheduler, steps, latent_type, prefix):
    """Annealing Guider -> SamplerCustomAdvanced -> decode/save, plus the schedule plot fed by the sampler's output."""
    guider = wf.add("AnnealingGuider", (2, 80), **ANNEALING_DEFAULTS, fallback_cfg=fallback_cfg)
    wf.connect(model, 0, guider, "model")
    wf.connect(positive, 0, guider, "positive")
    wf.connect(negative, 0, guider, "negative")
    wf.connect(annealing, 0, guider, "annealing_model")
    noise = wf.add("RandomNoise", wf.below(guider), noise_seed=42)
    sampler = wf.add("KSamplerSelect", wf.below(noise), sampler_name="euler")
    sigmas = wf.add("BasicScheduler", wf.below(sampler), scheduler=scheduler, steps=steps, denoise=1.0)
    wf.connect(model, 0, sigmas, "model")
    latent = wf.add(latent_type, wf.below(negative), width=1024, height=1024, batch_size=1)
    sample = wf.add("SamplerCustomAdvanced", (3, 80))
    wf.connect(noise, 0, sample, "noise")
    wf.connect(guider, 0, sample, "guider")
    wf.connect(sampler, 0, sample, "sampler")
    wf.connect(sigmas, 0, sample, "sigmas")
    wf.connect(latent, 0, sample, "latent_image")
    decode, _ = _decode_and_save(wf, sample, ckpt, (4, 80), prefix)
    plot = wf.add("AnnealingSchedulePlot", wf.below(decode))
    wf.connect(sample, 0, plot, "samples")
    wf.connect(guider, 0, plot, "guider")
    return latent


def sdxl_guider() -> Workflow:
    wf = Workflow()
    ckpt = wf.add("CheckpointLoaderSimple", (0, 80), ckpt_name=SDXL_CHECKPOINT)
    positive, negative = _text_encoders(wf, ckpt, PROMPT)
    annealing = wf.add("LoadAnnealingGuidanceModel", wf.below(ckpt), model_name=SDXL_ANNEALING)
    _guided_sampling(wf, ckpt, ckpt, positive, negative, annealing, fallback_cfg=5.0, scheduler="normal", steps=40,
                     latent_type="EmptyLatentImage", prefix="annealing_guidance")
    return wf


def _sdxl_patched(wf, y=80, title=None):
    ckpt = wf.add("CheckpointLoaderSimple", (0, 80), ckpt_name=SDXL_CHECKPOINT)
    positive, negative = _text_encoders(wf, ckpt, PROMPT)
    annealing = wf.add("LoadAnnealingGuidanceModel", wf.below(ckpt), model_name=SDXL_ANNEALING)
    patch = wf.add("ApplyAnnealingGuidance", (2, y), title=title, **ANNEALING_DEFAULTS)
    wf.connect(ckpt, 0, patch, "model")
    wf.connect(annealing, 0, patch, "annealing_model")
    latent = wf.add("EmptyLatentImage", wf.below(negative), width=1024, height=1024, batch_size=1)
    return ckpt, positive, negative, patch, latent


def _ksampler(wf, model, model_slot, positive, negative, latent, pos, title, cfg):
    sampler = wf.add("KSampler", pos, title=title, seed=42, steps=40, cfg=cfg, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)
    wf.connect(model, model_slot, sampler, "model")
    wf.connect(positive, 0, sampler, "positive")
    wf.connect(negative, 0, sampler, "negative")
    wf.connect(latent, 0, sampler, "latent_image")
    return sampler


def _decode_and_save(wf, sampler, ckpt, pos, prefix):
    """VAEDecode at ``pos`` and a SaveImage in the last column beside it; returns the decode's id and the save's."""
    decode = wf.add("VAEDecode", pos)
    wf.connect(sampler, 0, decode, "samples")
    wf.connect(ckpt, 2, decode, "vae")
    save = wf.add("SaveImage", (5, pos[1]), filename_prefix=prefix)  # its own column: a plot may stand under the decode
    wf.connect(decode, 0, save, "images")
    return decode, save


def sdxl_ksampler() -> Workflow:
    wf = Workflow()
    ckpt, positive, negative, patch, latent = _sdxl_patched(wf)
    sampler = _ksampler(wf, patch, 0, positive, negative, latent, (3, 80), "KSampler (cfg only used outside the active range)", 5.0)
    decode, _ = _decode_and_save(wf, sampler, ckpt, (4, 80), "annealing_guidance")
    plot = wf.add("AnnealingSchedulePlot", wf.below(decode))
    wf.connect(sampler, 0, plot, "samples")
    wf.connect(patch, 0, plot, "model")
    return wf


def sdxl_side_by_side() -> Workflow:
    wf = Workflow()
    ckpt, positive, negative, patch, latent = _sdxl_patched(wf)
    plain = _ksampler(wf, ckpt, 0, positive, negative, latent, (3, 80), "Plain CFG 7.5", 7.5)
    _, save = _decode_and_save(wf, plain, ckpt, (4, 80), "compare/cfg_7.5")
    row = (3, max(wf.below(plain)[1], wf.below(save)[1]))  # the second row under everything in the first
    annealed = _ksampler(wf, patch, 0, positive, negative, latent, row, "Annealing guidance, lambda 0.4 (same seed)", 7.5)
    decode, _ = _decode_and_save(wf, annealed, ckpt, (4, row[1]), "compare/annealing_lambda_0.4")
    plot = wf.add("AnnealingSchedulePlot", wf.below(decode))
    wf.connect(annealed, 0, plot, "samples")
    wf.connect(patch, 0, plot, "model")
    return wf


def sdxl_guidance_comparison() -> Workflow:
    """One seed, one prompt, the same KSampler settings; four guidance methods, their images saved side by side."""
    wf = Workflow()
    ckpt, positive, negative, patch, latent = _sdxl_patched(wf, y=560, title="Annealing guidance (lambda 0.4)")
    tv = wf.add("StageWiseGuidance", wf.below(patch), title="TV-CFG: symmetric schedule, time average = KSampler cfg", **TV_CFG_DEFAULTS)
    adg = wf.add("AngleDomainGuidance", wf.below(tv), title="ADG: w 7, cap 60 degrees", **ADG_DEFAULTS)
    wf.connect(ckpt, 0, tv, "model")
    wf.connect(ckpt, 0, adg, "model")
    rows = [
        (ckpt, "1 Plain CFG 7", "compare_guidance/1_cfg_7"),
        (patch, "2 Annealing guidance, lambda 0.4", "compare_guidance/2_annealing_lambda_0.4"),
        (tv, "3 TV-CFG symmetric, average cfg 7", "compare_guidance/3_tvcfg_symmetric_7"),
        (adg, "4 Angle Domain Guidance, w 7", "compare_guidance/4_adg_w_7"),
    ]
    y = 80
    for column, (model, title, prefix) in enumerate(rows):
        sampler = _ksampler(wf, model, 0, positive, negative, latent, (3, y), title, 7.0)
        decode = wf.add("VAEDecode", (4, y))
        wf.connect(sampler, 0, decode, "samples")
        wf.connect(ckpt, 2, decode, "vae")
        # the four images side by side in one row, left to right in the order of the samplers
        save = wf.add("SaveImage", (5 + column, 80), title=title.split(" (")[0], filename_prefix=prefix)
        wf.connect(decode, 0, save, "images")
        lowest = decode
        if model == patch:  # annealing's schedule along the run, for reading its image against the others
            plot = wf.add("AnnealingSchedulePlot", wf.below(decode))
            wf.connect(sampler, 0, plot, "samples")
            wf.connect(patch, 0, plot, "model")
            lowest = plot
        y = max(wf.below(sampler)[1], wf.below(lowest)[1])  # the next row starts under everything in this one
    return wf


def sd3_user_checkpoint() -> Workflow:
    wf = Workflow()
    ckpt = wf.add("CheckpointLoaderSimple", (0, 80), ckpt_name=SD3_CHECKPOINT)
    shifted = wf.add("ModelSamplingSD3", wf.below(ckpt), shift=3.0)
    wf.connect(ckpt, 0, shifted, "model")
    positive, negative = _text_encoders(wf, ckpt, PROMPT)
    annealing = wf.add("LoadAnnealingGuidanceModel", wf.below(shifted), title="Your flow checkpoint (trained with python -m training)",
                       model_name=SD3_ANNEALING)
    latent = _guided_sampling(wf, ckpt, shifted, positive, negative, annealing, fallback_cfg=4.5, scheduler="simple", steps=28,
                              latent_type="EmptySD3LatentImage", prefix="annealing_sd3")
    explorer = wf.add("AnnealingModelExplorer", wf.below(latent), lambdas="0.0, 0.2, 0.4, 0.6, 0.8, 1.0")
    wf.connect(annealing, 0, explorer, "annealing_model")
    return wf


WORKFLOWS = {
    "sdxl_annealing_guider": sdxl_guider,
    "sdxl_annealing_ksampler": sdxl_ksampler,
    "sdxl_cfg_vs_annealing": sdxl_side_by_side,
    "sdxl_guidance_comparison": sdxl_guidance_comparison,
    "sd3_user_checkpoint": sd3_user_checkpoint,
}


def _write_json(path: Path, data: dict) -> None:
    from annealing.atomic_write import atomic_write

    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def main() -> None:
    for name, build in WORKFLOWS.items():
        wf = build()
        _write_json(HERE / f"{name}.json", wf.ui())
        _write_json(HERE / f"{name}.api.json", wf.api())
        print(f"wrote workflows/{name}.json and workflows/{name}.api.json ({len(wf.nodes)} nodes, {len(wf.links)} links)")
    types = sorted({node for build in WORKFLOWS.values() for node in (n["type"] for n in build().nodes)})
    pack = [t for t in types if t in PACK_NODES]
    _write_json(HERE / "node_types.json", {"pack": pack, "core": [t for t in types if t not in PACK_NODES]})


PACK_NODES = {"LoadAnnealingGuidanceModel", "AnnealingGuider", "ApplyAnnealingGuidance", "AnnealingSchedulePlot", "AnnealingModelExplorer",
              "StageWiseGuidance", "AngleDomainGuidance"}

if __name__ == "__main__":
    main()
