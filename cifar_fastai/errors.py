"""Errors the user can act on: the CLI prints their message in one line and exits non-zero, never a traceback."""


class CifarFastaiError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1


class DataError(CifarFastaiError):
    """Missing, unreachable or wrongly laid-out data."""


class ArchError(CifarFastaiError):
    """Unknown architecture or weights that do not fit it."""

    exit_code = 2


class WeightsError(CifarFastaiError):
    """Weights that cannot be found, downloaded or loaded."""


class ModelFileError(CifarFastaiError):
    """An exported model that is missing, tampered with or not trusted."""


class HubError(ModelFileError):
    """The Hugging Face Hub is offline, unreachable or refuses (no token, no such repo); a `ModelFileError`, so code
    that handles a missing model handles an `hf-hub:` one too."""


class TrainingError(CifarFastaiError):
    """A run that diverged (NaN/inf loss) or otherwise cannot produce a model."""


class ImageInputError(CifarFastaiError):
    """An uploaded file that is not a usable image (not an image, truncated, empty, too large)."""


class ConfigError(CifarFastaiError):
    """A setting that is misspelt, out of range or contradicts another, or a run folder that cannot be resumed;
    exit code 2, as for every other usage error of the command line."""

    exit_code = 2


class StudyError(CifarFastaiError):
    """An unknown study or row, a grid that cannot be run, or a study folder that holds another budget."""

    exit_code = 2
