"""The streaming tests' data set fixture, for the delta sync checks here."""

from tests.online_training.conftest import movielens  # noqa: F401
