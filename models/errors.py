"""Typed errors of models: each says what was wrong and what is accepted."""


class ModelError(ValueError):
    """Base class for every bad-input error raised by models."""


class ModelConfigError(ModelError):
    """A model, table or training config that cannot be built (raised before training starts)."""


class BatchError(ModelError):
    """Input columns that do not match the schema the model was built from."""


class MetricError(ModelError):
    """A metric that is undefined for its input (e.g. AUC with a single class)."""


class NonFiniteLossError(ModelError):
    """A NaN or inf loss: training stopped before the step's update was applied."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(
            f"loss is {loss} at step {step}; training stopped before applying this step's update "
            "(the last good checkpoint is untouched); try a lower learning rate"
        )
        self.step = step
        self.loss = loss


class CheckpointError(ModelError):
    """A checkpoint that is truncated, corrupt, or from an incompatible format version."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (read-only directory, full disk); the previous file
    at the path is untouched. An OSError too, since the file system is what failed."""
