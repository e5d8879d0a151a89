"""The streaming tests' broker and data set fixtures, for the dead-letter fuzz here."""

from tests.online_training.conftest import kafka, movielens  # noqa: F401
