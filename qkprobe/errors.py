"""Errors qkprobe raises for bad input.

Every message is one sentence that says what is wrong and what to do. The CLI prints
``str(error)`` and exits non-zero (no traceback unless ``--debug``).
"""


class QKProbeError(Exception):
    """Base class of every error meant for the user (clear message, no traceback)."""


class UnknownModelSpec(QKProbeError):
    """A model spec that names no known library or model."""


class WeightsError(QKProbeError):
    """Pretrained weights that cannot be fetched, or a weights file that does not fit the model."""


class UnsupportedAttention(QKProbeError):
    """An attention module no adapter knows (see ``qkprobe.register_attention``)."""


class NoAttention(QKProbeError):
    """A model with no attention module qkprobe can find."""


class ShapeError(QKProbeError):
    """Tensors of the wrong shape."""


class RunFileError(QKProbeError):
    """A run file that cannot be read, resumed or written."""


class InterventionError(QKProbeError):
    """A mode intervention that names layers, heads or modes the model does not have."""


class TransformError(QKProbeError):
    """Image preprocessing options that cannot be applied (e.g. --mean with no transform to change)."""


class BackendError(QKProbeError):
    """A statistics backend that does not exist or cannot run on the model's device."""


class UsageError(QKProbeError, ValueError):
    """Arguments that do not fit the model or the batch: layers, heads, statistics, ``every``,
    ``topk``, ids or labels of the wrong count. Also a ValueError, as before it existed."""
