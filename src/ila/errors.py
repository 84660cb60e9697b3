"""Errors that ila raises for bad input.

Every error says what was wrong and, where possible, what to do about it. The command line prints the
message without a traceback and exits with status 2.
"""


class IlaError(Exception):
    """Base class of every error ila raises on purpose."""


class ConfigError(IlaError):
    """An invalid, unknown or contradictory configuration value; the message names the dotted key."""


class DataError(IlaError):
    """A dataset that is missing, empty, malformed or unusable after formatting and truncation."""


class ModelError(IlaError):
    """A model or adapter that is missing, unreadable or of the wrong kind."""


class RankingError(IlaError):
    """A ranking or selection that is malformed, of another model, or selects nothing."""


class TrainingError(IlaError):
    """Training that cannot go on, such as a loss that became NaN or infinite."""
