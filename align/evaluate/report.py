"""Writing an evaluation: `results.json`, `report.md`, one PNG per suite, and a table on the console.

The alignment-tax view: every later checkpoint is compared with the first (usually the SFT model,
or the base), and a change for the worse, judged by the metric's direction, is flagged with a red
🔻 (Markdown) or in red (console), improvements with ▲.
"""

from __future__ import annotations

import math
from pathlib import Path

from align.evaluate.results import Metric, Results

WORSE, BETTER = "🔻", "▲"


def fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def _change(metric: Metric, label: str, first: str) -> tuple[str, bool | None]:
    """'+0.0500 ▲' and whether it is a regression (None: no change or nothing to compare)."""
    delta = metric.delta(label, first)
    if math.isnan(delta) or delta == 0:
        return ("±0" if delta == 0 else "n/a"), None
    worse = metric.is_regression(delta)
    return f"{delta:+.4f} {WORSE if worse else BETTER}", worse


def _arrow(metric: Metric) -> str:
    return "↑" if metric.higher_is_better else "↓"


def markdown(results: Results) -> str:
    labels, first = results.labels, results.labels[0]
    head = ["suite", "metric", f"{first}", *(f"{label} (Δ vs {first})" for label in labels[1:])]
    lines = ["# Evaluation", "",
             f"Checkpoints: {', '.join(f'`{c.label}` ({c.path})' for c in results.checkpoints)}. "
             f"↑/↓: which way is better. Changes are from `{first}`; {WORSE} marks a change for the worse "
             f"(the alignment tax), {BETTER} one for the better.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    taxes = []
    for suite, metrics in results.suites.items():
        for name, metric in metrics.items():
            cells = [fmt(metric.values[first])]
            for label in labels[1:]:
                change, worse = _change(metric, label, first)
                cells.append(f"{fmt(metric.values[label])} ({change})")
                if worse:
                    taxes.append(f"- `{suite}/{name}`: {first} {fmt(metric.values[first])} → {label} "
                                 f"{fmt(metric.values[label])} ({change})")
            lines.append(f"| {suite} | {name} {_arrow(metric)} | " + " | ".join(cells) + " |")
    lines += ["", "## Alignment tax", ""]
    lines += taxes or [f"No metric got worse than `{first}`."]
    meta = results.meta
    lines += ["", "## Settings", "", *(f"- {k}: `{v}`" for k, v in meta.items())]
    return "\n".join(lines) + "\n"


def plot_suites(results: Results, out_dir: Path) -> list[Path]:
    """One PNG per suite: a panel per metric, checkpoints side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels, paths = results.labels, []
    colors = plt.get_cmap("tab10").colors
    for suite, metrics in results.suites.items():
        fig, axes = plt.subplots(1, len(metrics), figsize=(max(3.2 * len(metrics), 4), 3.4), squeeze=False)
        for ax, (name, metric) in zip(axes[0], metrics.items(), strict=True):
            values = [metric.values[label] for label in labels]
            bars = ax.bar(range(len(labels)), [0 if math.isnan(v) else v for v in values],
                          color=[colors[i % len(colors)] for i in range(len(labels))])
            for bar, value in zip(bars, values, strict=True):
                ax.annotate(fmt(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
            ax.set_title(f"{name} {_arrow(metric)}")
        fig.suptitle(suite)
        fig.tight_layout()
        path = out_dir / f"{suite}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def print_table(results: Results, console) -> None:
    from rich.table import Table

    labels, first = results.labels, results.labels[0]
    table = Table(title="align eval", show_lines=False)
    table.add_column("suite")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    for suite, metrics in results.suites.items():
        for name, metric in metrics.items():
            cells = [fmt(metric.values[first])]
            for label in labels[1:]:
                change, worse = _change(metric, label, first)
                style = "red" if worse else "green" if worse is False else "dim"
                cells.append(f"{fmt(metric.values[label])} [{style}]({change})[/]")
            table.add_row(suite, f"{name} {_arrow(metric)}", *cells)
    console.print(table)


def write_report(results: Results, out: Path, records: list[dict] | None = None,
                 console=None) -> dict[str, Path | list[Path]]:
    """results.json, report.md, plots/<suite>.png and, given the records, samples.jsonl (every
    scored completion, to read what a number is made of)."""
    from align.data.io import write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    results.write(out / "results.json")
    if records is not None:
        write_jsonl(records, out / "samples.jsonl")
    (out / "report.md").write_text(markdown(results))
    plots = plot_suites(results, out / "plots")
    if console is not None:
        print_table(results, console)
    return {"results": out / "results.json", "report": out / "report.md", "plots": plots}
