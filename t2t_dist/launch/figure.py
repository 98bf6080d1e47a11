"""The sweep's picture, in the style of the paper's Figure 1: best top-1 against cost.

    figure = draw_sweep(rows, fields, title="depth-width-digits", metric="val/top1")
    plot_sweep(rows, "sweep_top1_vs_cost.png", fields, title=..., metric=...)

Two panels, GMACs and parameters (a log axis where they span a decade or more); when every
trial costs the same (a learning-rate sweep) one panel per swept number instead. Trials that
differ in one swept number only (depth, at one width) are joined by a line, one colour per
family as in Figure 1; a sweep over model names colours ViT and T2T-ViT. Each point carries a
short label (``d2 w64``) placed where it overlaps no other label or point; early-stopped
trials are hollow, the best trial is a star. Matplotlib only (headless), no MLflow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

SHORT = {"depth": "d", "embed_dim": "w", "num_heads": "h", "mlp_ratio": "mlp", "lr": "lr",
         "weight_decay": "wd", "drop_path_rate": "dp", "global_batch": "b", "epochs": "ep"}
JOINED = {"d", "w", "h", "b"}  # written with their value: d2 w64 (others: lr 3e-3)
LOG_SPAN = 10.0  # an axis whose values span this factor or more is drawn log-scale
# 800 x 440 px: MLflow's artifact view (beside its assistant panel) shows it ~600 px wide,
# where 10 pt text is still ~10 px.
FIGSIZE, DPI = (8.0, 4.4), 100
FONT = 10
# Distances (pixels) from a point at which its label is tried, nearest first.
RINGS = (7, 14, 22, 32, 44, 58, 75, 95, 120, 150, 190, 240, 300)


def short_value(value: Any) -> str:
    """``64``, ``0.05``, ``3.2e-3``: numbers short enough for a label."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    if abs(value) < 0.01:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.2g}"


def short_name(field: str) -> str:
    """``model.depth`` -> ``d``; a field without an abbreviation keeps its last part."""
    name = field.rsplit(".", 1)[-1]
    return SHORT.get(name, name)


def axes_of(rows: Sequence, fields: list[str]) -> list[str]:
    """The swept fields that vary on their own: a field whose values follow one-to-one from
    an earlier one (heads with width, in a ``width`` group) is dropped, as is one that never
    varies."""
    kept: list[str] = []
    for field in fields:
        values = [row.values.get(field) for row in rows]
        if len(set(map(repr, values))) < 2:
            continue
        if not any(_one_to_one(rows, field, other) for other in kept):
            kept.append(field)
    return kept


def _one_to_one(rows: Sequence, a: str, b: str) -> bool:
    """``a`` and ``b`` always change together, and values repeat (so it is no accident of
    every trial drawing its own values, as in a random search)."""
    pairs = {(repr(row.values.get(a)), repr(row.values.get(b))) for row in rows}
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs}) < len(rows)


def label(row, axes: list[str]) -> str:
    """``d2 w64`` (a model name as it is, other numbers as ``lr 3e-3``)."""
    parts = []
    for field in axes:
        value = row.values.get(field)
        name = short_name(field)
        if field.endswith(".name"):
            parts.append(str(value))
        elif name in JOINED:
            parts.append(f"{name}{short_value(value)}")
        else:
            parts.append(f"{name} {short_value(value)}")
    return " ".join(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def families(rows: Sequence, axes: list[str]) -> tuple[str | None, dict[str, list]]:
    """(the field a family varies, {family name: its rows}). A family is the trials that share
    every swept value but one number, the line field (the number with most values): one
    line each, as Figure 1's model families. Model names group as ViT / T2T-ViT (no line);
    trials that share nothing (a random search) are one group without a line."""
    numbers = [f for f in axes if all(_is_number(row.values.get(f)) for row in rows)]
    line = max(numbers, key=lambda f: len({row.values.get(f) for row in rows}), default=None)
    grouped: dict[str, list] = {}
    for row in rows:
        if line is None:
            name = next((str(row.values.get(f)) for f in axes if f.endswith(".name")), "")
            key = ("ViT" if name.startswith("vit") else "T2T-ViT") if name else "trials"
        else:
            key = label(row, [f for f in axes if f != line]) or "trials"
        grouped.setdefault(key, []).append(row)
    if line is not None and all(len(members) == 1 for members in grouped.values()):
        return None, {"trials": list(rows)}
    if line is not None:
        for members in grouped.values():
            members.sort(key=lambda row: row.values.get(line))
    return line, grouped


def trial_number(row, index: int) -> str:
    """``#3`` for trial ``..._00003`` (the table's and results.csv's trial id)."""
    tail = row.run_name.rsplit("_", 1)[-1]
    return f"#{int(tail)}" if tail.isdigit() else f"#{index}"


def _unit(values: list[float], what: str) -> tuple[float, str]:
    """A scale and label that keep tick numbers readable: GMACs -> MMACs for tiny models."""
    top = max(values, default=1.0)
    if what == "macs":
        return (1.0, "GMACs per image") if top >= 0.1 else (1e3, "MMACs per image")
    return (1e-6, "parameters (M)") if top >= 1e6 else (1e-3, "parameters (K)")


def _panels(rows: Sequence, axes: list[str], kinds: dict[str, str]) -> list[tuple[str, Any, bool]]:
    """(x label, x of a row, log scale) per panel: GMACs and parameters, or (every trial
    costing the same) up to three swept numbers. Costs, and grid values, spanning a decade
    get a log axis; a field sampled log-uniformly always, uniformly never."""
    panels = []
    if len({(row.gmacs, row.params) for row in rows}) > 1:
        macs_scale, macs_label = _unit([r.gmacs for r in rows], "macs")
        params_scale, params_label = _unit([r.params for r in rows], "params")
        panels = [(macs_label, lambda r, s=macs_scale: r.gmacs * s, None),
                  (params_label, lambda r, s=params_scale: r.params * s, None)]
    else:  # the swept numbers are the interesting axes
        for field in [f for f in axes if all(_is_number(r.values.get(f)) for r in rows)][:3]:
            panels.append((field, lambda r, f=field: r.values[f], kinds.get(field)))
    if not panels:
        return [("trial", lambda r, order={id(r): i for i, r in enumerate(rows)}: order[id(r)],
                 False)]
    result = []
    for name, x_of, kind in panels:
        xs = [x_of(row) for row in rows]
        spans = min(xs) > 0 and max(xs) / min(xs) >= LOG_SPAN
        result.append((name, x_of, kind == "loguniform" or (spans and kind not in
                                                             ("uniform", "randint"))))
    return result


def _overlaps(box, others, pad: float = 1.0) -> bool:
    return any(box.x0 < o.x1 + pad and o.x0 < box.x1 + pad and box.y0 < o.y1 + pad
               and o.y0 < box.y1 + pad for o in others)


def _spots():
    """Label anchors around a point, nearest first, in pixels: 8 directions close by, 16 on
    farther rings, out to most of a panel."""
    for radius in RINGS:
        count = 8 if radius <= 24 else 16
        order = sorted(range(count), key=lambda k: (k % 2, k))  # axis-aligned first
        for k in order:
            angle = 2 * math.pi * k / count
            yield radius, math.cos(angle), math.sin(angle)


def _alignment(cos: float, sin: float) -> tuple[str, str]:
    return ("left" if cos > 0.38 else "right" if cos < -0.38 else "center",
            "bottom" if sin > 0.38 else "top" if sin < -0.38 else "center")


def place_labels(axis, points: list[tuple[float, float]], texts: list[str],
                 marker_px: float = 6.0) -> list:
    """Annotate each point with its text at the nearest spot around it where the label's
    box overlaps no label placed before it, no point and no axis edge (a thin leader line
    from the farther spots). A label with no free spot anywhere in the panel is left out,
    never drawn over another. Returns the annotations (None for a label left out)."""
    from matplotlib.transforms import Bbox

    figure = axis.figure
    renderer = figure.canvas.get_renderer()
    inside = axis.get_window_extent(renderer).padded(-2)
    pixels = [axis.transData.transform(p) for p in points]
    markers = [Bbox.from_extents(x - marker_px, y - marker_px, x + marker_px, y + marker_px)
               for x, y in pixels]
    sizes = []
    for text in texts:  # the label's size in pixels, measured once
        probe = axis.text(0, 0, text, fontsize=FONT)
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width, extent.height))
        probe.remove()
    placed: list = []
    annotations: list = [None] * len(points)
    # Crowded points first: they have the fewest free spots near them.
    crowd = [sum(math.dist(p, q) < 60 for q in pixels) for p in pixels]
    for index in sorted(range(len(points)), key=lambda i: (-crowd[i], i)):
        (x, y), (width, height) = pixels[index], sizes[index]
        for radius, cos, sin in _spots():
            ha, va = _alignment(cos, sin)
            left = x + radius * cos - {"left": 0, "center": width / 2, "right": width}[ha]
            bottom = y + radius * sin - {"bottom": 0, "center": height / 2, "top": height}[va]
            box = Bbox.from_bounds(left, bottom, width, height)
            if (box.x0 < inside.x0 or box.x1 > inside.x1 or box.y0 < inside.y0
                    or box.y1 > inside.y1 or _overlaps(box, placed, pad=2.0)
                    or _overlaps(box, markers, pad=0.0)):
                continue
            scale = 72.0 / figure.dpi  # pixels -> points
            annotations[index] = axis.annotate(
                texts[index], points[index], textcoords="offset points",
                xytext=(radius * cos * scale, radius * sin * scale), fontsize=FONT, ha=ha, va=va,
                arrowprops=dict(arrowstyle="-", color="0.6", lw=0.6, shrinkA=0, shrinkB=4)
                if radius > 24 else None)
            placed.append(box)
            break
    return annotations


def draw_sweep(rows: Sequence, fields: list[str], *, title: str, metric: str, mode: str = "max",
               kinds: dict[str, str] | None = None):
    """The figure (not saved): see the module docstring. ``kinds`` maps a swept field to how
    it was drawn (``loguniform``: a log axis). Failed and never-reported trials are left out."""
    import matplotlib  # ~0.5 s with pyplot; headless (Agg) before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    shown = [r for r in rows if r.best == r.best and r.status != "failed"]
    axes_fields = axes_of(shown, fields)
    line_field, grouped = families(shown, axes_fields)
    panels = _panels(shown, axes_fields, kinds or {}) if shown else [("trial", lambda r: 0, False)]
    by_cost = "per image" in panels[0][0]
    best = (max if mode == "max" else min)(shown, key=lambda r: r.best) if shown else None
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(grouped)}
    color_of = {id(r): colors[name] for name, members in grouped.items() for r in members}
    numbers = {id(r): trial_number(r, i) for i, r in enumerate(shown)}
    # Short labels by the swept values beside a cost axis; trial numbers where each panel's
    # axis is itself a swept value (the other values are in the other panels and the table).
    texts = [(label(r, axes_fields) if by_cost else "") or numbers[id(r)] for r in shown]

    figure, axes = plt.subplots(1, len(panels), figsize=FIGSIZE, dpi=DPI, sharey=True,
                                squeeze=False)
    axes = axes[0]
    for axis, (xlabel, x_of, log) in zip(axes, panels):
        if log:
            _log_axis(axis, [x_of(row) for row in shown], crowded=len(panels) > 2)
        if line_field is not None:
            for name, members in grouped.items():
                for a, b in zip(members, members[1:]):  # dotted: an end stopped early
                    early = "early-stopped" in (a.status, b.status)
                    axis.plot([x_of(a), x_of(b)], [a.best, b.best], ":" if early else "-",
                              color=colors[name], lw=1.5, alpha=0.8, zorder=1)
        for row in shown:
            stopped = row.status == "early-stopped"
            axis.scatter([x_of(row)], [row.best], s=110 if row is best else 45,
                         marker="*" if row is best else "o", zorder=3,
                         facecolors="white" if stopped else color_of[id(row)],
                         edgecolors=color_of[id(row)], linewidths=1.5)
        axis.set_xlabel(xlabel, fontsize=FONT + 1)
        axis.tick_params(labelsize=FONT)
        axis.grid(alpha=0.3, which="both")
        axis.margins(x=0.12, y=0.12)
    axes[0].set_ylabel(f"best {metric}", fontsize=FONT + 1)
    headline = f"sweep {title}: best {metric} against {'cost' if by_cost else 'the swept values'}"
    if best is not None:
        name = texts[shown.index(best)]
        headline += f" ({len(shown)} trials, best {name if len(name) <= 24 else numbers[id(best)]}"
        headline += f": {best.best:.1f})"
    figure.suptitle(headline, fontsize=FONT + 1)
    figure.legend(handles=_legend(grouped, line_field, colors, Line2D), loc="lower center",
                  ncol=3, frameon=False, fontsize=FONT, handletextpad=0.4, columnspacing=1.2)
    legend_rows = math.ceil(len(figure.legends[0].legend_handles) / 3)
    figure.tight_layout(rect=(0, 0.055 * legend_rows + 0.02, 1, 1))
    left_out = 0
    for axis, (_, x_of, _) in zip(axes, panels):  # after the layout: labels need final pixels
        notes = place_labels(axis, [(x_of(row), row.best) for row in shown], texts)
        left_out = max(left_out, notes.count(None))
    if left_out:
        figure.text(0.99, 0.01, f"{left_out} labels left out (no room): see results.csv",
                    ha="right", va="bottom", fontsize=FONT - 1, color="0.4")
    return figure


def _log_axis(axis, xs: list[float], *, crowded: bool) -> None:
    """Log scale with ticks written as plain numbers (0.5, 1, 2, 5): at 1, 2 and 5 x 10^k
    over two decades or less in a wide panel, at powers of ten otherwise."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_xscale("log")
    decades = math.log10(max(xs) / min(xs))
    subs = (1.0,) if crowded or decades > 2 else (1.0, 2.0, 5.0)
    axis.xaxis.set_major_locator(LogLocator(subs=subs))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(NullFormatter())


def _legend(grouped: dict[str, list], line_field: str | None, colors: dict, Line2D) -> list:
    """Families (a line each, or colours), then the marker kinds."""
    handles = []
    if line_field is not None:
        handles += [Line2D([], [], color=colors[n], lw=1.5, marker="o",
                           label=f"{n}, over {line_field.rsplit('.', 1)[-1]}") for n in grouped]
    elif len(grouped) > 1:
        handles += [Line2D([], [], color=colors[n], lw=0, marker="o", label=n) for n in grouped]
    gray = "0.35"
    return handles + [
        Line2D([], [], color=gray, lw=0, marker="o", label="completed"),
        Line2D([], [], color=gray, lw=0, marker="o", markerfacecolor="white",
               label="early-stopped (ASHA)"),
        Line2D([], [], color=gray, lw=0, marker="*", markersize=11, label="best")]


def plot_sweep(rows: Sequence, path: str | Path, fields: list[str], *, title: str, metric: str,
               mode: str = "max", kinds: dict[str, str] | None = None) -> None:
    """``draw_sweep`` saved as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    figure = draw_sweep(rows, fields, title=title, metric=metric, mode=mode, kinds=kinds)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
