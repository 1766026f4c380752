"""qkprobe: dissect query-key interaction in vision transformers (Pan et al., NeurIPS 2024).

Main entry points::

    bases = qkprobe.compute_bases(model)               # singular modes of W_qᵀW_k per layer
    coords = qkprobe.mode_coordinates(model, images)   # per-token mode coordinates a, b
    with qkprobe.attach(model, out="run.h5"): ...      # stream per-mode statistics to HDF5
    with qkprobe.intervene(model, {(5, 3): [0]}): ...  # remove (scale) modes while the model runs
    run = qkprobe.open_run("run.h5")                   # read a run, also while it is written

Names are imported on first use, so tools that only read run files do not pay for torch.
"""
from importlib import import_module

from ._version import __version__  # noqa: F401

_EXPORTS = {
    "AttentionAdapter": ".adapters.base", "QKWeights": ".adapters.base",
    "register_attention": ".adapters.base", "unregister_attention": ".adapters.base",
    "LayerBases": ".bases", "compute_bases": ".bases",
    "ModeCoordinates": ".capture.coordinates", "mode_coordinates": ".capture.coordinates",
    "Probe": ".capture.probe", "ProbeOptions": ".capture.probe", "attach": ".capture.probe",
    "Intervention": ".capture.intervene", "intervene": ".capture.intervene",
    "open_run": ".sinks.run_file", "load_model": ".models",
    "QKProbeError": ".errors",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if name in ("adapters", "core", "capture", "reduce", "state", "sinks", "cli", "integrations", "plot", "models",
                "data", "distributed", "report", "bases", "errors", "metadata"):
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'qkprobe' has no attribute {name!r}")


def __dir__():
    return __all__
