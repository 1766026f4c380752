"""qkprobe: dissect query-key interaction in vision transformers (Pan et al., NeurIPS 2024).

Main entry points::

    bases = qkprobe.compute_bases(model)               # singular modes of W_qᵀW_k per layer
    coords = qkprobe.mode_coordinates(model, images)   # per-token mode coordinates a, b
"""
from ._version import __version__  # noqa: F401
from .adapters.base import AttentionAdapter, QKWeights, register_attention, unregister_attention  # noqa: F401
from .bases import LayerBases, compute_bases  # noqa: F401
from .capture.coordinates import ModeCoordinates, mode_coordinates  # noqa: F401
from .errors import QKProbeError  # noqa: F401
from .capture.probe import Probe, ProbeOptions, attach  # noqa: F401
from .sinks.run_file import open_run  # noqa: F401
