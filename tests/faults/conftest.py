"""The streaming tests' fixtures (session data set, broker settings, fresh topics), shared."""

from tests.online_training.conftest import kafka, movielens, slice_labels, topics

__all__ = ["kafka", "movielens", "slice_labels", "topics"]
