"""Query and key maps of chosen modes, recomputed for a few images from the recorded model.

A run file keeps statistics, not maps. For the optimal images of the report the model is
rebuilt from the metadata the run recorded (``model_spec``, ``weights_file``, ``random_init``,
``seed``), its weights hash is compared with the recorded one, the chosen images are passed
through the model's own transform, and the coordinates ``a`` (query side) and ``b`` (key side) of
the chosen layers are captured from the module's q and k exactly as the probe does.

Singular vectors have an arbitrary sign per mode; modes recomputed here are aligned to the
recorded U (and checked against the recorded V), so "sign +" (``score_pos = max(a)·max(b)``) and
"sign −" (``score_neg = min(a)·min(b)``) mean what they meant in the run. Each image's score is
recomputed and returned next to the recorded one.
"""

from __future__ import annotations

import os

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch



@dataclass
class LayerRef:
    """What the run recorded about one layer, as needed to recompute its maps."""

    index: int                # layer index in the run file
    name: str                 # module path
    U: np.ndarray             # (H, D, R) recorded query-side singular vectors
    V: np.ndarray             # (H, Dk, R)
    fold_ln: bool
    prefix_tokens: int        # tokens left out of the maps
    include_prefix: bool      # whether the run's statistics (scores) included them


@dataclass
class MapResult:
    """Recomputed coordinates for some images and layers (see :meth:`maps`)."""

    noun: ClassVar[str] = "images"   # what the inputs are called on the page
    loaded: bool = False
    recorded_hash: str = ""
    rebuilt_hash: str = ""
    notes: List[str] = field(default_factory=list)          # sentences for the page
    images: Dict[str, np.ndarray] = field(default_factory=dict)   # id → (h, w, 3) in [0, 1]
    failed: Dict[str, str] = field(default_factory=dict)          # id → why it was not used
    coords: Dict[Tuple[int, str], Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    grids: Dict[int, Tuple[int, int]] = field(default_factory=dict)
    layers: Dict[int, LayerRef] = field(default_factory=dict)
    bad_layers: Dict[int, str] = field(default_factory=dict)
    scales: Dict[int, float] = field(default_factory=dict)        # layer → the bases' logit scale
    # (layer, head, id) → (N, Nk) the head's actual attention probabilities (only ``keep_probs`` heads)
    probs: Dict[Tuple[int, int, str], np.ndarray] = field(default_factory=dict)

    @property
    def hash_ok(self) -> Optional[bool]:
        if not self.loaded or not self.recorded_hash:
            return None
        return self.rebuilt_hash == self.recorded_hash

    def has(self, layer: int, sample_id: str) -> bool:
        return (layer, sample_id) in self.coords

    def maps(self, layer: int, head: int, mode: int, sign: int, sample_id: str):
        """(qmap (gh, gw), kmap (gh, gw), score) of one mode for one image; ``sign`` 0 uses a and b,
        1 uses −a and −b (the min·min end). ``score`` is max(±a)·max(±b) over the tokens the run
        scored, i.e. the recomputed ``score_pos`` (sign 0) or ``score_neg`` (sign 1)."""
        a, b = self.coords[(layer, sample_id)]          # (H, N, R), (H, Nk, R)
        ref = self.layers[layer]
        s = 1.0 if sign == 0 else -1.0
        qa, kb = s * a[head, :, mode], s * b[head, :, mode]
        p = ref.prefix_tokens
        start = 0 if ref.include_prefix else p
        score = float(qa[start:].max() * kb[start:].max())
        gh, gw = self.grids[layer]
        return qa[p:].reshape(gh, gw), kb[p:].reshape(gh, gw), score


def _normalize_of(transform):
    """mean, std of the last torchvision Normalize in ``transform`` (None when there is none)."""
    steps = getattr(transform, "transforms", None) or [transform]
    for t in reversed(list(steps)):
        if type(t).__name__ == "Normalize" and hasattr(t, "mean") and hasattr(t, "std"):
            return np.asarray(t.mean, dtype=np.float64), np.asarray(t.std, dtype=np.float64)
    return None


def display_image(x: torch.Tensor, transform) -> np.ndarray:
    """The model's input tensor (3, h, w) as an (h, w, 3) image in [0, 1] (normalization undone)."""
    arr = x.detach().cpu().double().numpy()
    norm = _normalize_of(transform)
    if norm is not None:
        mean, std = norm
        arr = arr * std.reshape(-1, 1, 1) + mean.reshape(-1, 1, 1)
    else:
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, 0)
    return np.clip(arr[:3].transpose(1, 2, 0), 0.0, 1.0)


def grid_shape(n_patches: int, height: int, width: int) -> Optional[Tuple[int, int]]:
    """(rows, cols) of the patch grid for an input of height × width, or None if none fits."""
    if n_patches <= 0:
        return None
    gh = max(1, int(round(np.sqrt(n_patches * height / max(width, 1)))))
    for cand in (gh, gh - 1, gh + 1):
        if cand > 0 and n_patches % cand == 0:
            return cand, n_patches // cand
    return None


def _sign_alignment(U_new: np.ndarray, U_old: np.ndarray, V_new: np.ndarray, V_old: np.ndarray):
    """(H, R) ±1 that turns recomputed modes into the recorded ones, and the worst |u_new·u_old|
    (1 when the modes are the same up to sign)."""
    du = np.einsum("hdr,hdr->hr", U_new, U_old)
    dv = np.einsum("hdr,hdr->hr", V_new, V_old)
    sign = np.where(du < 0, -1.0, 1.0)
    agree = float(min(np.abs(du).min(), np.abs(dv).min())) if du.size else 1.0
    if np.any(np.sign(du) * np.sign(dv) < 0):
        agree = min(agree, 0.0)
    return sign, agree


def _keep_probs(res: MapResult, layer: int, heads: Sequence[int], ids: Sequence[str], q, k, info,
                scale: float) -> None:
    """Store the actual attention probabilities of ``heads`` for each image of the batch."""
    if not heads:
        return
    from ..capture.attention import attention_terms, real_probs
    probs = real_probs(attention_terms(info, q, k), scale)      # (B, H, N, Nk)
    for h in heads:
        p = probs[:, int(h)].float().cpu().numpy()
        for j, sid in enumerate(ids):
            res.probs[(layer, int(h), sid)] = p[j]


_REBUILT: list = []  # [recipe, (model, transform)]: the last model rebuilt from a run file


def rebuild_model(meta: dict, device: str = "cpu"):
    """(model, transform) of the model a run file's metadata records (spec, weights file, random
    init and seed), built without running code the spec names; raises what the library raises.
    The last one is kept for the next call with the same recipe (weights file unchanged), so a
    report's sections share one model (read only: hooks come and go, weights never change)."""
    from ..models import load_model, untrusted_spec
    weights = meta.get("weights_file") or None
    try:
        stamp = os.stat(weights).st_mtime_ns if weights else None
    except OSError:
        stamp = None  # load_model says what is wrong with it
    recipe = (str(meta.get("model_spec")), weights, stamp, bool(meta.get("random_init")), int(meta.get("seed") or 0),
              str(device))
    if _REBUILT and _REBUILT[0] == recipe:
        return _REBUILT[1]
    _REBUILT.clear()
    with untrusted_spec():   # the spec comes from the file: never run code it names
        built = load_model(recipe[0], weights=weights, pretrained=not recipe[3], seed=recipe[4], device=device)
    _REBUILT.extend([recipe, built])
    return built


def recompute(meta: dict, layers: Sequence[LayerRef], paths: Dict[str, str], *, device: str = "cpu",
              batch_size: int = 8, progress: bool = True,
              keep_probs: Optional[Dict[int, Sequence[int]]] = None) -> MapResult:
    """Rebuild the recorded model and capture the coordinates of ``layers`` for ``paths``
    (sample id → image file). ``keep_probs``: layer → heads whose actual attention probabilities
    (the adapter's, as the attention share uses them) are kept in ``probs``. Never raises for a
    model that cannot be rebuilt: the reason is a note of the result and ``loaded`` stays False."""
    from tqdm import tqdm

    from ..adapters.discover import find_attention, prefix_tokens
    from ..bases import layer_bases
    from ..capture.coordinates import capture_qk, coordinates_from_qk
    from ..data import ImageDataset
    from ..models import weights_hash

    res = MapResult(recorded_hash=str(meta.get("weights_hash") or ""))
    res.layers = {l.index: l for l in layers}
    spec = meta.get("model_spec")
    if not spec:
        res.notes.append("The run file records no model spec, so the query/key maps cannot be recomputed.")
        return res
    try:
        model, transform = rebuild_model(meta, device)
    except Exception as exc:  # noqa: BLE001 - whatever a file's spec makes a library raise is a note
        msg = " ".join(str(exc).split()) or type(exc).__name__
        res.notes.append(f"The model {spec} could not be rebuilt, so no query/key maps are shown ({msg}).")
        return res
    res.loaded = True
    res.rebuilt_hash = weights_hash(model)
    if res.recorded_hash and res.rebuilt_hash != res.recorded_hash:
        res.notes.append(f"The model rebuilt from {spec} has weights hash {res.rebuilt_hash}, but the run was "
                         f"recorded with {res.recorded_hash}: the maps below come from different weights than "
                         f"the statistics.")
    elif not res.recorded_hash:
        res.notes.append("The run file records no weights hash, so the rebuilt weights could not be checked.")
    if transform is None or not callable(transform) or hasattr(transform, "tokenize"):
        res.notes.append(f"{spec} has no image preprocessing, so no query/key maps are shown.")
        return res

    sites = {s.name: s for s in find_attention(model)}
    n_prefix = prefix_tokens(model)
    for ref in layers:
        if ref.prefix_tokens < 0:  # not recorded: the rebuilt model says
            ref.prefix_tokens = int(n_prefix or 0)
    chosen, signs = [], {}
    for ref in layers:
        site = sites.get(ref.name)
        if site is None:
            res.bad_layers[ref.index] = f"the rebuilt model has no attention layer {ref.name}"
            continue
        lb = layer_bases(site, model, fold_ln=ref.fold_ln, n_prefix=n_prefix, spectra=False)
        U_new, V_new = lb.U.numpy(), lb.V.numpy()
        if U_new.shape != ref.U.shape or V_new.shape != ref.V.shape:
            res.bad_layers[ref.index] = f"{ref.name} has modes of another shape than recorded"
            continue
        sign, agree = _sign_alignment(U_new, ref.U.astype(np.float64), V_new, ref.V.astype(np.float64))
        if agree < 0.99 and res.hash_ok is not False:
            res.notes.append(f"Layer {ref.index} ({ref.name}): recomputed singular vectors differ from the recorded "
                             f"ones (|u·u_recorded| down to {agree:.2f}); its maps may not match the scores.")
        chosen.append((ref, site, lb))
        signs[ref.index] = sign
    if not chosen:
        return res

    items = [(i, p) for i, p in paths.items()]
    dataset = ImageDataset([p for _, p in items], transform)
    bar = tqdm(total=len(items), unit="img", desc="qkprobe report: maps", disable=not progress)
    try:
        for start in range(0, len(items), max(1, batch_size)):
            batch = items[start:start + batch_size]
            xs, ids = [], []
            for j, (sid, _) in enumerate(batch):
                x, _, ok, why = dataset[start + j]
                if ok:
                    xs.append(x)
                    ids.append(sid)
                else:
                    res.failed[sid] = why
            bar.update(len(batch))
            if not xs:
                continue
            x = torch.stack(xs).to(device)
            seen: Dict[int, List[tuple]] = {}

            def on_qk(i, q, k, info, seen=seen):
                seen.setdefault(i, []).append((q, k, info))

            with capture_qk([c[1] for c in chosen], on_qk), torch.no_grad():
                model(x)
            H_img, W_img = int(x.shape[-2]), int(x.shape[-1])
            for j, sid in enumerate(ids):
                res.images[sid] = display_image(xs[j], transform)
            for ci, (ref, _site, lb) in enumerate(chosen):
                if ref.index in res.bad_layers:
                    continue
                calls = seen.get(ci)
                if not calls:
                    res.bad_layers[ref.index] = f"{ref.name} was not called in the forward pass"
                    continue
                q, k, info = calls[0]
                a, b = coordinates_from_qk(q, k, lb, dtype=torch.float32)
                if a.shape[0] != len(ids) or a.shape[2] != b.shape[2]:
                    res.bad_layers[ref.index] = (f"{ref.name} attends within windows or across other tokens than "
                                                 f"its queries, which the maps do not show")
                    continue
                grid = grid_shape(int(a.shape[2]) - ref.prefix_tokens, H_img, W_img)
                if grid is None:
                    res.bad_layers[ref.index] = f"the tokens of {ref.name} form no patch grid"
                    continue
                res.grids[ref.index] = grid
                sign = torch.as_tensor(signs[ref.index], dtype=a.dtype).view(1, a.shape[1], 1, -1)
                a = (a * sign).cpu().numpy()
                b = (b * sign).cpu().numpy()
                res.scales[ref.index] = float(lb.scale)
                for j, sid in enumerate(ids):
                    res.coords[(ref.index, sid)] = (a[j], b[j])
                _keep_probs(res, ref.index, (keep_probs or {}).get(ref.index, ()), ids, q, k, info, lb.scale)
    finally:
        bar.close()
    for idx, why in res.bad_layers.items():
        res.notes.append(f"No maps for layer {idx}: {why}.")
    return res
