"""Per-sample, per-mode statistics of one attention layer.

Inputs are the mode coordinates of :mod:`qkprobe.core.modes`: for one layer, query-side
coordinates ``a`` (B, H, N, R) and key-side coordinates ``b`` (B, H, Nk, R) with

    Σ_r S[h, r] a_ir b_jr = q_i · k_j,      logits_ij = scale · q_i · k_j (+ attn_bias_ij).

For every sample, head h and mode r, :func:`mode_statistics` returns the statistics named in
:data:`STAT_NAMES` (last axis of the result):

- ``q_mean, q_max, q_min``: mean / max / min of a_r over the map tokens (the first
  ``prefix_tokens`` tokens, cls and registers, are left out unless ``include_prefix``);
- ``q_top_pos, q_top_neg``: mean of the ``topk`` largest / smallest a_r (topk clipped to the
  number of map tokens);
- ``k_*``: the same for b_r. A mode with a NaN coordinate on a side gets NaN for all five
  statistics of that side (±inf values are ranked as numbers);
- ``score_pos = max(a_r) · max(b_r)``, ``score_neg = min(a_r) · min(b_r)``: the paper's score of
  a sample for the mode, for each sign of the (arbitrary) singular-vector pair;
- ``attn_contrib``: with the head's attention probabilities P (B, H, N, Nk) over all tokens
  (prefix included) and the mode's share of the logits ℓ^r_ij = scale · S_r a_ir b_jr,

      attn_contrib_r = mean_i [ Σ_j P_ij ℓ^r_ij − mean_j ℓ^r_ij ]
                     = scale · S_r · mean_i a_ir ((P b)_ir − mean_j b_jr),

  how much mode r lifts the attended keys above the average key. Terms constant over keys drop
  out. Σ_r attn_contrib_r = mean_i (E_P[ℓ_i] − mean_j ℓ_ij) ≥ 0 when P = softmax(ℓ + c_i);
- ``attn_share = attn_contrib_r / Σ_r' attn_contrib_r'`` (0 where the sum is 0). Single modes can
  contribute negatively, so shares may lie outside [0, 1]; they sum to 1.

A ``token_mask`` (B, N) (True = real token; self-attention only, N = Nk) leaves padded positions
out everywhere: the map statistics run over the real map tokens of each sample (top-k clipped per
sample to their number; NaN for a sample with none), the attention statistics average over its
real queries, take the key mean over its real keys and give padded keys zero probability. A
sample's statistics are then those of the sample recorded alone.

Everything is vectorized over samples, heads and modes; no N × N tensor per mode is formed.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import ShapeError, UsageError
from . import native

Tensor = torch.Tensor

STAT_NAMES = (
    "q_mean", "q_max", "q_min", "q_top_pos", "q_top_neg",
    "k_mean", "k_max", "k_min", "k_top_pos", "k_top_neg",
    "score_pos", "score_neg", "attn_contrib", "attn_share",
)
STAT_INDEX = {name: i for i, name in enumerate(STAT_NAMES)}
#: The statistics of the attention share: each costs one more attention pass per layer (P b),
#: about as much as the model's own attention (≈ 10 % of a ViT-S/16 forward on CPU).
ATTENTION_STATS = ("attn_contrib", "attn_share")
#: What a probe records unless told otherwise: the paper's map statistics and scores. The
#: attention share is one option away (``stats="all"``, ``qkprobe run --stats all``).
DEFAULT_STATS = tuple(n for n in STAT_NAMES if n not in ATTENTION_STATS)
_MAP_COLUMNS = STAT_INDEX["attn_contrib"]  # the map statistics and scores come first


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (bf16/fp16/float32 are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def _chunk_size(n: int, k: int) -> int:
    """A chunk length c with n % c == 0 and at least k chunks (0: none, use plain topk)."""
    for c in (7, 8, 6, 9, 5, 10, 4, 12, 3, 14, 16):
        if n % c == 0 and n // c >= k and c > 1:
            return c
    return 0


def _top_sum(x: Tensor, k: int, largest: bool = True) -> Tensor:
    """Sum of the k largest (or smallest) entries over the token axis of x (..., N, R), exact.

    The k extremes lie in the k chunks of consecutive tokens with the most extreme chunk maxima
    (an entry outside them is beaten by k chunk maxima, each a distinct entry), so: chunk
    extremes (one fast pass vectorized over the R modes), the k best of the N/c chunks, then
    the k best of their k·c entries: selections over N/c and k·c entries instead of N.
    """
    n = x.shape[-2]
    c = _chunk_size(n, k)
    if c == 0 or k * c >= n:
        return torch.topk(x, k, dim=-2, largest=largest, sorted=False).values.sum(-2)
    chunks = x.unflatten(-2, (n // c, c))  # (..., m, c, R): a view
    extreme = chunks.amax(dim=-2) if largest else chunks.amin(dim=-2)  # (..., m, R)
    best = torch.topk(extreme, k, dim=-2, largest=largest, sorted=False).indices  # (..., k, R) chunks
    index = best.unsqueeze(-2).expand(*best.shape[:-1], c, best.shape[-1])  # (..., k, c, R)
    picked = torch.gather(chunks, -3, index).flatten(-3, -2)  # (..., k·c, R)
    return torch.topk(picked, k, dim=-2, largest=largest, sorted=False).values.sum(-2)


def _topk_means(x: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Means of the ``k`` largest and of the ``k`` smallest entries over the token axis.

    x: (..., N, R); 1 ≤ k ≤ N. Returns two (..., R) tensors.
    One place to swap in a faster (fused / selection) kernel later.
    """
    return _top_sum(x, k, True) / k, _top_sum(x, k, False) / k


def _map_stats(x: Tensor, topk: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(mean, max, min, top_pos, top_neg) over the tokens of x (B, H, N, R), each (B, H, R).

    Reductions over dim -2 run vectorized across the contiguous R axis."""
    top_pos, top_neg = _topk_means(x, min(topk, x.shape[-2]))
    stats = (x.mean(dim=-2), x.amax(dim=-2), x.amin(dim=-2), top_pos, top_neg)
    nan = torch.isnan(x).any(dim=-2)  # as the compiled kernel: a NaN token voids all five
    return tuple(torch.where(nan, torch.full_like(t, float("nan")), t) for t in stats)


def _masked_map_stats(x: Tensor, valid: Tensor, topk: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As :func:`_map_stats` over the tokens where ``valid`` (B, N) holds, per sample: top-k
    clipped to the sample's count of valid tokens; NaN for a sample with none."""
    keep = valid[:, None, :, None]  # (B, 1, N, 1)
    count = valid.sum(-1).to(x.dtype)[:, None, None]  # (B, 1, 1)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    k = min(topk, x.shape[-2])
    kb = count.clamp(max=k)  # (B, 1, 1): top-k of each sample
    rank = torch.arange(k, device=x.device, dtype=x.dtype).view(1, 1, k, 1)
    take = rank < kb.unsqueeze(-1)  # (B, 1, k, 1): the first kb of the sorted extremes
    zero = torch.zeros((), dtype=x.dtype, device=x.device)

    def top(filled: Tensor, largest: bool) -> Tensor:
        vals = torch.topk(filled, k, dim=-2, largest=largest, sorted=True).values  # (B, H, k, R)
        return torch.where(take, vals, zero).sum(-2) / kb

    stats = (torch.where(keep, x, zero).sum(-2) / count, torch.where(keep, x, -inf).amax(-2),
             torch.where(keep, x, inf).amin(-2), top(torch.where(keep, x, -inf), True),
             top(torch.where(keep, x, inf), False))
    void = (torch.isnan(x) & keep).any(dim=-2) | (count == 0)  # (B, H, R)
    return tuple(torch.where(void, torch.full_like(t, float("nan")), t) for t in stats)


def _key_mask(attn_bias: Optional[Tensor], token_mask: Tensor, dt: torch.dtype) -> Tensor:
    """``attn_bias`` with the padded keys of ``token_mask`` (B, Nk) masked out (an SDPA mask)."""
    keys = token_mask[:, None, None, :]  # (B, 1, 1, Nk)
    if attn_bias is None:
        return keys
    if attn_bias.dtype == torch.bool:
        return attn_bias & keys
    return attn_bias.to(dt).masked_fill(~keys, float("-inf"))


def _zero_padding(x: Optional[Tensor], keep: Tensor) -> Optional[Tensor]:
    """x (B, H, N, ·) with the tokens where ``keep`` (B, 1, N, 1) is False set to 0."""
    return None if x is None else torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _attended_keys(a: Tensor, b: Tensor, S: Tensor, scale: float, probs: Optional[Tensor],
                   q: Optional[Tensor], k: Optional[Tensor], attn_bias: Optional[Tensor],
                   token_mask: Optional[Tensor] = None) -> Tensor:
    """P b: (B, H, N, R), the attention-weighted key coordinates of every query token.

    With ``probs`` given, a plain matmul. Otherwise P = softmax(scale · q kᵀ + attn_bias), from
    q, k or from the reconstruction q kᵀ = (a · S) bᵀ, and P b is one attention call with b as
    the values (fused kernels where available; P is never stored).
    """
    dt = a.dtype
    if token_mask is not None:  # padded keys zeroed: a NaN there must not reach real queries (rows of
        keep = token_mask[:, None, :, None]  # (B, 1, N, 1)   padded queries are dropped later)
        b, k = _zero_padding(b, keep), _zero_padding(k, keep)
    if probs is not None:
        if probs.shape[-2:] != (a.shape[-2], b.shape[-2]):
            raise ShapeError(f"probs must be (B, H, {a.shape[-2]}, {b.shape[-2]}), "
                             f"got {tuple(probs.shape)}; pass the attention of the same tokens.")
        if token_mask is not None:
            probs = probs.to(dt).masked_fill(~token_mask[:, None, None, :], 0.0)  # padded keys: zero
        return probs.to(dt) @ b
    if (q is None) != (k is None):
        raise ShapeError("q and k must be given together (or neither, to use the reconstruction).")
    if q is None:
        qq, kk = a * S.to(dt).unsqueeze(-2), b  # (a S) bᵀ = q kᵀ
    else:
        qq, kk = q.to(dt), k.to(dt)
        if qq.shape[:2] != a.shape[:2] or qq.shape[-2] != a.shape[-2] or kk.shape[-2] != b.shape[-2] \
                or qq.shape[-1] != kk.shape[-1]:
            raise ShapeError(f"q {tuple(qq.shape)} and k {tuple(kk.shape)} must be (B, H, N, R) and "
                             f"(B, H, Nk, R) for the same tokens as a {tuple(a.shape)}, b {tuple(b.shape)}.")
    mask = attn_bias if token_mask is None else _key_mask(attn_bias, token_mask, dt)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dt)
    # SDPA keeps its fused kernel only with a stride-1 last axis (else it falls back to the math
    # path, which materializes P: 3x slower on CPU); other strides (views of a fused qkv) are fine
    def unit_stride(x):
        return x if x.stride(-1) == 1 else x.contiguous()

    return F.scaled_dot_product_attention(unit_stride(qq), unit_stride(kk), unit_stride(b), attn_mask=mask,
                                          scale=float(scale))


def mode_statistics(
    a: Tensor,
    b: Tensor,
    S: Tensor,
    scale: Union[float, Tensor],
    *,
    prefix_tokens: int = 0,
    include_prefix: bool = False,
    topk: int = 5,
    probs: Optional[Tensor] = None,
    q: Optional[Tensor] = None,
    k: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    attention: bool = True,
    out: Optional[Tensor] = None,
    token_mask: Optional[Tensor] = None,
) -> Tensor:
    """Statistics of every mode of every head for every sample (see the module docstring).

    ``attention=False`` skips the attention-share statistics (their columns are NaN): they cost
    one attention computation per layer, the largest single cost of the probe on CPU.

    Args:
        a: (B, H, N, R) query-side mode coordinates of all tokens (prefix included).
        b: (B, H, Nk, R) key-side mode coordinates.
        S: (H, R) singular values.
        scale: the logit scale (usually head_dim ** -0.5).
        prefix_tokens: leading tokens (cls, registers) left out of the map statistics (q_*, k_*,
            score_*); applied to both sides. The attention statistics use all (real) tokens.
        include_prefix: keep the prefix tokens in the map statistics too.
        topk: how many extreme tokens q_top_pos / q_top_neg (and k_*) average; clipped to the
            number of map tokens.
        probs: (B, H, N, Nk) the head's attention probabilities, if known (the exact route when
            the logits are not scale · q·k: qk-norm, rotary embeddings, ...).
        q, k: (B, H, N, R'), (B, H, Nk, R') to recompute P = softmax(scale · q kᵀ + attn_bias)
            when ``probs`` is None. With neither, q kᵀ is rebuilt as Σ_r S_r a_r b_rᵀ.
        attn_bias: added to the logits (float, broadcastable to (B, H, N, Nk)) or a boolean mask
            (True = may attend), as in ``scaled_dot_product_attention``. Ignored with ``probs``.
        out: (B, H, R, len(STAT_NAMES)) tensor of the compute dtype to write the result into
            (any strides; a probe passes its slot of a buffer shared by its layers).
        token_mask: (B, N) bool, True = real token (self-attention: N = Nk); padded positions
            are left out of every statistic (see the module docstring). None: all tokens real.

    Returns:
        (B, H, R, len(STAT_NAMES)) in the compute dtype: float32 (bf16/fp16/float32 inputs are
        upcast), float64 when ``a`` or ``b`` is float64.
    """
    if a.dim() != 4 or b.dim() != 4 or a.shape[:2] != b.shape[:2] or a.shape[-1] != b.shape[-1]:
        raise ShapeError(f"a and b must be (B, H, N, R) and (B, H, Nk, R), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}.")
    B, H, N, R = a.shape
    if tuple(S.shape) != (H, R):
        raise ShapeError(f"S must be (H, R) = ({H}, {R}), got {tuple(S.shape)}.")
    if topk < 1:
        raise UsageError(f"topk must be at least 1 (tokens in a top-k mean), got {topk}.")
    p = 0 if include_prefix else int(prefix_tokens)
    if p < 0 or p >= N or p >= b.shape[-2]:
        raise ShapeError(f"prefix_tokens={prefix_tokens} leaves no map tokens out of N={N}, "
                         f"Nk={b.shape[-2]}; lower it or pass include_prefix=True.")

    valid = _token_mask(token_mask, a, b)
    dt = compute_dtype(a, b)
    a = a.detach().to(dt)
    b = b.detach().to(dt)
    S = S.detach().to(device=a.device, dtype=dt)

    if out is None:
        out = torch.empty(B, H, R, len(STAT_NAMES), dtype=dt, device=a.device)
    elif tuple(out.shape) != (B, H, R, len(STAT_NAMES)) or out.dtype != dt or out.device != a.device:
        raise ShapeError(f"out must be a {dt} tensor of shape {(B, H, R, len(STAT_NAMES))} on {a.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}.")
    kq, kk = min(topk, N - p), min(topk, b.shape[-2] - p)
    if not (kq == kk and native.map_stats(a, b, p, kq, out, mask=valid)):  # one fused pass on CPU
        if valid is None:
            q_stats = _map_stats(a[:, :, p:, :], topk)  # token reductions, vectorized over R
            k_stats = _map_stats(b[:, :, p:, :], topk)
        else:
            q_stats = _masked_map_stats(a[:, :, p:, :], valid[:, p:], topk)
            k_stats = _masked_map_stats(b[:, :, p:, :], valid[:, p:], topk)
        scores = (q_stats[1] * k_stats[1], q_stats[2] * k_stats[2])
        out[..., :_MAP_COLUMNS] = torch.stack((*q_stats, *k_stats, *scores), -1)

    if not attention:
        out[..., _MAP_COLUMNS:] = float("nan")
        return out
    pb = _attended_keys(a, b, S, scale, probs, q, k, attn_bias, valid)  # (B, H, N, R)
    if native.share_stats(a, pb, b, S, float(scale), out, STAT_INDEX["attn_contrib"], mask=valid):
        return out
    contrib = out[..., STAT_INDEX["attn_contrib"]]
    if valid is None:
        lift = a * (pb - b.mean(dim=-2, keepdim=True))  # a_ir ((P b)_ir − mean_j b_jr)
        torch.mul(lift.mean(dim=-2), S * float(scale), out=contrib)  # (B, H, R)
    else:  # sums over the real queries and keys of each sample
        keep = valid[:, None, :, None]  # (B, 1, N, 1)
        count = valid.sum(-1).to(dt)[:, None, None, None]  # (B, 1, 1, 1)
        zero = torch.zeros((), dtype=dt, device=a.device)
        b_mean = torch.where(keep, b, zero).sum(dim=-2, keepdim=True) / count  # (B, H, 1, R)
        lift = torch.where(keep, a * (pb - b_mean), zero)
        torch.mul(lift.sum(dim=-2) / count[..., 0], S * float(scale), out=contrib)  # (B, H, R)
    total = contrib.sum(dim=-1, keepdim=True)
    nonzero = total != 0
    out[..., STAT_INDEX["attn_share"]] = torch.where(
        nonzero, contrib / torch.where(nonzero, total, torch.ones_like(total)), torch.zeros_like(contrib))
    return out


def _token_mask(token_mask: Optional[Tensor], a: Tensor, b: Tensor) -> Optional[Tensor]:
    """``token_mask`` checked against a (B, H, N, R), b (B, H, Nk, R): (B, N) bool on a's device."""
    if token_mask is None:
        return None
    B, N = a.shape[0], a.shape[-2]
    if tuple(token_mask.shape) != (B, N) or b.shape[-2] != N:
        raise ShapeError(f"token_mask must be (B, N) = ({B}, {N}) for self-attention (N = Nk = {b.shape[-2]}), "
                         f"got {tuple(token_mask.shape)}; pass the attention mask of the recorded tokens.")
    return token_mask.to(device=a.device, dtype=torch.bool)


def count_nonfinite(a: Tensor, b: Optional[Tensor] = None) -> int:
    """Number of NaN / ±Inf entries in ``a`` and ``b`` together (one device sync)."""
    n = (~torch.isfinite(a)).sum()
    if b is not None:
        n = n + (~torch.isfinite(b)).sum().to(n.device)
    return int(n)
