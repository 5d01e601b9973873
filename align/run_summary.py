"""What a user sees at the end of a stage and of a run: a one-screen table and PNG plots."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from align.tracking import read_metrics

# Metric families plotted in their own panel, in this order; anything else numeric goes after.
PANELS = ("loss", "eval_loss", "reward", "rewards", "kl", "accuracy", "grad_norm", "lr", "completion_len")
MOE_FAMILIES = ("load_cv", "router_entropy")  # the MoE metrics drawn per layer, one panel each
MAX_LABELLED_LAYERS = 8
MAX_PANELS = 15


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def print_stage_summary(console, name: str, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"stage {name}: summary", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, _fmt(value))
    console.print(table)


def print_run_summary(console, stages: dict[str, dict[str, Any]], evaluation: dict[str, Any] | None = None) -> None:
    """The stages table, then (when the recipe evaluates) every metric by checkpoint, side by side."""
    from rich.table import Table

    table = Table(title="run summary", header_style="bold")
    for col in ("stage", "kind", "status", "key results", "final checkpoint"):
        table.add_column(col)
    for name, entry in stages.items():
        summary = entry.get("summary", {})
        keys = [k for k in summary if any(w in k for w in ("accuracy", "loss", "reward", "refusal", "win"))]
        table.add_row(name, entry.get("kind", ""), entry.get("status", ""),
                      "; ".join(f"{k}={_fmt(summary[k])}" for k in keys[:4]), entry.get("final", ""))
    console.print(table)
    if evaluation and evaluation.get("metrics"):
        console.print(_evaluation_table(evaluation))


def _evaluation_table(evaluation: dict[str, Any]):
    """Rows: suite/metric (↑ higher is better, ↓ lower); columns: checkpoints; red where a later
    checkpoint is worse than the first (the alignment tax), green where better."""
    from rich.table import Table

    metrics: dict[str, dict[str, Any]] = evaluation["metrics"]
    labels = list(next(iter(metrics.values()))["values"])
    table = Table(title=f"evaluation, side by side ({evaluation.get('report', '')})", header_style="bold")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    for name, metric in metrics.items():
        values, up = metric["values"], metric["higher_is_better"]
        first = values.get(labels[0])
        cells = []
        for label in labels:
            value = values.get(label)
            if value is None:
                cells.append("n/a")
                continue
            style = "" if first is None or value == first or label == labels[0] else \
                "green" if (value > first) == up else "red"
            cells.append(f"[{style}]{_fmt(float(value))}[/]" if style else _fmt(float(value)))
        table.add_row(f"{name} {'↑' if up else '↓'}", *cells)
    return table


def panel_of(key: str) -> str:
    """The panel a metric is drawn in. MoE router metrics (`align.moe.metrics`) take at most three
    panels however many layers the model has: `moe/load_cv` and `moe/router_entropy` (one line per
    layer plus the summaries), and `moe/shares` for the shares in [0, 1] (load_max, route_mismatch)."""
    if key.startswith("moe/"):
        family = next((f for f in MOE_FAMILIES if key.rsplit("/", 1)[-1].startswith(f)), None)
        return f"moe/{family}" if family else "moe/shares"
    for panel in PANELS:
        if key == panel or key.startswith(panel + "/") or key.startswith(panel + "_") \
                or f"/{panel}" in key:
            return panel
    return key.split("/")[0]


def _draw(ax, panel_series: dict[str, list[tuple[int, float]]]) -> None:
    """One panel's lines. Per-layer series (`.../layer{i}/...`) are thin and, past a few layers,
    unlabelled, so a 60-layer MoE stays readable: the legend then lists the summaries only."""
    layered = [k for k in panel_series if "/layer" in k]
    label_layers = len(layered) <= MAX_LABELLED_LAYERS
    for key, points in sorted(panel_series.items()):
        xs, ys = zip(*points)
        per_layer = key in layered
        ax.plot(xs, ys, label=key if label_layers or not per_layer else None,
                linewidth=0.8 if per_layer else 1.8, alpha=0.6 if per_layer else 1.0,
                marker="." if len(xs) < 30 else None)
    if len(panel_series) > 1 and ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7)


def stage_panels(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """panel -> metric -> [(step, value)] for the finite numbers of `rows`, in drawing order
    (`PANELS` first), at most `MAX_PANELS` panels."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                series[panel_of(key)][key].append((row["step"], float(value)))
    order = [p for p in PANELS if p in series] + sorted(p for p in series if p not in PANELS)
    return {p: series[p] for p in order[:MAX_PANELS]}


def plot_stage(stage_dir: str | Path) -> Path | None:
    """Write `<stage_dir>/metrics.png`: one panel per metric family, x = step."""
    panels = stage_panels(read_metrics(stage_dir))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (panel, panel_series) in zip(axes.flat, panels.items()):
        _draw(ax, panel_series)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(Path(stage_dir).name)
    fig.tight_layout()
    out = Path(stage_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
