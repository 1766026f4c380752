"""qkprobe: dissect query-key interaction in vision transformers (Pan et al., NeurIPS 2024)."""
from ._version import __version__  # noqa: F401
