"""One look for every figure the pack draws: the schedule plot and explorer nodes, the training curves, the benchmarks.

* Sizes that read at 100 %: figures at :data:`DPI` no wider than :data:`MAX_WIDTH_IN`, no text under :data:`MIN_FONT_PT`.
* A colour-blind-safe palette (Okabe and Ito, 2008), :data:`PALETTE`, and :data:`FAMILY_STYLE` for the guidance methods, so
  a method has one colour and one marker in every figure; markers and line styles repeat what colour says.
* Legends inside or below the data (:func:`legend_below`), never beside a title.
* Labels that never overlap: :func:`place_labels` puts each label where it covers no other label, line or marker, with a
  leader line when it has to move away; what finds no free place is returned, for the caller to say in a legend.

Object API only (``Figure`` + an Agg canvas, no pyplot state), so the nodes can draw inside a server.
"""

from __future__ import annotations

import os

import numpy as np

DPI = 100
#: Wider figures get shrunk by a browser (GitHub's README column is about 880 px), and then their text no longer reads.
MAX_WIDTH_IN = 11.0
TICK_PT = 10
LABEL_PT = 10.5
LEGEND_PT = 10
TITLE_PT = 11
SUPTITLE_PT = 12
MIN_FONT_PT = 9.5

#: Okabe-Ito: eight colours told apart under the common colour-vision deficiencies (and in greyscale by lightness).
PALETTE = {
    "black": "#000000", "orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73", "yellow": "#F0E442",
    "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7", "grey": "#777777",
    "dark grey": "#555555",
}
#: The order series take colours in (yellow last: it is faint on white).
CYCLE = [PALETTE[name] for name in ("blue", "vermillion", "bluish green", "orange", "reddish purple", "sky blue", "grey", "black")]
#: A guidance method's colour and marker, the same in every figure.
FAMILY_STYLE = {
    "exact": (PALETTE["black"], "*"), "CFG": (PALETTE["blue"], "o"), "CFG++": (PALETTE["sky blue"], "s"),
    "annealing": (PALETTE["vermillion"], "D"), "TV-CFG": (PALETTE["bluish green"], "^"), "ADG": (PALETTE["reddish purple"], "v"),
    "APG": (PALETTE["orange"], "P"), "interval": (PALETTE["dark grey"], "X"), "learn-to-guide": (PALETTE["yellow"], "h"),
}
#: Colours too light for a white edge: their markers get a dark one.
LIGHT = {PALETTE["yellow"]}
#: Sequential colour map for ordered values (lambda, batch item): perceptually uniform and colour-blind safe; its light
#: yellow end is cut off, being faint on white.
SEQUENTIAL = "viridis"
SEQUENTIAL_RANGE = (0.0, 0.72)


def family_style(family: str) -> tuple[str, str]:
    return FAMILY_STYLE.get(family, (PALETTE["grey"], "o"))


def series_colours(count: int) -> list:
    """``count`` distinct colours: the palette while it lasts, then the sequential map."""
    if count <= len(CYCLE):
        return CYCLE[:count]
    return sequential_colours(count)


def sequential_colours(count: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps[SEQUENTIAL]
    return [cmap(x) for x in np.linspace(*SEQUENTIAL_RANGE, max(count, 1))][:count]


# ------------------------------------------------------------------------------------------------------------- figures


def new_figure(width: float, height: float, dpi: int = DPI, layout: str | None = "constrained"):
    """A Figure on its own Agg canvas (no pyplot, no global state). ``width`` is capped at :data:`MAX_WIDTH_IN`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(width, MAX_WIDTH_IN), height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    if layout == "constrained":
        fig.get_layout_engine().set(h_pad=4 / 72, w_pad=4 / 72, hspace=0.03, wspace=0.03)
    return fig


def style_axes(ax, grid: bool = True) -> None:
    """Readable sizes on one axes: tick labels, axis labels, title (call again after setting them; it is idempotent)."""
    ax.tick_params(labelsize=TICK_PT)
    ax.xaxis.label.set_size(LABEL_PT)
    ax.yaxis.label.set_size(LABEL_PT)
    for title in (ax.title, ax._left_title, ax._right_title):
        title.set_size(TITLE_PT)
    ax.xaxis.get_offset_text().set_size(TICK_PT)
    ax.yaxis.get_offset_text().set_size(TICK_PT)
    if grid:
        ax.grid(True, alpha=0.3)


def finish(fig) -> None:
    """The style on every axes and legend of ``fig`` (the suptitle too), once everything is drawn into it."""
    if fig._suptitle is not None:
        fig._suptitle.set_size(SUPTITLE_PT)
    for ax in fig.axes:
        style_axes(ax, grid=False)
        legend = ax.get_legend()
        if legend is not None:
            _style_legend(legend)
    for legend in fig.legends:
        _style_legend(legend)


def _style_legend(legend) -> None:
    for text in legend.get_texts():
        text.set_size(LEGEND_PT)
    legend.get_title().set_size(LEGEND_PT)


def wrap(text: str, width_in: float, size_pt: float) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``size_pt`` (DejaVu Sans averages 0.6 em a character)."""
    import textwrap

    chars = max(20, int(width_in * 72 / (0.6 * size_pt)))
    return "\n".join(textwrap.fill(line, chars, break_long_words=False, break_on_hyphens=False) for line in text.split("\n"))


def suptitle(fig, text: str, size_pt: float = SUPTITLE_PT):
    """A figure (or subfigure) title wrapped to its width, so a long checkpoint name never runs off the image."""
    width = fig.get_figwidth() if hasattr(fig, "get_figwidth") else fig.bbox.width / fig.dpi
    return fig.suptitle(wrap(text, width * 0.96, size_pt), fontsize=size_pt)


def legend_below(fig, handles, labels, ncol: int | None = None, **kwargs):
    """A legend under the axes, centred, in as many columns as fit (constrained layout makes room for it)."""
    ncol = ncol or min(len(handles), 4)
    return fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=LEGEND_PT, frameon=False, **kwargs)


def save_png(fig, path: str | os.PathLike) -> None:
    """Write a PNG through a temporary file, so an interrupted run leaves no half-written image."""
    from .atomic_write import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi))


# -------------------------------------------------------------------------------------------------------------- labels

#: Where a label may go around its point, nearest first: (dx, dy) directions; the distances are :data:`LABEL_RADII`.
_DIRECTIONS = [(1, -1), (1, 1), (-1, -1), (-1, 1), (1, 0), (-1, 0), (0, -1), (0, 1)]
LABEL_RADII = (5, 14, 26, 40, 56)  # points
LABEL_BOX = {"boxstyle": "square,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}


class Label:
    """A label to put near the data point (x, y), in data coordinates, in ``colour``."""

    def __init__(self, x: float, y: float, text: str, colour="black", size: float = MIN_FONT_PT):
        self.x, self.y, self.text, self.colour, self.size = x, y, text, colour, size


def _segments(ax, skip=()) -> np.ndarray:
    """Every line segment drawn in ``ax``, in display pixels, shape (N, 2, 2)."""
    out = []
    for line in ax.get_lines():
        if line in skip or not line.get_visible() or line.get_linestyle() in ("None", "none", "", " "):
            continue
        xy = line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy) > 1:
            out.append(np.stack([xy[:-1], xy[1:]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2, 2))


def _markers(ax) -> np.ndarray:
    """Every marker drawn in ``ax`` (lines' markers and scatter points), in display pixels, shape (N, 2)."""
    out = []
    for line in ax.get_lines():
        if line.get_visible() and line.get_marker() not in (None, "None", "none", "", " "):
            out.append(line.get_transform().transform(np.column_stack(line.get_data()).astype(float)))
    for collection in ax.collections:
        offsets = collection.get_offsets()
        if len(offsets) and len(offsets) < 5000:
            out.append(collection.get_offset_transform().transform(offsets))
    return np.concatenate(out) if out else np.zeros((0, 2))


def segments_hit_box(segments: np.ndarray, box) -> bool:
    """Whether any segment crosses the rectangle ``box`` (a Bbox in the same pixels): Liang-Barsky clipping, vectorised."""
    if not len(segments):
        return False
    p0, d = segments[:, 0], segments[:, 1] - segments[:, 0]
    t0, t1 = np.zeros(len(d)), np.ones(len(d))
    ok = np.ones(len(d), dtype=bool)
    for axis, low, high in ((0, box.x0, box.x1), (1, box.y0, box.y1)):
        for p, q in ((-d[:, axis], p0[:, axis] - low), (d[:, axis], high - p0[:, axis])):
            parallel = p == 0
            ok &= ~(parallel & (q < 0))
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.where(parallel, 0.0, q / np.where(parallel, 1.0, p))
            t0 = np.where(~parallel & (p < 0), np.maximum(t0, r), t0)
            t1 = np.where(~parallel & (p > 0), np.minimum(t1, r), t1)
    return bool((ok & (t0 <= t1)).any())


def place_labels(ax, labels: list[Label], avoid_boxes=(), own_lines=()) -> list[Label]:
    """Annotate ``ax`` with ``labels``, each at the nearest spot around its point that is inside the axes and covers no
    label placed before, no box in ``avoid_boxes`` (a legend's extent, say), no line segment and no marker; beyond the
    first ring of spots a thin leader line joins label and point. Labels that find no such spot are not drawn: they are
    returned, so the caller can say them in a legend or a note. Call after the layout is final (``fig.canvas.draw()``)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    segments = _segments(ax, skip=own_lines)
    markers = _markers(ax)
    placed = list(avoid_boxes) + [t.get_window_extent(renderer).padded(2) for t in ax.texts if t.get_visible() and t.get_text()]
    for t in ax.texts:  # earlier labels' leader lines too
        if t.get_visible() and getattr(t, "arrow_patch", None) is not None:
            path = t.arrow_patch.get_path().transformed(t.arrow_patch.get_transform())
            if len(path.vertices) > 1:
                segments = np.concatenate([segments, np.stack([path.vertices[:-1], path.vertices[1:]], axis=1)])
    unplaced = []
    px_per_pt = fig.dpi / 72.0
    for label in labels:
        anchor = ax.transData.transform((label.x, label.y))
        spot = None
        for radius in LABEL_RADII:
            for dx, dy in _DIRECTIONS:
                norm = np.hypot(dx, dy)
                offset = (radius * dx / norm, radius * dy / norm)
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
                text = ax.annotate(label.text, (label.x, label.y), xytext=offset, textcoords="offset points", ha=ha, va=va,
                                   fontsize=label.size, color=label.colour, bbox=LABEL_BOX, zorder=5, annotation_clip=False)
                box = text.get_window_extent(renderer).padded(2)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                near = markers[(np.abs(markers - anchor) > 0.5).any(axis=1)] if len(markers) else markers  # not its own point
                clear = inside and not any(box.overlaps(other) for other in placed) and not segments_hit_box(segments, box)
                if clear and len(near):
                    reach = 4 * px_per_pt  # a marker's radius, about
                    clear = not ((near[:, 0] > box.x0 - reach) & (near[:, 0] < box.x1 + reach)
                                 & (near[:, 1] > box.y0 - reach) & (near[:, 1] < box.y1 + reach)).any()
                if clear:
                    spot = (text, box, radius)
                    break
                text.remove()
            if spot:
                break
        if spot is None:
            unplaced.append(label)
            continue
        text, box, radius = spot
        if radius > LABEL_RADII[1]:  # far from its point: a leader line says which point it names
            text.remove()
            text = ax.annotate(label.text, (label.x, label.y), xytext=text.xyann, textcoords="offset points", ha=text.get_ha(),
                               va=text.get_va(), fontsize=label.size, color=label.colour, bbox=LABEL_BOX, zorder=5,
                               annotation_clip=False, arrowprops={"arrowstyle": "-", "color": label.colour, "linewidth": 0.7,
                                                                  "shrinkA": 0, "shrinkB": 3})
        placed.append(box)
        segments = np.concatenate([segments, _box_edges(box)])  # later labels stay off this one's box and leader
        if radius > LABEL_RADII[1]:
            end = np.array([[box.x0 if text.get_ha() == "left" else box.x1 if text.get_ha() == "right" else (box.x0 + box.x1) / 2,
                             box.y1 if text.get_va() == "top" else box.y0 if text.get_va() == "bottom" else (box.y0 + box.y1) / 2]])
            segments = np.concatenate([segments, np.stack([anchor[None], end], axis=1)])
    return unplaced


def free_rect(ax, width: float, height: float, decorations=(24, 48, 24, 40), margin: float = 0.01):
    """Where in ``ax`` (axes fractions x, y, width, height) a ``width`` x ``height`` inset, with ``decorations`` pixels
    around it for its own ticks, labels and title (left, bottom, right, top), stays inside ``ax`` and covers no line,
    marker or text; searched on a grid from the lower right. None where there is no such place."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    segments, markers = _segments(ax), _markers(ax)
    texts = [t.get_window_extent(renderer).padded(4) for t in ax.texts if t.get_visible() and t.get_text()]
    left, bottom, right, top = decorations
    to_pixels = ax.transAxes.transform
    for y in np.linspace(margin, 1 - margin - height, 16):
        for x in np.linspace(1 - margin - width, margin, 16):
            (x0, y0), (x1, y1) = to_pixels((x, y)), to_pixels((x + width, y + height))
            box = Bbox([[x0 - left, y0 - bottom], [x1 + right, y1 + top]])
            if box.x0 < frame.x0 or box.y0 < frame.y0 or box.x1 > frame.x1 or box.y1 > frame.y1:
                continue
            if segments_hit_box(segments, box) or any(box.overlaps(t) for t in texts):
                continue
            if len(markers) and ((markers[:, 0] > box.x0 - 6) & (markers[:, 0] < box.x1 + 6) & (markers[:, 1] > box.y0 - 6)
                                 & (markers[:, 1] < box.y1 + 6)).any():
                continue
            return x, y, width, height
    return None


def _box_edges(box) -> np.ndarray:
    corners = np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1]])
    return np.stack([corners, np.roll(corners, -1, axis=0)], axis=1)
