"""Training curves of one or several runs, from their `metrics.jsonl` (`directpo plot`).

A grid of panels (loss, reward accuracy, reward margin, chosen and rejected rewards, PPO's reward
and KL, learning rate, gradient norm): train lines drawn as lines, eval lines as markers, one
colour per run, the runs overlaid and named by their directories. A panel no run has a value for
is left out, so a DPO run, a reward model and a PPO run each get the panels that mean something
for them.

What the lines look like (one JSON object a line, written by `directpo.training.run.MetricsLog`):
DPO/SFT and the reward model write `{"split": "train"|"eval", "step": N, "loss": ...}`; PPO writes
train lines without a "split". A line that is not such an object stops with one line naming the
file and the line; a last line cut short (the run is writing it) is ignored, so a run can be
plotted while it trains. matplotlib is imported only when drawing (the Agg backend: no display).
"""
from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

from ..errors import UserValueError
from ..runfiles import METRICS_FILE, metrics_path, read_metrics  # noqa: F401  (one reader of metrics.jsonl)


# (title, [(series label, keys: the first one a line has is the series' value)]): one panel each.
PANELS: list[tuple[str, list[tuple[str, tuple[str, ...]]]]] = [
    ("loss", [("loss", ("loss",))]),
    ("reward accuracy", [("accuracy", ("rewards/accuracies", "accuracy"))]),
    ("reward margin (chosen − rejected)", [("margin", ("rewards/margins",))]),
    ("rewards", [("chosen", ("rewards/chosen", "rewards/desirable")),
                 ("rejected", ("rewards/rejected", "rewards/undesirable"))]),  # KTO: desirable/undesirable rows
    ("reward (PPO)", [("reward", ("reward",))]),
    ("KL(π‖πref) (PPO; KTO: its reference point z0)", [("kl", ("kl",))]),
    ("learning rate", [("lr", ("lr",))]),
    ("gradient norm", [("grad_norm", ("grad_norm",))]),
]
_SERIES_STYLES = ["-", "--", ":", "-."]  # the series of one panel (chosen, rejected)
_SPLITS = ("train", "eval")


def _value(rec: dict, keys: tuple[str, ...]) -> float | None:
    for k in keys:
        v = rec.get(k)
        if isinstance(v, Real) and not isinstance(v, bool):
            return float(v)
    return None


def series(records: list[dict], keys: tuple[str, ...], split: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records of one split that have one of `keys`."""
    xs, ys = [], []
    for rec in records:
        if rec.get("split", "train") != split:
            continue
        v = _value(rec, keys)
        if v is not None:
            xs.append(rec["step"])
            ys.append(v)
    return xs, ys


def run_names(paths: list[Path]) -> list[str]:
    """Legend names: each run's directory name, with as many parent directories as it takes to
    tell the runs apart."""
    dirs = [p.parent if p.is_file() and p.name == METRICS_FILE else p for p in paths]
    parts = [d.resolve().parts for d in dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in dirs]


def present_panels(runs: list[list[dict]]) -> list[tuple[str, list[tuple[str, tuple[str, ...]]]]]:
    """The panels some run has a value for."""
    def has(keys):
        return any(_value(rec, keys) is not None for records in runs for rec in records)
    return [(title, items) for title, items in PANELS if any(has(keys) for _, keys in items)]


def plot_runs(run_dirs: list[str | Path], out_path: str | Path) -> dict:
    """Draw the curves of `run_dirs` (overlaid) into `out_path` (PNG, or any format matplotlib
    writes by suffix: .pdf, .svg). Returns {"out", "runs", "panels"}."""
    paths = [metrics_path(r) for r in run_dirs]
    runs = [read_metrics(p) for p in paths]
    names = run_names([Path(r) for r in run_dirs])
    panels = present_panels(runs)
    if not panels:
        raise UserValueError(f"nothing to plot: no known metric ({', '.join(_known_keys())}) in "
                             f"{', '.join(str(p) for p in paths)}")
    fig = figure(runs, names, panels)
    out = _save(fig, Path(out_path))
    return {"out": str(out), "runs": names, "panels": [title for title, _ in panels]}


def _known_keys() -> list[str]:
    return [k for _, items in PANELS for _, keys in items for k in keys]


def figure(runs: list[list[dict]], names: list[str], panels):
    """The matplotlib figure: one panel each, a colour per run, train lines, eval markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows + 0.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_eval = False
    for ax, (title, items) in zip(axes.flat, panels):
        for r, records in enumerate(runs):
            color = colors[r % len(colors)]
            for s, (label, keys) in enumerate(items):
                style = _SERIES_STYLES[s % len(_SERIES_STYLES)]
                xs, ys = series(records, keys, "train")
                if xs:
                    ax.plot(xs, ys, style, color=color, lw=1.3)
                xs, ys = series(records, keys, "eval")
                if xs:
                    any_eval = True
                    ax.plot(xs, ys, "o" if s == 0 else "s", color=color, ms=5, mfc=color if s == 0 else "none",
                            ls="none")
        if len(items) > 1:  # which line is which series, in this panel
            ax.legend([Line2D([], [], color="grey", ls=_SERIES_STYLES[s % len(_SERIES_STYLES)]) for s in
                       range(len(items))], [label for label, _ in items], fontsize=8, loc="best")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[r % len(colors)], lw=2) for r in range(len(runs))]
    labels = list(names)
    if any_eval:
        handles += [Line2D([], [], color="grey", lw=1.3), Line2D([], [], color="grey", marker="o", ls="none")]
        labels += ["train (lines)", "eval (markers)"]
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def _save(fig, out: Path) -> Path:
    """Written to a temporary sibling and renamed: the file is whole or absent."""
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".").lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        plt.close(fig)
        raise UserValueError(f"{out}: cannot write a .{fmt} image; use one of .{', .'.join(sorted(supported))}")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format=fmt, dpi=110)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
