"""Typed errors of the compression study: each says what was wrong and what is accepted."""


class StudyConfigError(ValueError):
    """A study setting (method, budget, seed, size, results file) the study cannot run with;
    raised before any cell runs."""


class InfeasibleCellError(ValueError):
    """A method that cannot be built at a budget on a data set: the cell is recorded as skipped
    with this message, never fatal to the study."""
