"""What a study's records say: the summary keys, a Markdown table and a Pareto plot.

Every figure is an aggregate over the seeds of one (method, budget) cell of the records that
finished; memory is the bytes the tables actually allocated, as a share of the full tables.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from embtab.compression.results import DONE, SKIPPED
from embtab.compression.tables import BASELINE

# The budgets whose best method the summary names (issue 19's targets).
SUMMARY_BUDGETS = (0.1, 0.01)


@dataclass(frozen=True)
class Metric:
    key: str  # in a record's "test" metrics
    label: str
    higher_is_better: bool


CTR_METRICS = (Metric("auc", "test AUC", True), Metric("logloss", "test logloss", False))
RETRIEVAL_METRICS = (
    Metric("recall@20", "test recall@20", True),
    Metric("ndcg@20", "test NDCG@20", True),
)


@dataclass(frozen=True)
class Point:
    """One (method, budget) over its seeds."""

    method: str
    budget: float
    seeds: int
    bytes_allocated: float
    memory_fraction: float
    means: dict[str, float]
    stds: dict[str, float]
    best: dict[str, float]


def metrics_of(kind: str) -> tuple[Metric, ...]:
    return CTR_METRICS if kind == "compression" else RETRIEVAL_METRICS


def points(records: Iterable[dict[str, Any]], metrics: tuple[Metric, ...]) -> list[Point]:
    """Finished records grouped by (method, budget), in order of first appearance."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for record in records:
        if record["status"] == DONE:
            groups.setdefault((record["method"], record["budget"]), []).append(record)
    result = []
    for (method, budget), runs in groups.items():
        values = {m.key: [run["test"][m.key] for run in runs] for m in metrics}
        result.append(
            Point(
                method=method,
                budget=budget,
                seeds=len(runs),
                bytes_allocated=statistics.fmean(run["bytes_allocated"] for run in runs),
                memory_fraction=statistics.fmean(run["memory_fraction"] for run in runs),
                means={key: statistics.fmean(v) for key, v in values.items()},
                stds={key: statistics.stdev(v) if len(v) > 1 else 0.0 for key, v in values.items()},
                best={m.key: (max if m.higher_is_better else min)(values[m.key]) for m in metrics},
            )
        )
    return result


def compression_summary(records: list[dict[str, Any]]) -> dict[str, float | str]:
    """`cells` (runs done), `auc_full`; per method and budget its best (over seeds) and mean
    test AUC and its memory: `auc_at_<budget>_<method>`, `auc_mean_at_<budget>_<method>`,
    `memory_fraction_at_<budget>_<method>`; and per summary budget the best compressing method
    within that budget, `best_method_at_<budget>`, with `best_auc_gap_at_<budget>` (full's mean
    AUC minus its mean AUC).

    "Within a budget": every seed's compressed tables allocated at most that fraction of their
    full bytes (`compressed_tables_fraction`; the small tables left full come on top: 10.9% of
    all the full bytes at 0.1 on MovieLens-1M). A method that spends more than its budget
    (collisionless's id map) is not counted at it."""
    summary: dict[str, float | str] = {"cells": sum(r["status"] == DONE for r in records)}
    summary["skipped"] = sum(r["status"] == SKIPPED for r in records)
    found = points(records, CTR_METRICS)
    for point in found:
        if point.method == BASELINE and point.budget == 1.0:
            summary["auc_full"] = point.best["auc"]
            summary["auc_mean_full"] = point.means["auc"]
            summary["logloss_mean_full"] = point.means["logloss"]
            continue
        at = f"at_{point.budget:g}_{point.method}"
        summary[f"auc_{at}"] = point.best["auc"]
        summary[f"auc_mean_{at}"] = point.means["auc"]
        summary[f"memory_fraction_{at}"] = point.memory_fraction
    for budget in SUMMARY_BUDGETS:
        best = _best_within(found, records, budget)
        if best is not None and "auc_mean_full" in summary:
            summary[f"best_method_at_{budget:g}"] = best.method
            summary[f"best_auc_gap_at_{budget:g}"] = summary["auc_mean_full"] - best.means["auc"]
    return summary


def _best_within(found: list[Point], records: list[dict[str, Any]], budget: float) -> Point | None:
    """The compressing point of the best mean AUC whose every seed is within `budget`."""
    spent: dict[tuple[str, float], float] = {}
    for record in records:
        if record["status"] == DONE and record.get("compressed_tables_fraction") is not None:
            cell = (record["method"], record["budget"])
            spent[cell] = max(spent.get(cell, 0.0), record["compressed_tables_fraction"])
    within = [
        p for p in found if p.method != BASELINE and spent.get((p.method, p.budget), 2.0) <= budget
    ]
    return max(within, key=lambda p: p.means["auc"], default=None)


def retrieval_summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """`cells`, `recall20_full`, and `recall20_<method>_<budget>` / `ndcg20_<method>_<budget>`:
    means over the seeds."""
    summary: dict[str, float] = {"cells": sum(r["status"] == DONE for r in records)}
    summary["skipped"] = sum(r["status"] == SKIPPED for r in records)
    for point in points(records, RETRIEVAL_METRICS):
        suffix = BASELINE if point.method == BASELINE else f"{point.method}_{point.budget:g}"
        summary[f"recall20_{suffix}"] = point.means["recall@20"]
        summary[f"ndcg20_{suffix}"] = point.means["ndcg@20"]
    return summary


def markdown(document: dict[str, Any], title: str) -> str:
    """The study as Markdown: one table per metric (methods x budgets; the first also shows
    memory), then the cells that were skipped and why."""
    settings = document["settings"]
    kind = settings["kind"]
    metrics = metrics_of(kind)
    records = document["results"]
    found = points(records, metrics)
    budgets = sorted({p.budget for p in found} | {r["budget"] for r in records}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in records))
    by_cell = {(p.method, p.budget): p for p in found}
    train = settings["train"]
    lines = [
        f"### {title}",
        "",
        f"{document['summary'].get('cells', 0)} runs; mean ± std over seeds "
        f"({_seed_counts(found)}); {train['epochs']} epoch(s), batch {train['batch_size']}"
        + (f", first {train['train_rows']:,} training rows" if train["train_rows"] else "")
        + f"; tables compressed when they have >= {settings['compress_min_rows']:,} ids. "
        "Memory: bytes the embedding tables actually allocated, % of the full tables; "
        "—: not in the grid, or skipped (why is listed below the tables).",
        "",
    ]
    for index, metric in enumerate(metrics):
        lines += [
            f"**{metric.label}** ({'higher' if metric.higher_is_better else 'lower'} is better)"
            + (" and memory" if index == 0 else ""),
            "",
            "| method | " + " | ".join(f"budget {b:g}" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for method in methods:
            cells = []
            for budget in budgets:
                point = by_cell.get((method, budget))
                if point is None:
                    cells.append("—")
                    continue
                text = f"{point.means[metric.key]:.4f}"
                if point.seeds > 1:
                    text += f" ± {point.stds[metric.key]:.4f}"
                if index == 0:
                    text += f" ({_percent(point.memory_fraction)})"
                cells.append(text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    reasons = _skip_reasons(records)
    if reasons:
        lines += ["Skipped (—):", ""]
        lines += [f"- {method} at {where}: {reason}" for (method, reason), where in reasons.items()]
        lines.append("")
    return "\n".join(lines)


def pareto_front(found: list[Point], metric: Metric) -> list[Point]:
    """The points no cheaper point beats on `metric`, cheapest first."""
    front: list[Point] = []
    for point in sorted(found, key=lambda p: p.bytes_allocated):
        value = point.means[metric.key]
        if not front:
            front.append(point)
            continue
        best = front[-1].means[metric.key]
        if (value > best) if metric.higher_is_better else (value < best):
            front.append(point)
    return front


def plot(document: dict[str, Any], title: str, path: Path) -> None:
    """One panel per metric: each (method, budget) mean against the bytes allocated (log
    scale); each method's Pareto curve joins the points no cheaper one of it beats (filled),
    the others are hollow."""
    metrics = metrics_of(document["settings"]["kind"])
    found = points(document["results"], metrics)
    methods = list(dict.fromkeys(p.method for p in found))
    colors = matplotlib.colormaps["tab10"]
    figure = Figure(figsize=(6 * len(metrics), 4.6))
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics, strict=True):
        for index, method in enumerate(methods):
            mine = [p for p in found if p.method == method]
            front = pareto_front(mine, metric)
            dominated = [p for p in mine if p not in front]
            color = colors(index % 10)
            marker = "*" if method == BASELINE else "o"
            axis.plot(
                [p.bytes_allocated for p in front],
                [p.means[metric.key] for p in front],
                color=color,
                marker=marker,
                markersize=13 if method == BASELINE else 5,
                label=method,
                linewidth=1.4,
                zorder=4 if method == BASELINE else 3,
            )
            axis.scatter(
                [p.bytes_allocated for p in dominated],
                [p.means[metric.key] for p in dominated],
                facecolors="none",
                edgecolors=[color],
                s=28,
                zorder=3,
            )
        axis.set_xscale("log")
        axis.set_xlabel("embedding table bytes allocated (log)")
        axis.set_ylabel(metric.label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def _percent(fraction: float) -> str:
    return f"{fraction:.1%}" if fraction >= 0.0995 else f"{fraction:.2%}"


def _seed_counts(found: list[Point]) -> str:
    counts = sorted({p.seeds for p in found})
    if not counts:
        return "no runs yet"
    return f"{counts[0]} seed(s)" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} seeds"


def _skip_reasons(records: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(method, reason) -> the budgets it applies to, e.g. "budget 0.5, 0.25"."""
    budgets: dict[tuple[str, str], list[float]] = {}
    for record in records:
        if record["status"] == SKIPPED:
            key = (record["method"], record["reason"])
            if record["budget"] not in budgets.setdefault(key, []):
                budgets[key].append(record["budget"])
    return {
        key: "budget " + ", ".join(f"{b:g}" for b in sorted(found, reverse=True))
        for key, found in budgets.items()
    }


def write_reports(document: dict[str, Any], json_path: Path, title: str) -> tuple[Path, Path]:
    """The Markdown table and the PNG plot beside the results file (same stem)."""
    table = json_path.with_suffix(".md")
    image = json_path.with_suffix(".png")
    table.write_text(markdown(document, title))
    plot(document, title, image)
    return table, image
