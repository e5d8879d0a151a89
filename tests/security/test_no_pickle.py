"""No pickle anywhere: models, checkpoints, row files and messages are loaded only as
safetensors, JSON, Arrow or Parquet. A pickle load runs code chosen by whoever wrote the file,
so this greps every Python file of the packages (and bench/) for the ways one could slip in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("embtab", "embedding_tables", "models", "online_training", "serving", "feature_store")
SCANNED = (*PACKAGES, "bench")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
PICKLING_CALLS = {"read_pickle", "to_pickle", "load_pickle"}


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def pickle_uses(source: str) -> list[str]:
    """What in `source` could unpickle: imports of pickling modules, `torch.load` without
    `weights_only=True`, `allow_pickle=True`, pandas pickle I/O, `marshal.loads`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            found += [
                f"line {node.lineno}: import {n}"
                for n in names
                if n.split(".")[0] in PICKLING_MODULES
            ]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
            if name == "load" and owner == "torch" and not _keyword_is_true(node, "weights_only"):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if _keyword_is_true(node, "allow_pickle"):
                found.append(f"line {node.lineno}: {ast.unparse(func)}(allow_pickle=True)")
            if name in PICKLING_CALLS or (owner == "marshal" and name == "loads"):
                found.append(f"line {node.lineno}: {ast.unparse(func)}")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in PICKLING_MODULES
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from joblib import load",
        "import cloudpickle as cp",
        "state = torch.load(path)",
        "state = torch.load(path, weights_only=False)",
        "rows = np.load(path, allow_pickle=True)",
        "rows = numpy.load(path, allow_pickle=True)",
        "frame = pandas.read_pickle(path)",
        "code = marshal.loads(blob)",
        "import dill.settings",
    ],
)
def test_the_scan_finds_every_way_to_unpickle(snippet):
    assert pickle_uses(snippet), f"the scan missed {snippet!r}"


@pytest.mark.parametrize(
    "snippet",
    [
        "state = torch.load(path, weights_only=True)",
        "rows = np.load(path)",
        "tensors = safetensors.torch.load(blob)",
        "model = json.loads(text)",
    ],
)
def test_the_scan_leaves_safe_loads_alone(snippet):
    assert pickle_uses(snippet) == []


def test_no_package_can_unpickle():
    files = [path for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50, f"only {len(files)} files found under {ROOT}"
    offences = {
        str(path.relative_to(ROOT)): uses
        for path in files
        if (uses := pickle_uses(path.read_text(encoding="utf-8")))
    }
    assert offences == {}, f"pickle can run code from a file; use safetensors/JSON: {offences}"
