"""The online feature store keyed by raw ids holds raw values: one store, written once, gives
each model version the right features, whatever ids its artifact gives the raw values.

Two versions of one model are published with artifacts that number the same raw values
differently (the second was fitted on data with more values, so every id moves), and scored by
one server that switches from the first to the second. Each version's scores with its features
left to the store equal its scores with the same raw features sent in the request.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from feature_store.artifact import Preprocessor, Vocabulary
from feature_store.online import OnlineFeatureStore
from feature_store.spec import parse_spec
from models.build import build_model, plan_model
from models.checkpoint import manifest_of
from models.config import run_config_from_dict
from serving.published_model import publish_model
from serving.publisher import ParamPublisher
from serving.reader import ParamReader
from serving.redis_nodes import RedisConfig, RedisNodes
from serving.request import ScoreRequest
from serving.scorer import Scorer, ScorerConfig
from tests.serving.serving_helpers import unique_name

SPEC = {
    "name": "movielens-100k",  # the online layout applies to it
    "source": {"format": "parquet", "paths": ["clicks.parquet"]},
    "label": {"column": "clicked"},
    "time": {"column": "ts"},
    "roles": {"user": "user_id", "item": "item_id"},
    "features": [
        {"name": "user_id", "kind": "categorical"},
        {"name": "item_id", "kind": "categorical"},
        {"name": "age", "kind": "categorical"},
        {"name": "gender", "kind": "categorical"},
        {"name": "occupation", "kind": "categorical", "type": "int"},
        {"name": "zip_code", "kind": "categorical"},
        {"name": "release_year", "kind": "categorical", "type": "int"},
        {"name": "genres", "kind": "multi_valued", "separator": "|"},
        {"name": "hist_item_id", "kind": "sequence", "of": "item_id", "max_length": 4},
        {"name": "user_activity", "kind": "dense"},
        {"name": "item_popularity", "kind": "dense"},
    ],
}
USERS = [f"user-{n}" for n in range(30)]
ITEMS = [f"sku-{n}" for n in range(80)]
VALUES = {
    "user_id": USERS,
    "item_id": ITEMS,
    "age": ["18", "25", "35", "45", "56"],
    "gender": ["F", "M"],
    "occupation": list(range(0, 40, 2)),
    "zip_code": [f"{n:05d}" for n in range(10_000, 10_400, 17)],
    "release_year": list(range(1960, 2000)),
    "genres": ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"],
}


def artifact(extra: int) -> Preprocessor:
    """An artifact over VALUES with `extra` more values per feature sorted before them: the
    same raw values get ids `extra` higher, as after a refit on data with more values."""
    spec = parse_spec(SPEC, base_dir=None)
    vocabularies = {}
    for name, values in VALUES.items():
        first = [(-1 - n if isinstance(values[0], int) else f"!{n}") for n in range(extra)]
        vocabularies[name] = Vocabulary(pa.array(first + list(values)), oov=True, seed=3)
    cardinalities = {name: vocabulary.size for name, vocabulary in vocabularies.items()}
    return Preprocessor(spec, vocabularies, {}, cardinalities, {"genres": 3, "hist_item_id": 4})


def publish_version(nodes: RedisNodes, name: str, preprocessing: Preprocessor, seed: int):
    torch.manual_seed(seed)
    run = run_config_from_dict(
        {
            "dataset": "movielens-100k",
            "model": {"name": "dcn", "deep_mlp": [16], "cross_layers": 1},
            "tables": {"method": "full", "dim": 8},
        }
    )
    model = build_model(plan_model(run, preprocessing.schema(), preprocessing)).eval()
    publish_model(ParamPublisher(nodes, name), model, manifest_of(model), num_shards=2)


def user_features(user: int) -> dict:
    return {
        "age": VALUES["age"][user % 5],
        "gender": VALUES["gender"][user % 2],
        "occupation": VALUES["occupation"][user % 20],
        "zip_code": VALUES["zip_code"][user % 20],
        "hist_item_id": [ITEMS[(user * 7 + k) % 80] for k in range(1 + user % 6)],
    }


def item_features(item: int) -> dict:
    return {
        "release_year": VALUES["release_year"][item % 40],
        "genres": [VALUES["genres"][item % 6], VALUES["genres"][(item * 5 + 1) % 6]],
    }


@pytest.fixture
def served(redis_service):
    nodes = RedisNodes(RedisConfig.parse(redis_service.redis_url))
    name = unique_name()
    store = OnlineFeatureStore(
        nodes.meta, artifact(0).schema(), namespace=f"embtab:test:{name}", preprocessing=artifact(0)
    )
    users = list(range(len(USERS)))
    profiles = [user_features(user) for user in users]
    store.write_users(
        [USERS[user] for user in users],
        {key: [p[key] for p in profiles] for key in ("age", "gender", "occupation", "zip_code")},
    )
    store.write_sequences([USERS[user] for user in users], [p["hist_item_id"] for p in profiles])
    attributes = [item_features(item) for item in range(len(ITEMS))]
    store.write_items(
        ITEMS, {key: [a[key] for a in attributes] for key in ("release_year", "genres")}
    )
    scorer = Scorer(
        ParamReader(nodes, name),
        ScorerConfig(name),
        online=lambda schema, preprocessing: OnlineFeatureStore(
            nodes.meta, schema, namespace=f"embtab:test:{name}", preprocessing=preprocessing
        ),
    )
    yield nodes, name, scorer
    store.clear()
    nodes.close()


def scores(scorer: Scorer, user: int | None, items: list[int], with_features: bool) -> np.ndarray:
    """Scores of the user's candidates, with every feature sent raw, or only the ids (user
    None: a user the store does not know)."""
    body = {
        "user_id": "nobody" if user is None else USERS[user],
        "context": {"user_activity": 1.5, **(user_features(user) if with_features else {})},
        "candidates": [
            {
                "item_id": ITEMS[item],
                "features": {
                    "item_popularity": item / 10,
                    **(item_features(item) if with_features else {}),
                },
            }
            for item in items
        ],
    }
    request = scorer.prepare(ScoreRequest.model_validate(body))
    return scorer.score([request]).per_request[0]


def test_one_store_gives_each_version_its_own_ids_for_the_same_raw_values(served):
    nodes, name, scorer = served
    first, second = artifact(0), artifact(5)
    assert first.encode("age", pa.array(["25"])) != second.encode("age", pa.array(["25"]))
    items = [3, 17, 42, 64, 79]
    for version, preprocessing in enumerate((first, second), start=1):
        publish_version(nodes, name, preprocessing, seed=version)
        scorer.refresh()
        assert scorer.snapshot.version == version
        assert scorer.snapshot.encoder.preprocessing.content_hash == preprocessing.content_hash
        for user in (0, 7, 29):
            given = scores(scorer, user, items, with_features=True)
            np.testing.assert_allclose(
                scores(scorer, user, items, with_features=False), given, atol=1e-6
            )
            # The user's features matter: a user the store does not know scores otherwise.
            assert not np.allclose(scores(scorer, None, items, with_features=False), given)
        # Prepared ids (embtab's own fast path) find the same raw ids' features.
        prepared = {
            "user_id": preprocessing.encode("user_id", pa.array([USERS[7]]))[0].as_py(),
            "context": {"user_activity": 1.5},
            "candidates": [
                {"item_id": item_id, "features": {"item_popularity": item / 10}}
                for item, item_id in zip(
                    items,
                    preprocessing.encode(
                        "item_id", pa.array([ITEMS[i] for i in items])
                    ).to_pylist(),
                    strict=True,
                )
            ],
        }
        request = scorer.prepare(ScoreRequest.model_validate(prepared))
        np.testing.assert_allclose(
            scorer.score([request]).per_request[0],
            scores(scorer, 7, items, with_features=True),
            atol=1e-6,
        )
