"""Exceptions that sparsefx raises on bad input. Each message names the problem and the fix."""


class SparsefxError(Exception):
    """Base class of every error sparsefx raises on purpose."""


class UnsupportedModelError(SparsefxError):
    """The model's graph holds an op or structure that sparsefx cannot compress."""


class RecipeError(SparsefxError, ValueError):
    """A recipe or config field holds an invalid value."""


class CalibrationError(SparsefxError):
    """Calibration data is missing, too short, or produced non-finite statistics."""


class ArtifactError(SparsefxError):
    """A compressed-model artifact is missing files or is corrupt."""


class DataError(SparsefxError):
    """Evaluation or calibration text could not be obtained or is too short."""


class ExportError(SparsefxError):
    """An artifact holds something the chosen export format cannot represent, or the output cannot be written."""
