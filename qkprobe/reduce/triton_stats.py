"""Mode statistics of one layer in Triton kernels, straight from the module's q and k.

:func:`mode_statistics_qk` returns what :func:`qkprobe.core.stats.mode_statistics` returns for
``a = q @ coord_q``, ``b = k @ coord_k`` (per head), in the column layout of
:data:`qkprobe.core.stats.STAT_NAMES`, without forming a or b in memory:

- the map kernel (one program per sample, head and block of modes) reads the q and k tokens once
  (bf16 / fp16 / fp32, accumulated in fp32), applies the head's coordinate maps in the kernel and
  keeps, per mode, sum, max, min and two register-resident running top-k lists (k largest and k
  smallest, ≤ 64), merged block by block by k extractions (no sort); prefix tokens are skipped;
  a NaN coordinate voids the five statistics of its side, as the torch path does;
- the share kernel (one program per sample, head and block of query tokens) forms P·b by a
  flash-style online softmax over key blocks (P = softmax(scale · q kᵀ + bias), never stored;
  or from the module's own probabilities when given) and writes per-block partial sums of
  Σ_i a_ir ((P b)_ir − mean_j b_jr); the (B, H, R) finish (scale · S / N, share) is torch.

The torch path stays the reference and the fallback; tests compare both, on CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1``, set before this module is imported).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.stats import STAT_INDEX, STAT_NAMES, compute_dtype
from ..errors import ShapeError, UsageError

try:  # optional: the probe falls back to the torch path without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

Tensor = torch.Tensor
KMAX = 64  # longest running top-k list kept in registers
_MAP_COLUMNS = STAT_INDEX["attn_contrib"]  # 12: the map statistics and scores come first


def available() -> bool:
    """Whether Triton imports (kernels still need a CUDA device or ``TRITON_INTERPRET=1``)."""
    return triton is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors): ``TRITON_INTERPRET=1`` was
    set before triton was first imported (its library functions are made interpreted at import)."""
    if triton is None:
        return False
    from triton import knobs
    from triton.runtime.interpreter import InterpretedFunction
    return bool(knobs.runtime.interpret) and isinstance(tl.standard.zeros, InterpretedFunction)


def supports(device: torch.device) -> bool:
    """Whether these kernels can run on tensors of ``device``."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


if triton is not None:
    @triton.jit
    def _side_stats(x_ptr, sxb, sxh, sxn, sxd, c_ptr, sch, scd, scr, bi, h, r0, N, D, R, P, K,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, KP: tl.constexpr,
                    PREC: tl.constexpr):
        """(mean, max, min, top_pos, top_neg), each (BLOCK_R,), of x[bi, h, P:] @ c[h] (modes r0 + ·)."""
        offs_r = r0 + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        rmask = offs_r < R
        dmask = offs_d < D
        cmap = tl.load(c_ptr + h * sch + offs_d[:, None] * scd + offs_r[None, :] * scr,
                       mask=dmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)  # (BD, BR)
        slot = tl.arange(0, KP)[:, None]  # (KP, 1)
        live = slot < K
        # running top-k lists: live slots start at ∓inf, padding slots at ±inf (never replaced)
        top = tl.where(live, float("-inf"), float("inf")) + tl.zeros((KP, BLOCK_R), tl.float32)
        bot = tl.where(live, float("inf"), float("-inf")) + tl.zeros((KP, BLOCK_R), tl.float32)
        total = tl.zeros((BLOCK_R,), tl.float32)
        hi = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        lo = tl.full((BLOCK_R,), float("inf"), tl.float32)
        nan = tl.zeros((BLOCK_R,), tl.int32)
        rows = tl.arange(0, BLOCK_N)
        base = x_ptr + bi * sxb + h * sxh
        for n0 in range(P, N, BLOCK_N):
            offs_n = n0 + rows
            nmask = offs_n < N
            x = tl.load(base + offs_n[:, None] * sxn + offs_d[None, :] * sxd,
                        mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BN, BD)
            a = tl.dot(x, cmap, input_precision=PREC)  # (BN, BR): the mode coordinates of this block
            valid = nmask[:, None]
            total += tl.sum(tl.where(valid, a, 0.0), axis=0)
            big = tl.where(valid, a, float("-inf"))
            small = tl.where(valid, a, float("inf"))
            hi = tl.maximum(hi, tl.max(big, axis=0))
            lo = tl.minimum(lo, tl.min(small, axis=0))
            nan = tl.maximum(nan, tl.max(tl.where(valid & (a != a), 1, 0), axis=0))
            # merge the block into each list by extractions, as many as the block has entries
            # beating the list's weakest in some mode (at most k; after the first blocks, few)
            weakest = tl.min(top, axis=0)
            need = tl.minimum(tl.max(tl.sum((big > weakest[None, :]).to(tl.int32), axis=0), axis=0), K)
            for _t in range(need):
                m = tl.max(big, axis=0)
                im = tl.argmax(big, axis=0)
                big = tl.where(rows[:, None] == im[None, :], float("-inf"), big)
                weakest = tl.min(top, axis=0)
                iw = tl.argmin(top, axis=0)
                top = tl.where((slot == iw[None, :]) & (m > weakest)[None, :], m[None, :], top)
            strongest = tl.max(bot, axis=0)
            need = tl.minimum(tl.max(tl.sum((small < strongest[None, :]).to(tl.int32), axis=0), axis=0), K)
            for _t in range(need):
                s = tl.min(small, axis=0)
                js = tl.argmin(small, axis=0)
                small = tl.where(rows[:, None] == js[None, :], float("inf"), small)
                strongest = tl.max(bot, axis=0)
                jw = tl.argmax(bot, axis=0)
                bot = tl.where((slot == jw[None, :]) & (s < strongest)[None, :], s[None, :], bot)
        mean = total / (N - P)
        top_pos = tl.sum(tl.where(live, top, 0.0), axis=0) / K
        top_neg = tl.sum(tl.where(live, bot, 0.0), axis=0) / K
        void = nan > 0
        qnan = float("nan")
        return (tl.where(void, qnan, mean), tl.where(void, qnan, hi), tl.where(void, qnan, lo),
                tl.where(void, qnan, top_pos), tl.where(void, qnan, top_neg))

    @triton.jit
    def _map_kernel(q_ptr, sqb, sqh, sqn, sqd, k_ptr, skb, skh, skn, skd,
                    cq_ptr, scqh, scqd, scqr, ck_ptr, sckh, sckd, sckr,
                    out_ptr, sob, soh, sor, sos,
                    H, N, NK, D, R, P, KQ, KK,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, KP: tl.constexpr,
                    PREC: tl.constexpr):
        pid = tl.program_id(0)
        bi = pid // H
        h = pid % H
        r0 = tl.program_id(1) * BLOCK_R
        q_mean, q_max, q_min, q_pos, q_neg = _side_stats(
            q_ptr, sqb, sqh, sqn, sqd, cq_ptr, scqh, scqd, scqr, bi, h, r0, N, D, R, P, KQ,
            BLOCK_N, BLOCK_D, BLOCK_R, KP, PREC)
        k_mean, k_max, k_min, k_pos, k_neg = _side_stats(
            k_ptr, skb, skh, skn, skd, ck_ptr, sckh, sckd, sckr, bi, h, r0, NK, D, R, P, KK,
            BLOCK_N, BLOCK_D, BLOCK_R, KP, PREC)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        o = out_ptr + bi * sob + h * soh + offs_r * sor
        tl.store(o + 0 * sos, q_mean, mask=rmask)
        tl.store(o + 1 * sos, q_max, mask=rmask)
        tl.store(o + 2 * sos, q_min, mask=rmask)
        tl.store(o + 3 * sos, q_pos, mask=rmask)
        tl.store(o + 4 * sos, q_neg, mask=rmask)
        tl.store(o + 5 * sos, k_mean, mask=rmask)
        tl.store(o + 6 * sos, k_max, mask=rmask)
        tl.store(o + 7 * sos, k_min, mask=rmask)
        tl.store(o + 8 * sos, k_pos, mask=rmask)
        tl.store(o + 9 * sos, k_neg, mask=rmask)
        tl.store(o + 10 * sos, q_max * k_max, mask=rmask)
        tl.store(o + 11 * sos, q_min * k_min, mask=rmask)

    @triton.jit
    def _share_kernel(q_ptr, sqb, sqh, sqn, sqd, k_ptr, skb, skh, skn, skd,
                      cq_ptr, scqh, scqd, scqr, ck_ptr, sckh, sckd, sckr,
                      p_ptr, spb, sph, spn, spm, part_ptr,
                      H, N, NK, D, R, scale,
                      HAS_PROBS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr):
        """part[bi, h, m, r] = Σ_{i in query block m} a_ir ((P b)_ir − mean_j b_jr).

        ``p_ptr``: the probabilities P (HAS_PROBS) or an additive logit bias (HAS_BIAS), any strides."""
        pid = tl.program_id(0)
        bi = pid // H
        h = pid % H
        mb = tl.program_id(1)
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_r = tl.arange(0, BLOCK_R)
        mmask = offs_m < N
        dmask = offs_d < D
        rmask = offs_r < R
        cq = tl.load(cq_ptr + h * scqh + offs_d[:, None] * scqd + offs_r[None, :] * scqr,
                     mask=dmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
        ck = tl.load(ck_ptr + h * sckh + offs_d[:, None] * sckd + offs_r[None, :] * sckr,
                     mask=dmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
        q = tl.load(q_ptr + bi * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BM, BD)
        a = tl.dot(q, cq, input_precision=PREC)  # (BM, BR)
        acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        bsum = tl.zeros((BLOCK_R,), tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        cols = tl.arange(0, BLOCK_N)
        for n0 in range(0, NK, BLOCK_N):
            offs_n = n0 + cols
            nmask = offs_n < NK
            kb = tl.load(k_ptr + bi * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                         mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BN, BD)
            bb = tl.dot(kb, ck, input_precision=PREC)  # (BN, BR): key coordinates
            bsum += tl.sum(tl.where(nmask[:, None], bb, 0.0), axis=0)
            pm = mmask[:, None] & nmask[None, :]
            pp = p_ptr + bi * spb + h * sph + offs_m[:, None] * spn + offs_n[None, :] * spm
            if HAS_PROBS:
                p = tl.load(pp, mask=pm, other=0.0).to(tl.float32)
                acc += tl.dot(p, bb, input_precision=PREC)
            else:
                s = tl.dot(q, tl.trans(kb), input_precision=PREC) * scale  # (BM, BN) logits
                if HAS_BIAS:
                    s += tl.load(pp, mask=pm, other=0.0).to(tl.float32)
                s = tl.where(nmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p, bb, input_precision=PREC)
                m_i = m_new
        if not HAS_PROBS:
            acc = acc / l_i[:, None]
        mean_b = bsum / NK
        lift = tl.where(mmask[:, None], a * (acc - mean_b[None, :]), 0.0)
        n_mb = tl.num_programs(1)
        tl.store(part_ptr + (pid * n_mb + mb) * R + offs_r, tl.sum(lift, axis=0), mask=rmask)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def _check(q: Tensor, k: Tensor, coord_q: Tensor, coord_k: Tensor, S: Tensor):
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"reduce/triton: q and k must be (B, H, N, D) and (B, H, Nk, D), got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}.")
    H, D = q.shape[1], q.shape[-1]
    if coord_q.shape[:2] != (H, D) or coord_k.shape != coord_q.shape:
        raise ShapeError(f"reduce/triton: coord_q and coord_k must be (H, D, R) with (H, D) = ({H}, {D}), got "
                         f"{tuple(coord_q.shape)} and {tuple(coord_k.shape)}.")
    R = coord_q.shape[-1]
    if tuple(S.shape) != (H, R):
        raise ShapeError(f"reduce/triton: S must be (H, R) = ({H}, {R}), got {tuple(S.shape)}.")
    return q.shape[0], H, q.shape[2], k.shape[2], D, R


def mode_statistics_qk(
    q: Tensor,
    k: Tensor,
    coord_q: Tensor,
    coord_k: Tensor,
    S: Tensor,
    scale: float,
    *,
    prefix_tokens: int = 0,
    include_prefix: bool = False,
    topk: int = 5,
    probs: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    attention: bool = True,
    out: Optional[Tensor] = None,
    precision: str = "ieee",
) -> Tensor:
    """:func:`qkprobe.core.stats.mode_statistics` of a = q @ coord_q, b = k @ coord_k, in Triton.

    Args:
        q: (B, H, N, D), k: (B, H, Nk, D) the module's queries and keys (any strides; bf16, fp16,
            fp32), the same tensors the logits scale · q kᵀ (+ attn_bias) are made of.
        coord_q, coord_k: (H, D, R) the per-head coordinate maps; S: (H, R) singular values.
        probs: (B, H, N, Nk) the module's attention probabilities, if known (then attn_bias is
            ignored); attn_bias: float (broadcastable to (B, H, N, Nk)) or boolean (True = may attend).
        precision: ``tl.dot`` input precision, "ieee" (exact fp32, as the torch path) or "tf32".
        Other arguments and the result: as :func:`~qkprobe.core.stats.mode_statistics` (float32 out,
        (B, H, R, len(STAT_NAMES))).
    """
    if triton is None:
        raise ImportError("triton is not installed")
    B, H, N, NK, D, R = _check(q, k, coord_q, coord_k, S)
    if compute_dtype(q, k) == torch.float64:
        raise ShapeError("reduce/triton: float64 q/k are not supported by the Triton kernels; use the torch "
                         "backend for float64.")
    if topk < 1:
        raise UsageError(f"topk must be at least 1 (tokens in a top-k mean), got {topk}.")
    p = 0 if include_prefix else int(prefix_tokens)
    if p < 0 or p >= N or p >= NK:
        raise ShapeError(f"prefix_tokens={prefix_tokens} leaves no map tokens out of N={N}, "
                         f"Nk={NK}; lower it or pass include_prefix=True.")
    kq, kk = min(topk, N - p), min(topk, NK - p)
    if max(kq, kk) > KMAX:
        raise ShapeError(f"reduce/triton: topk={topk} is more than the {KMAX} the Triton kernel keeps; use the "
                         f"torch backend or a smaller topk.")
    shape = (B, H, R, len(STAT_NAMES))
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=q.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != q.device:
        raise ShapeError(f"out must be a float32 tensor of shape {shape} on {q.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}.")
    cq = coord_q.detach().to(q.device, torch.float32)
    ck = coord_k.detach().to(q.device, torch.float32)
    BLOCK_D, BLOCK_R = _pow2(D), _pow2(R)
    BLOCK_N = 64 if BLOCK_R <= 64 else 32  # registers: (BN, BR) block and two (KP, BR) lists
    KP = _pow2(max(kq, kk), 2)
    _map_kernel[(B * H, triton.cdiv(R, BLOCK_R))](
        q, *q.stride(), k, *k.stride(), cq, *cq.stride(), ck, *ck.stride(), out, *out.stride(),
        H, N, NK, D, R, p, kq, kk,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, KP=KP, PREC=precision)
    if not attention:
        out[..., _MAP_COLUMNS:] = float("nan")
        return out
    BLOCK_M = 64 if BLOCK_R <= 64 else 32
    n_mb = triton.cdiv(N, BLOCK_M)
    part = torch.empty((B, H, n_mb, R), dtype=torch.float32, device=q.device)
    aux, has_probs, has_bias = q, False, False
    if probs is not None:
        if probs.shape[-2:] != (N, NK):
            raise ShapeError(f"probs must be (B, H, {N}, {NK}), got {tuple(probs.shape)}; pass the attention "
                             f"of the same tokens.")
        aux, has_probs = probs.expand(B, H, N, NK), True
    elif attn_bias is not None:
        bias = attn_bias
        if bias.dtype == torch.bool:  # True = may attend
            bias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device).masked_fill_(~bias, float("-inf"))
        aux, has_bias = bias.to(q.device).expand(B, H, N, NK), True
    strides = aux.stride() if (has_probs or has_bias) else (0, 0, 0, 0)
    _share_kernel[(B * H, n_mb)](
        q, *q.stride(), k, *k.stride(), cq, *cq.stride(), ck, *ck.stride(), aux, *strides, part,
        H, N, NK, D, R, float(scale),
        HAS_PROBS=has_probs, HAS_BIAS=has_bias, BLOCK_M=BLOCK_M, BLOCK_N=64 if BLOCK_R <= 64 else 32,
        BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, PREC=precision)
    contrib = out[..., STAT_INDEX["attn_contrib"]]
    torch.mul(part.sum(2) / N, S.detach().to(q.device, torch.float32) * float(scale), out=contrib)  # (B, H, R)
    total = contrib.sum(dim=-1, keepdim=True)
    nonzero = total != 0
    out[..., STAT_INDEX["attn_share"]] = torch.where(
        nonzero, contrib / torch.where(nonzero, total, torch.ones_like(total)), torch.zeros_like(contrib))
    return out
