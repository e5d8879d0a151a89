"""Typed errors of embedding_tables: each says what was wrong and what is accepted."""


class EmbeddingTableError(ValueError):
    """Base class for every bad-input error raised by embedding_tables."""


class ConfigError(EmbeddingTableError):
    """A TableConfig (or a set of them) that cannot be built."""


class BudgetError(ConfigError):
    """A budget too small for the method to hold even its minimum rows."""


class IdError(EmbeddingTableError):
    """Ids of the wrong dtype, or out of range for a method that needs them in range."""


class FeatureError(EmbeddingTableError):
    """A KeyedJaggedTensor missing a configured feature or carrying an unknown one."""


class OffsetsError(EmbeddingTableError):
    """Bag offsets, lengths or per-id weights that do not describe the ids: decreasing or
    negative, not starting at 0, not adding up to the number of ids, one weight too many."""


class BackendError(EmbeddingTableError):
    """A value of the EMBTAB_LOOKUP switch that is not accepted, or Triton asked for where it
    is not installed."""
