"""A checkpoint written by the int64-bookkeeping table (before the lean map) loads and continues.

`data/collisionless_v1.safetensors` was written by the code of commit d23b993 (int64 counts,
microsecond times and entry <-> row maps, (id, slot) bucket pairs) with this module's
`write_old_checkpoints`: per config, the state after one stream, then the outputs, touched rows
and evicted ids of a second stream and the state after it. The table of today must load the first
state, give the same answers on the second stream and end in the same state, tensor for tensor.

    git archive d23b993 embedding_tables | tar -x -C /tmp/oldcode
    PYTHONPATH=/tmp/oldcode:. python tests/embedding_tables/test_collisionless_v1_checkpoint.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.embedding_tables.test_collisionless_checkpoint import (
    CONFIGS,
    Clock,
    batches,
    make_table,
    train,
)

OLD_CHECKPOINTS = Path(__file__).parent / "data" / "collisionless_v1.safetensors"
# The count-min-sketch config is left out to keep the file small (its sketch alone is 16 KB a
# state); the sketch is int32 before and after, and test_collisionless_checkpoint covers it.
OLD_CONFIGS = {name: CONFIGS[name] for name in ("exact-lru-ttl", "unbounded-fp16-zeros")}


def write_old_checkpoints(path: Path) -> None:
    """Run every config through two streams; keep the state between and after, and the answers."""
    saved = {}
    for name, options in OLD_CONFIGS.items():
        clock = Clock()
        table = make_table(options, clock)
        train(table, clock, batches(8, seed=1))
        saved.update({f"{name}/before/{k}": v.clone() for k, v in table.state_dict().items()})
        observed = train(table, clock, batches(8, seed=2))
        for step, (output, touched, evicted) in enumerate(observed):
            saved[f"{name}/output/{step}"] = output
            saved[f"{name}/touched/{step}"] = touched
            saved[f"{name}/evicted/{step}"] = evicted
        saved.update({f"{name}/after/{k}": v.clone() for k, v in table.state_dict().items()})
    save_file({key: tensor.contiguous() for key, tensor in saved.items()}, str(path))


def assert_same(got: torch.Tensor, expected: torch.Tensor, what: object) -> None:
    """Bookkeeping (ids, slots, counts, times) bit for bit; float rows to the last bits, which
    torch's CPU kernels round differently on CPUs of other vector widths than the writer's."""
    if expected.is_floating_point():
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=str(what))
    else:
        assert torch.equal(got, expected), what


def _part(saved: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in saved.items() if key.startswith(prefix)}


@pytest.mark.parametrize("name", sorted(OLD_CONFIGS))
def test_old_checkpoint_loads_and_continues_as_the_old_code_did(name: str) -> None:
    saved = load_file(str(OLD_CHECKPOINTS))
    clock = Clock()
    table = make_table(OLD_CONFIGS[name], clock)
    clock.now += 8 * 0.75  # where the writer's clock stood after the first stream
    before = _part(saved, f"{name}/before/")
    table.load_state_dict(before)
    assert table.state_dict().keys() == before.keys()
    for key, value in table.state_dict().items():
        assert torch.equal(value, before[key]), key

    observed = train(table, clock, batches(8, seed=2))
    for step, (output, touched, evicted) in enumerate(observed):
        assert_same(output, saved[f"{name}/output/{step}"], step)
        assert torch.equal(touched, saved[f"{name}/touched/{step}"]), step
        assert torch.equal(evicted, saved[f"{name}/evicted/{step}"]), step
    after = _part(saved, f"{name}/after/")
    for key, value in table.state_dict().items():
        assert_same(value, after[key], key)


if __name__ == "__main__":
    OLD_CHECKPOINTS.parent.mkdir(exist_ok=True)
    write_old_checkpoints(OLD_CHECKPOINTS)
