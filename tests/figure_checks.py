"""What can be checked of a figure without eyes, after matplotlib has drawn it: its size, that every text is large enough,
inside the image and clear of every other text, that every plotted line or band is named (in a legend or by a direct label
of the same words), and that axes with tick labels carry axis labels.

Used by tests/test_figures.py; written against matplotlib's own objects, not against the pack's figure style, so a style
change cannot make the checks agree with it by construction."""

from __future__ import annotations

import itertools

from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.text import Text

#: A GitHub README column is about 880 px wide; a figure much wider is shrunk and its text with it.
MAX_WIDTH_PX = 1100
MIN_FONT_PT = 9.5
#: Boxes may touch by this many pixels (glyph boxes include some blank space).
TOLERANCE_PX = 1.0


def _drawn_tick_labels(axis) -> list[Text]:
    if not axis.get_visible():
        return []
    ticks = axis._update_ticks()  # the ticks this draw shows (the locator may return more, outside the view)
    out = []
    for tick in ticks:
        for label in (tick.label1, tick.label2):
            if label.get_visible() and label.get_text().strip():
                out.append(label)
    return out


def _legend_texts(legend) -> list[Text]:
    texts = [t for t in legend.get_texts() if t.get_visible() and t.get_text().strip()]
    title = legend.get_title()
    if title.get_visible() and title.get_text().strip():
        texts.append(title)
    return texts


def all_axes(fig) -> list:
    """The figure's axes and, recursively, their insets (``inset_axes`` are children of an axes, not of the figure)."""
    out = []

    def visit(ax):
        out.append(ax)
        for child in ax.child_axes:
            visit(child)

    for ax in fig.axes:
        visit(ax)
    return out


def _figures(fig):
    yield fig
    for sub in fig.subfigs:
        yield from _figures(sub)


def drawn_texts(fig, draw: bool = True) -> list[Text]:
    """Every text the figure shows: titles, axis labels, drawn tick labels, annotations, legends, figure texts."""
    if draw:
        fig.canvas.draw()
    texts: list[Text] = []
    for figure in _figures(fig):
        for attr in ("_suptitle", "_supxlabel", "_supylabel"):
            t = getattr(figure, attr, None)
            if t is not None and t.get_visible() and t.get_text().strip():
                texts.append(t)
        texts += [t for t in figure.texts if t.get_visible() and t.get_text().strip()]
        for legend in figure.legends:
            texts += _legend_texts(legend)
    for ax in all_axes(fig):
        if not ax.get_visible() or not ax.axison and not ax.texts:
            continue
        for t in (ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label,
                  ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text()):
            if t.get_visible() and t.get_text().strip():
                texts.append(t)
        if ax.axison:
            texts += _drawn_tick_labels(ax.xaxis) + _drawn_tick_labels(ax.yaxis)
        texts += [t for t in ax.texts if t.get_visible() and t.get_text().strip()]
        if ax.get_legend() is not None:
            texts += _legend_texts(ax.get_legend())
    unique = {id(t): t for t in texts}  # a suptitle is also one of its figure's texts
    return list(unique.values())


def figure_size_px(fig) -> tuple[int, int]:
    return int(round(fig.get_figwidth() * fig.dpi)), int(round(fig.get_figheight() * fig.dpi))


def check_size(fig, max_width_px: int = MAX_WIDTH_PX) -> None:
    width, height = figure_size_px(fig)
    assert width <= max_width_px, f"{width} px wide: a browser would shrink it (at most {max_width_px})"
    assert width >= 500 and height >= 300, f"{width} x {height} px is too small to read"


def check_text(fig, min_font_pt: float = MIN_FONT_PT, draw: bool = True) -> None:
    """Every text at least ``min_font_pt``, inside the image, and overlapping no other text."""
    texts = drawn_texts(fig, draw)
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    boxes = []
    for t in texts:
        assert t.get_fontsize() >= min_font_pt, f"{t.get_text()!r} is {t.get_fontsize():g} pt (at least {min_font_pt})"
        box = Text.get_window_extent(t, renderer)  # the words alone (an annotation's extent includes its leader line)
        assert box.x0 >= -TOLERANCE_PX and box.y0 >= -TOLERANCE_PX and box.x1 <= width + TOLERANCE_PX and box.y1 <= height + TOLERANCE_PX, \
            f"{t.get_text()!r} is clipped by the image border ({box.bounds} in {width:g} x {height:g})"
        boxes.append((t, box))
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        inner_a = box_a.padded(-TOLERANCE_PX)
        inner_b = box_b.padded(-TOLERANCE_PX)
        assert not inner_a.overlaps(inner_b), f"{a.get_text()!r} overlaps {b.get_text()!r}"


def check_lines_named(fig, draw: bool = True) -> None:
    """Every visible line and band of every axes has a name a reader can find: its label is an entry of a legend of the
    figure, or the text of an annotation in its axes (a direct label)."""
    if draw:
        fig.canvas.draw()
    legend_names = set()
    for figure in _figures(fig):
        for legend in figure.legends:
            legend_names |= {t.get_text() for t in legend.get_texts()}
    for ax in all_axes(fig):
        if ax.get_legend() is not None:
            legend_names |= {t.get_text() for t in ax.get_legend().get_texts()}
    for ax in all_axes(fig):
        direct = {t.get_text() for t in ax.texts}
        exempt = set()
        for container in ax.containers:
            if isinstance(container, ErrorbarContainer):  # caps and bars belong to the data line, which carries the name
                _, caps, bars = container.lines
                exempt |= set(caps) | set(bars)
        artists = [line for line in ax.get_lines() if line not in exempt and len(line.get_xdata())]
        artists += [c for c in ax.collections if isinstance(c, PolyCollection)]
        for artist in artists:
            if not artist.get_visible():
                continue
            name = artist.get_label()
            assert name in legend_names or name in direct, \
                f"a line or band in the axes titled {ax.get_title()!r} has no legend entry or direct label (label {name!r})"


def check_axis_labels(fig, draw: bool = True) -> None:
    """An axis that shows tick labels carries an axis label; an axes without any ticks (a scatter of points) has a title."""
    if draw:
        fig.canvas.draw()
    for ax in all_axes(fig):
        if not ax.get_visible() or not ax.axison:
            continue
        x_ticks, y_ticks = _drawn_tick_labels(ax.xaxis), _drawn_tick_labels(ax.yaxis)
        if x_ticks:
            assert ax.get_xlabel().strip(), f"axes {ax.get_title()!r}: x tick labels but no x label"
        if y_ticks:
            assert ax.get_ylabel().strip(), f"axes {ax.get_title()!r}: y tick labels but no y label"
        if not x_ticks and not y_ticks:
            assert ax.get_title().strip(), "an axes without ticks needs a title saying what it shows"


def check_figure(fig, max_width_px: int = MAX_WIDTH_PX) -> None:
    """All of the checks, on one draw of the figure."""
    check_size(fig, max_width_px)
    fig.canvas.draw()
    check_text(fig, draw=False)
    check_lines_named(fig, draw=False)
    check_axis_labels(fig, draw=False)
