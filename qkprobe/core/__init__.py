"""Pure math: singular modes, mode coordinates, per-mode statistics. Knows no model library."""
from .modes import QKModes, qk_modes, full_svd_modes, fold_affine_norm  # noqa: F401
