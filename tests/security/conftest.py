"""The streaming tests' broker, topics and data set fixtures, for the checks here."""

from tests.online_training.conftest import kafka, movielens, topics  # noqa: F401
