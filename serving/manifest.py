"""The version manifest and the table layouts: what a published version holds and how its rows
are encoded and sharded, and where a version stands (its head). Key layout: `serving.keys`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from serving.errors import PublishError, StoreError
from serving.keys import check_name
from serving.row_encoding import row_bytes

KEYED_BY = ("row", "id")
MANIFEST_FORMAT = "embtab.serving.manifest"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class TableLayout:
    """One physical table as published: `rows` is its row count (its capacity, or 0 if unbounded,
    for an id-keyed table); `keyed_by` is `row` (row ids in [0, rows)) or `id` (raw int64 ids)."""

    name: str
    rows: int
    dim: int
    keyed_by: str = "row"

    def __post_init__(self) -> None:
        check_name("table", self.name)
        if self.keyed_by not in KEYED_BY:
            raise PublishError(
                f"table {self.name!r}: keyed_by {self.keyed_by!r}; accepted: {', '.join(KEYED_BY)}"
            )
        if self.dim < 1 or self.rows < 0 or (self.keyed_by == "row" and self.rows < 1):
            raise PublishError(
                f"table {self.name!r}: needs dim >= 1 and, keyed by row, rows >= 1; got "
                f"rows={self.rows} dim={self.dim}"
            )


@dataclass(frozen=True)
class VersionManifest:
    """What a version holds: its tables, how rows are encoded and sharded, the model's manifest."""

    model: str
    version: int
    encoding: str
    num_shards: int
    tables: tuple[TableLayout, ...]
    model_manifest: dict = field(default_factory=dict)
    created_at: float = 0.0
    rows_written: dict[str, int] = field(default_factory=dict)
    num_nodes: int = 1  # Redis URLs the shards were spread over; 0 for a Redis Cluster
    publish_id: str = ""  # see serving.keys: "" for versions published before ids existed

    def table(self, name: str) -> TableLayout:
        for layout in self.tables:
            if layout.name == name:
                return layout
        raise StoreError(
            f"model {self.model!r} version {self.version} has no table {name!r}; tables: "
            f"{', '.join(t.name for t in self.tables)}"
        )

    def to_json(self) -> str:
        payload = asdict(self)
        payload["format"] = MANIFEST_FORMAT
        payload["format_version"] = MANIFEST_VERSION
        return json.dumps(payload, sort_keys=True)

    @classmethod
    def from_json(cls, text: bytes | str) -> VersionManifest:
        try:
            raw = json.loads(text)
            if (
                raw.get("format") != MANIFEST_FORMAT
                or raw.get("format_version") != MANIFEST_VERSION
            ):
                raise StoreError(
                    f"manifest format {raw.get('format')!r} v{raw.get('format_version')}; this "
                    f"build reads {MANIFEST_FORMAT!r} v{MANIFEST_VERSION}"
                )
            return cls(
                model=raw["model"],
                version=int(raw["version"]),
                encoding=raw["encoding"],
                num_shards=int(raw["num_shards"]),
                tables=tuple(TableLayout(**table) for table in raw["tables"]),
                model_manifest=raw.get("model_manifest", {}),
                created_at=float(raw.get("created_at", 0.0)),
                rows_written={k: int(v) for k, v in raw.get("rows_written", {}).items()},
                num_nodes=int(raw.get("num_nodes", 1)),
                publish_id=str(raw.get("publish_id", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, StoreError):
                raise
            raise StoreError(f"not a valid serving manifest: {error}") from error


@dataclass(frozen=True)
class VersionHead:
    """Where a version stands: its current dense revision and last committed delta, and which
    publish it is (see serving.keys)."""

    version: int
    dense_revision: int
    delta: int
    publish_id: str = ""


def bytes_per_row(manifest: VersionManifest, table: str) -> int:
    """Encoded bytes of one row of `table` in this version."""
    return row_bytes(manifest.encoding, manifest.table(table).dim)
