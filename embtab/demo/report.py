"""report.md, summary.json and the PNG plots of one demo run, from what was measured only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import numpy as np  # noqa: E402

from embtab.demo.pipeline import DemoRun  # noqa: E402


def headline(run: DemoRun) -> dict[str, Any]:
    """The numbers the console prints and the report opens with (absent: not measured)."""
    numbers: dict[str, Any] = {}
    compressed, full = run.offline.get("compressed"), run.offline.get("full")
    if compressed:
        numbers["offline_test_auc_compressed"] = round(compressed["test_auc"], 4)
    if full:
        numbers["offline_test_auc_full"] = round(full["test_auc"], 4)
    if compressed and full:
        numbers["embedding_memory_vs_full"] = round(
            compressed["memory_bytes"]["total"] / full["memory_bytes"]["total"], 4
        )
    if run.windows:
        numbers["online_auc_mean"] = round(
            float(np.mean([w["online_auc"] for w in run.windows])), 4
        )
        numbers["frozen_auc_mean"] = round(
            float(np.mean([w["frozen_auc"] for w in run.windows])), 4
        )
        numbers["windows"] = len(run.windows)
    if run.stream:
        trained = sum(part["trained"] for part in run.stream)
        numbers["stream_examples"] = trained
        numbers["stream_examples_per_s"] = round(
            float(np.mean([part["examples_per_s"] for part in run.stream])), 1
        )
    if run.freshness_s:
        numbers["freshness_p50_s"] = round(float(np.percentile(run.freshness_s, 50)), 2)
        numbers["freshness_p99_s"] = round(float(np.percentile(run.freshness_s, 99)), 2)
    if run.latencies:
        latencies = np.array([latency for _, latency in run.latencies]) * 1000
        numbers["serving_requests"] = len(latencies)
        numbers["serving_p50_ms"] = round(float(np.percentile(latencies, 50)), 2)
        numbers["serving_p99_ms"] = round(float(np.percentile(latencies, 99)), 2)
        numbers["serving_errors"] = run.load_errors
    return numbers


def _plot(path: Path, draw) -> str:
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    draw(axes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path.name


def plots(run: DemoRun, directory: Path) -> dict[str, str]:
    """One PNG per measured quantity; a quantity not measured gets no plot."""
    made: dict[str, str] = {}
    if len(run.offline) == 2:

        def auc_bars(axes) -> None:
            names = list(run.offline)
            values = [run.offline[name]["test_auc"] for name in names]
            axes.bar(names, values, color=["tab:blue", "tab:gray"])
            axes.set_ylim(min(values) - 0.02, max(values) + 0.01)
            axes.set_ylabel("test AUC")
            axes.set_title("Offline DCN-v2: compressed vs full tables")

        made["offline_auc"] = _plot(directory / "offline_auc.png", auc_bars)

        def memory_bars(axes) -> None:
            tables = [t for t in run.offline["full"]["memory_bytes"] if t != "total"]
            x = np.arange(len(tables))
            for shift, name in ((-0.2, "compressed"), (0.2, "full")):
                sizes = [run.offline[name]["memory_bytes"].get(t, 0) / 2**20 for t in tables]
                axes.bar(x + shift, sizes, 0.4, label=name)
            axes.set_xticks(x, tables, rotation=30, ha="right")
            axes.set_ylabel("MiB")
            axes.set_title("Embedding memory per table")
            axes.legend()

        made["memory"] = _plot(directory / "memory_per_table.png", memory_bars)
    if run.windows:

        def progressive(axes) -> None:
            x = np.arange(len(run.windows))
            axes.plot(x, [w["online_auc"] for w in run.windows], marker="o", label="online")
            axes.plot(x, [w["frozen_auc"] for w in run.windows], marker="s", label="frozen")
            axes.set_xlabel(f"window ({run.config.window:,} examples, time order)")
            axes.set_ylabel("AUC (scored before training on the window)")
            axes.set_title("Progressive AUC: online vs frozen")
            axes.legend()

        made["progressive_auc"] = _plot(directory / "progressive_auc.png", progressive)
    if run.latencies:

        def latency(axes) -> None:
            values = np.array([latency for _, latency in run.latencies]) * 1000
            axes.hist(values, bins=60, color="tab:green")
            axes.axvline(np.percentile(values, 99), color="black", linestyle="--", label="p99")
            axes.set_xlabel("ms per /score request (client side)")
            axes.set_ylabel("requests")
            axes.set_title("Serving latency during the replay")
            axes.legend()

        made["latency"] = _plot(directory / "serving_latency.png", latency)
    if run.freshness_s:

        def freshness(axes) -> None:
            axes.hist(run.freshness_s, bins=40, color="tab:orange")
            axes.set_xlabel("s from click produced to its delta live in Redis")
            axes.set_ylabel("clicks")
            axes.set_title("Freshness")

        made["freshness"] = _plot(directory / "freshness.png", freshness)
    if run.throughput:

        def throughput(axes) -> None:
            seconds = np.array([at for at, _ in run.throughput])
            examples = np.array([count for _, count in run.throughput])
            steps = np.diff(seconds, prepend=0.0)
            rates = np.diff(examples, prepend=0) / np.maximum(steps, 1e-3)
            axes.plot(seconds, np.cumsum(np.diff(examples, prepend=0)), label="examples trained")
            axes.set_xlabel("s of replay")
            axes.set_ylabel("examples trained")
            axes.set_title(f"Online training throughput (median batch {np.median(rates):,.0f}/s)")

        made["throughput"] = _plot(directory / "throughput.png", throughput)
    return made


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key in keys) + " |")
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(run: DemoRun, directory: Path, seconds: float) -> Path:
    """report.md and summary.json in `directory`, plus the plots; returns the report's path."""
    directory.mkdir(parents=True, exist_ok=True)
    numbers = headline(run)
    images = plots(run, directory)
    config = run.config
    lines = [
        f"# embtab demo: {config.dataset}{' (--quick)' if config.quick else ''}",
        "",
        f"Ran {seconds:.0f} s. Stages: "
        + ", ".join(f"{name} {stage['status']}" for name, stage in run.stages.items())
        + ".",
        "",
    ]
    for name, stage in run.stages.items():
        if stage["status"] != "ok":
            lines += [f"**{name}: {stage['status']}** — {stage.get('error', '')}", ""]
            if "trace" in stage:
                lines += ["```", stage["trace"].rstrip(), "```", ""]
    if config.cuts():
        lines += ["What --quick cuts:", ""] + [f"- {cut}" for cut in config.cuts()] + [""]
    lines += [
        f"What ran: DCN-v2 trained offline on the {config.dataset} train split (the first 80% "
        "of events in time order; the checkpoint is picked by AUC on a sample of the validation "
        "split, which is replayed later but never trained on offline) with "
        f"{config.tables.summary}, and the same model with full tables for comparison; the "
        "compressed model published to Redis and served by `embtab serve`; then "
        + " then ".join(config.replay_splits)
        + " replayed in time order through Kafka (producer -> joiner -> online trainer -> "
        "delta sync) while one closed-loop client scored requests against the live service. "
        "Progressive validation: each batch is scored by the online and the frozen model "
        "before the online model trains on it. Freshness: click produced to the delta that "
        "covers its training live in Redis. The replay is paced: each split's events are "
        f"spread over {config.replay_seconds:g} s of wall time, so the stream's examples/s "
        "is that pace, not the trainer's ceiling (bench/streaming.py measures the ceiling).",
        "",
        "## Headline numbers",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {_cell(value)} |" for key, value in numbers.items()]
    if run.offline:
        lines += ["", "## Offline", ""]
        lines += _table(
            [
                {
                    "model": name,
                    "test_auc": part["test_auc"],
                    "test_logloss": part["test_logloss"],
                    "embedding_MiB": part["memory_bytes"]["total"] / 2**20,
                    "train_examples_per_s": part["examples_per_s"],
                    "seconds": part["seconds"],
                }
                for name, part in run.offline.items()
            ]
        )
        lines += [
            "",
            "Memory is what each table holds (`memory_bytes()`): a collisionless table counts "
            "its id map, admission sketch and row-wise optimizer state; static tables count "
            "their weights only.",
        ]
    if run.stream:
        lines += ["", "## Stream", ""] + _table(run.stream)
    if run.windows:
        lines += ["", "## Progressive AUC per window", ""] + _table(run.windows)
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in images.items()]
    path = directory / "report.md"
    path.write_text("\n".join(lines) + "\n")
    summary = {
        "headline": numbers,
        "stages": {k: {n: v for n, v in s.items() if n != "trace"} for k, s in run.stages.items()},
        "offline": run.offline,
        "published": run.published,
        "stream": run.stream,
        "windows": run.windows,
        "seconds": round(seconds, 1),
        "quick": config.quick,
    }
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return path
