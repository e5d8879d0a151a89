"""Preparing a user's own raw files from a spec (`prepare_spec`) against pandas, in one run.

Generates (once, reused while the scratch dir holds it) a raw click log of N rows as several CSV
files and several Parquet files holding the same rows: string user and item ids with Zipf
frequencies, 20 categorical columns (string and 64-bit int ids, Zipf, cardinalities 3 to 1M),
5 dense columns (one with nulls), a tag list (a `|`-delimited string in CSV, a list column in
Parquet) and epoch-ms times; plus its spec (vocabularies for most categoricals, `ids: hash` for
the user id and the largest categorical, dense transforms, the tags, a time split).

Each measurement runs in a fresh subprocess; its wall time is taken around the call inside it
(imports excluded) and its peak RSS is the child's own `ru_maxrss` (`os.wait4`). Cases:

- `prepare_spec` from Parquet and from CSV, on all N rows and on a slice (the first files);
- pandas, as a user would: `pd.read_csv` of every file, `pd.concat`, `pd.factorize` of every
  categorical column (less work than a preparation: no vocabulary file, no dense transforms, no
  lists, no sorting, no splits written). It runs under an address-space limit (`--pandas-limit-gb`)
  so that running out fails cleanly (MemoryError or ENOMEM): on all N rows, once, and on the slice;
  also `pd.read_parquet` + factorize on the slice.

Every case runs once per round (`--rounds`; at most `--full-rounds` on all N rows, where one
round can take minutes); medians are reported. Every child is also killed if its RSS passes
`--kill-rss-gb` (the machine is shared).

    PYTHONPATH=. .venv/bin/python bench/prepare.py --full-rounds 1   # 20M rows -> prepare.json
    PYTHONPATH=. .venv/bin/python bench/prepare.py --rows 1000000 --output /tmp/prepare.json
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from feature_store.artifact import splitmix64

RESULT = Path(__file__).parent / "results" / "prepare.json"
GENERATOR_VERSION = 1
FILE_ROWS = 2_000_000
CHUNK_ROWS = 500_000
ROW_GROUP_ROWS = 131_072
SPAN_MS = 30 * 24 * 3600 * 1000
START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
JITTER_MS = 3600 * 1000
ZIPF_IDS = 1.05
ZIPF_CATEGORIES = 1.2
TAGS = 1000
MAX_TAGS = 5
# (column, raw type, cardinality, ids): the 20 categorical columns besides user and item.
CATEGORICALS = [
    ("c01", "string", 3, "vocabulary"),
    ("c02", "int", 7, "vocabulary"),
    ("c03", "string", 12, "vocabulary"),
    ("c04", "int", 24, "vocabulary"),
    ("c05", "string", 50, "vocabulary"),
    ("c06", "int", 100, "vocabulary"),
    ("c07", "string", 200, "vocabulary"),
    ("c08", "int", 500, "vocabulary"),
    ("c09", "string", 1_000, "vocabulary"),
    ("c10", "int", 2_000, "vocabulary"),
    ("c11", "string", 5_000, "vocabulary"),
    ("c12", "int", 10_000, "vocabulary"),
    ("c13", "string", 20_000, "vocabulary"),
    ("c14", "int", 50_000, "vocabulary"),
    ("c15", "string", 100_000, "vocabulary"),
    ("c16", "int", 200_000, "vocabulary"),
    ("c17", "string", 500_000, "vocabulary"),
    ("c18", "int", 1_000_000, "hash"),
    ("c19", "string", 30, "vocabulary"),
    ("c20", "int", 60, "vocabulary"),
]
DENSE = {
    "price": {"transform": ["log1p", "standardise"]},
    "views": {"transform": ["log1p"]},
    "score": {"transform": ["standardise"]},
    "ratio": {"transform": ["clip", "standardise"], "clip": [0.0, 0.9]},
    "dwell": {"transform": ["log1p", "standardise"]},  # 2% nulls
}


# -- the raw data set ----------------------------------------------------------------------


def id_counts(rows: int) -> tuple[int, int]:
    """Distinct users and items: a user has ~10 events, an item ~40 (at least 1,000 each)."""
    return max(1_000, rows // 10), max(1_000, rows // 40)


class _Zipf:
    """Zipf ranks 0..n-1 (rank 0 the most frequent) by inverse CDF, one table per size."""

    def __init__(self) -> None:
        self.cdfs: dict[tuple[int, float], np.ndarray] = {}

    def ranks(self, rng: np.random.Generator, n: int, exponent: float, count: int) -> np.ndarray:
        cdf = self.cdfs.get((n, exponent))
        if cdf is None:
            cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
            cdf /= cdf[-1]
            self.cdfs[(n, exponent)] = cdf
        return np.minimum(np.searchsorted(cdf, rng.random(count)), n - 1)


def _scrambled(ranks: np.ndarray, salt: int) -> np.ndarray:
    """Ranks as 62-bit ids in no particular order (raw ids carry no frequency order)."""
    mixed = splitmix64(ranks.astype(np.uint64) ^ np.uint64(salt))
    return (mixed >> np.uint64(2)).view(np.int64)


def _string_ids(prefix: str, ids: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(ids), pa.string()), "")


def generate_chunk(zipf: _Zipf, rows: int, first_row: int, count: int, seed: int) -> pa.Table:
    """Rows first_row..first_row+count-1 of the data set (deterministic per chunk)."""
    rng = np.random.default_rng([seed, first_row])
    users, items = id_counts(rows)
    columns: dict[str, pa.Array] = {
        "user_id": _string_ids("u", _scrambled(zipf.ranks(rng, users, ZIPF_IDS, count), 1)),
        "item_id": _string_ids("i", _scrambled(zipf.ranks(rng, items, ZIPF_IDS, count), 2)),
    }
    for index, (name, raw_type, cardinality, _) in enumerate(CATEGORICALS):
        ranks = zipf.ranks(rng, cardinality, ZIPF_CATEGORIES, count)
        if raw_type == "string":
            columns[name] = _string_ids(f"{name}_", ranks)
        elif cardinality <= 100:
            columns[name] = pa.array(ranks.astype(np.int64))
        else:
            columns[name] = pa.array(_scrambled(ranks, 100 + index))
    lengths = rng.integers(0, MAX_TAGS + 1, count)
    tags = _string_ids("t", zipf.ranks(rng, TAGS, ZIPF_CATEGORIES, int(lengths.sum())))
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    columns["tags"] = pa.ListArray.from_arrays(pa.array(offsets), tags)
    columns["price"] = pa.array(rng.lognormal(3.0, 1.0, count))
    columns["views"] = pa.array(rng.poisson(20, count).astype(np.float64))
    columns["score"] = pa.array(rng.normal(0.0, 1.0, count))
    columns["ratio"] = pa.array(rng.random(count))
    dwell = rng.lognormal(2.0, 1.5, count)
    columns["dwell"] = pa.array(dwell, mask=rng.random(count) < 0.02)
    position = np.arange(first_row, first_row + count, dtype=np.int64)
    jitter = rng.integers(-JITTER_MS, JITTER_MS, count)
    columns["ts"] = pa.array(START_MS + position * SPAN_MS // rows + jitter)
    columns["clicked"] = pa.array((rng.random(count) < 0.12).astype(np.int8))
    return pa.table(columns)


def _csv_table(table: pa.Table) -> pa.Table:
    """The CSV form: the tag list as one `|`-delimited string."""
    index = table.schema.get_field_index("tags")
    return table.set_column(index, "tags", pc.binary_join(table.column("tags"), "|"))


def generate(directory: Path, rows: int, seed: int) -> dict:
    """Write the data set's CSV and Parquet files (chunk by chunk) unless already there."""
    files = max(4, math.ceil(rows / FILE_ROWS))
    layout = {"generator": GENERATOR_VERSION, "rows": rows, "seed": seed, "files": files}
    marker = directory / "layout.json"
    if marker.exists():
        written = json.loads(marker.read_text())
        if all(written.get(key) == value for key, value in layout.items()):
            return written
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "csv").mkdir(parents=True)
    (directory / "parquet").mkdir()
    zipf = _Zipf()
    bounds = [rows * f // files for f in range(files + 1)]
    started = time.perf_counter()
    for f in range(files):
        parquet_writer = csv_writer = None
        for first in range(bounds[f], bounds[f + 1], CHUNK_ROWS):
            table = generate_chunk(zipf, rows, first, min(CHUNK_ROWS, bounds[f + 1] - first), seed)
            text = _csv_table(table)
            if parquet_writer is None:
                parquet_writer = pq.ParquetWriter(
                    directory / "parquet" / f"part-{f:03d}.parquet", table.schema
                )
                csv_writer = pacsv.CSVWriter(
                    directory / "csv" / f"part-{f:03d}.csv",
                    text.schema,
                    write_options=pacsv.WriteOptions(quoting_style="none"),
                )
            parquet_writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            csv_writer.write_table(text)
        parquet_writer.close()
        csv_writer.close()
        print(f"generated file {f + 1}/{files} ({time.perf_counter() - started:.0f} s)", flush=True)
    layout["file_rows"] = [bounds[f + 1] - bounds[f] for f in range(files)]
    layout["bytes"] = {
        kind: sum(p.stat().st_size for p in (directory / kind).iterdir())
        for kind in ("csv", "parquet")
    }
    marker.write_text(json.dumps(layout))
    return layout


def write_spec(directory: Path, name: str, file_format: str, paths: list[str]) -> Path:
    """The data set's spec over `paths` (relative to `directory`)."""
    features: list[dict] = [
        {"name": "user_id", "kind": "categorical", "ids": "hash"},
        {"name": "item_id", "kind": "categorical", "min_count": 2},
    ]
    for column, raw_type, _, ids in CATEGORICALS:
        feature = {"name": column, "kind": "categorical", "type": raw_type}
        if ids == "hash":
            feature["ids"] = "hash"
        features.append(feature)
    features.append(
        {"name": "tags", "kind": "multi_valued", "separator": "|", "max_length": MAX_TAGS}
    )
    features.extend({"name": column, "kind": "dense", **how} for column, how in DENSE.items())
    spec = {
        "name": name,
        "source": {"format": file_format, "paths": paths},
        "label": {"column": "clicked"},
        "time": {"column": "ts", "unit": "ms"},
        "roles": {"user": "user_id", "item": "item_id"},
        "features": features,
        "split": {"by": "time", "valid": 0.1, "test": 0.1},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# -- the measured children -----------------------------------------------------------------


def child_prepare(spec_path: str) -> dict:
    """Prepare the spec'd data set (into EMBTAB_DATA); seconds per stage from the progress."""
    from feature_store.prepare import prepare_spec
    from feature_store.spec import load_spec

    spec = load_spec(spec_path)
    stages: dict[str, list[float]] = {}

    def progress(stage: str, rows: int) -> None:
        now = time.perf_counter()
        stages.setdefault(stage, [now, now])[1] = now

    start = time.perf_counter()
    dataset = prepare_spec(spec, progress)
    seconds = time.perf_counter() - start
    # A stage runs from the previous stage's last report to its own last one.
    previous, stage_seconds = start, {}
    for stage, (_, last) in stages.items():
        stage_seconds[stage] = last - previous
        previous = last
    stage_seconds["artifact_and_install"] = start + seconds - previous
    return {
        "seconds": seconds,
        "rows": dataset.info["rows"],
        "stage_seconds": stage_seconds,
        "prepared_bytes": sum(p.stat().st_size for p in dataset.root.rglob("*") if p.is_file()),
    }


def child_pandas(file_format: str, paths: list[str], columns: list[str]) -> dict:
    """Read the files with pandas and factorize every categorical column, as a user would."""
    import pandas as pd

    start = time.perf_counter()
    try:
        read = pd.read_csv if file_format == "csv" else pd.read_parquet
        frame = pd.concat([read(path) for path in paths], ignore_index=True)
        read_seconds = time.perf_counter() - start
        distinct = {column: len(pd.factorize(frame[column])[1]) for column in columns}
    except (MemoryError, OSError) as error:
        # Out of address space shows as a MemoryError or as an OSError (ENOMEM) from pyarrow.
        if isinstance(error, OSError) and error.errno != errno.ENOMEM:
            raise
        return {
            "error": f"{type(error).__name__}: {error}",
            "seconds_until_error": time.perf_counter() - start,
        }
    return {
        "seconds": time.perf_counter() - start,
        "read_seconds": read_seconds,
        "rows": len(frame),
        "distinct": distinct,
        "dtypes": sorted({str(t) for t in frame.dtypes}),
    }


def run_child(
    arguments: list[str], env: dict[str, str], limit_as_gb: float | None, kill_rss_gb: float
) -> dict:
    """Run this script as a child; its JSON answer plus its wall time and peak RSS (wait4)."""

    def limit() -> None:
        if limit_as_gb is not None:
            size = int(limit_as_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(arguments)],
            stdout=out,
            stderr=err,
            env=env,
            preexec_fn=limit,
        )
        killed = threading.Event()
        watchdog = threading.Thread(
            target=_watch_rss, args=(child.pid, kill_rss_gb, killed), daemon=True
        )
        watchdog.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        stderr = err.read()
    answer = json.loads(lines[-1]) if child.returncode == 0 and lines else {}
    answer.update(
        process_wall_seconds=wall,
        peak_rss_gb=usage.ru_maxrss * 1024 / 1e9,
        exit_code=child.returncode,
        load_average_1min_at_start=round(load, 2),
    )
    if killed.is_set():
        answer["error"] = f"killed: RSS above {kill_rss_gb} GB"
    elif child.returncode != 0:
        answer.setdefault("error", stderr.strip().splitlines()[-1] if stderr.strip() else "")
    return answer


def _watch_rss(pid: int, limit_gb: float, killed: threading.Event) -> None:
    """Kill the child if its resident set passes `limit_gb` (the machine is shared)."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:
            return
        rss_line = next((line for line in text.splitlines() if line.startswith("VmRSS:")), None)
        if rss_line is None:
            return
        if int(rss_line.split()[1]) * 1024 > limit_gb * 1e9:
            killed.set()
            os.kill(pid, 9)
            return
        time.sleep(0.1)


# -- the run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One measured case: a child's arguments, run once per round (up to `max_rounds`)."""

    name: str
    rows: int
    arguments: list
    limit_as_gb: float | None = None
    max_rounds: int | None = None


def _median_case(case: Case, runs: list[dict]) -> dict:
    done = [run for run in runs if "error" not in run]
    result: dict = {"case": case.name, "rows": case.rows, "rounds": len(runs)}
    if case.limit_as_gb is not None:
        result["address_space_limit_gb"] = case.limit_as_gb
    if len(done) < len(runs):
        result["completed"] = False
        result["errors"] = [run["error"] for run in runs if "error" in run]
        result["peak_rss_gb"] = max(run["peak_rss_gb"] for run in runs)
    if not done:
        result["seconds_until_error"] = [run.get("seconds_until_error") for run in runs]
        return result
    result["completed"] = len(done) == len(runs)
    seconds = [run["seconds"] for run in done]
    median = statistics.median(seconds)
    result.update(
        seconds_median=median,
        seconds=seconds,
        rows_per_s=case.rows / median,
        peak_rss_gb=max(run["peak_rss_gb"] for run in done),
        process_wall_seconds_median=statistics.median(r["process_wall_seconds"] for r in done),
        load_average_1min_at_start=[run["load_average_1min_at_start"] for run in runs],
    )
    middle = min(done, key=lambda run: abs(run["seconds"] - median))
    for key in ("stage_seconds", "prepared_bytes", "distinct", "dtypes"):
        if key in middle:
            result[key] = middle[key]
    if "read_seconds" in done[0]:
        result["read_seconds_median"] = statistics.median(r["read_seconds"] for r in done)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--slice-rows", type=int, default=2_000_000, help="pandas' small size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--full-rounds", type=int, default=None, help="rounds at --rows (default: --rounds)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "embtab-prep")
    parser.add_argument("--pandas-limit-gb", type=float, default=8.0)
    parser.add_argument("--kill-rss-gb", type=float, default=10.0)
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child is not None:
        kind, *rest = json.loads(arguments.child)
        answer = child_prepare(*rest) if kind == "prepare" else child_pandas(*rest)
        print(json.dumps(answer))
        return

    data = arguments.scratch / f"rows-{arguments.rows}-seed-{arguments.seed}"
    layout = generate(data, arguments.rows, arguments.seed)
    print(json.dumps(layout), flush=True)
    files = [f"part-{f:03d}" for f in range(layout["files"])]
    # The slice: the first files holding at least --slice-rows rows.
    covered = np.cumsum(layout["file_rows"])
    slice_count = int(np.searchsorted(covered, arguments.slice_rows)) + 1
    slice_files, slice_rows = files[:slice_count], int(covered[min(slice_count, len(files)) - 1])
    sizes = {"full": (files, arguments.rows)}
    if slice_rows < arguments.rows:
        sizes["slice"] = (slice_files, slice_rows)

    prepared = arguments.scratch / "prepared"
    env = {**os.environ, "EMBTAB_DATA": str(prepared)}
    categorical = ["user_id", "item_id", *(c[0] for c in CATEGORICALS)]
    smallest = "slice" if "slice" in sizes else "full"
    cases: list[Case] = []
    for size, (names, rows) in sizes.items():
        for file_format in ("parquet", "csv"):
            paths = [f"{file_format}/{name}.{file_format}" for name in names]
            spec = write_spec(data, f"bench-{file_format}-{size}", file_format, paths)
            cases.append(
                Case(
                    f"prepare_spec_{file_format}_{size}",
                    rows,
                    ["prepare", str(spec)],
                    max_rounds=arguments.full_rounds if size == "full" else None,
                )
            )
        for file_format in ("csv", "parquet") if size == smallest else ("csv",):
            paths = [str(data / file_format / f"{name}.{file_format}") for name in names]
            cases.append(
                Case(
                    f"pandas_{file_format}_{size}",
                    rows,
                    ["pandas", file_format, paths, categorical],
                    limit_as_gb=arguments.pandas_limit_gb,
                    # Tried once on all rows, where it is expected to run out of memory.
                    max_rounds=1 if size != smallest else None,
                )
            )
    runs: dict[str, list[dict]] = {case.name: [] for case in cases}
    for round_index in range(arguments.rounds):
        for case in cases:
            if case.max_rounds is not None and round_index >= case.max_rounds:
                continue
            answer = run_child(case.arguments, env, case.limit_as_gb, arguments.kill_rss_gb)
            shutil.rmtree(prepared, ignore_errors=True)
            runs[case.name].append(answer)
            shown = {k: v for k, v in answer.items() if k not in ("distinct", "stage_seconds")}
            print(f"round {round_index + 1} {case.name}: {json.dumps(shown)}", flush=True)
        # Written after every round, so that a long run stopped early keeps what it measured.
        results = [_median_case(case, runs[case.name]) for case in cases]
        write_document(arguments, layout, sizes, results, rounds_done=round_index + 1)


def write_document(
    arguments: argparse.Namespace, layout: dict, sizes: dict, results: list[dict], rounds_done: int
) -> None:
    # Imported here: it loads torch, which the measured children must not.
    import pandas as pd

    from embtab.machine import machine_info, write_results

    by_case = {result["case"]: result for result in results}
    full_rows = sizes["full"][1]
    smallest = "slice" if "slice" in sizes else "full"
    compared = "full" if by_case["pandas_csv_full"].get("completed") else smallest
    rows_compared = sizes[compared][1]

    def ratio(ours: str, theirs: str) -> float | None:
        if not by_case.get(theirs, {}).get("completed"):
            return None
        return by_case[ours]["seconds_median"] / by_case[theirs]["seconds_median"]

    ours = [by_case[f"prepare_spec_{f}_full"] for f in ("parquet", "csv")]
    summary = {
        "rows": full_rows,
        "rows_per_s_parquet": ours[0].get("rows_per_s"),
        "rows_per_s_csv": ours[1].get("rows_per_s"),
        "peak_rss_gb": max(case["peak_rss_gb"] for case in ours),
        "vs_pandas": ratio(f"prepare_spec_csv_{compared}", f"pandas_csv_{compared}"),
        "vs_pandas_rows": rows_compared,
        "vs_pandas_parquet": ratio(
            f"prepare_spec_parquet_{smallest}", f"pandas_parquet_{smallest}"
        ),
        "vs_pandas_parquet_rows": sizes[smallest][1],
        "pandas_completed_at_full_size": bool(by_case["pandas_csv_full"].get("completed")),
        "pandas_peak_rss_gb_full_size": by_case["pandas_csv_full"]["peak_rss_gb"],
    }
    notes = [
        "Times are medians over rounds, each in a fresh subprocess, measured around the call "
        "(interpreter start and imports excluded; process_wall_seconds includes them). Peak "
        "RSS is the child's ru_maxrss from os.wait4.",
        "vs_pandas: our CSV preparation's time / pandas read_csv + factorize's time on the same "
        f"{rows_compared:,} rows (vs_pandas_rows); vs_pandas_parquet likewise with "
        "pd.read_parquet. pandas does less work: it writes nothing, and builds no lists, dense "
        "transforms, sorted splits or artifact.",
        f"pandas runs under RLIMIT_AS = {arguments.pandas_limit_gb} GiB so that running out of "
        "memory is a clean MemoryError (or OSError ENOMEM)"
        + ("; on all rows it ran once." if smallest == "slice" else "."),
        "The machine is shared with other jobs: each run records the 1-minute load average at "
        "its start (load_average_1min_at_start); on 2 cores, a load above 2 slows every case.",
    ]
    targets = {
        "rows_per_s_parquet": {
            "target": ">= 1e6",
            "met": (summary["rows_per_s_parquet"] or 0) >= 1e6,
        },
        "peak_rss_gb": {"target": "<= 2", "met": summary["peak_rss_gb"] <= 2.0},
    }
    write_results(
        arguments.output,
        machine_info(pandas=pd.__version__),
        results,
        summary,
        config={
            **layout,
            "csv_gb": layout["bytes"]["csv"] / 1e9,
            "parquet_gb": layout["bytes"]["parquet"] / 1e9,
            "slice_files": len(sizes.get("slice", sizes["full"])[0]),
            "rounds": arguments.rounds,
            "rounds_done": rounds_done,
            "full_rounds": arguments.full_rounds or arguments.rounds,
            "categorical_columns": 22,
            "dense_columns": len(DENSE),
        },
        targets=targets,
        notes=notes,
    )


if __name__ == "__main__":
    main()
