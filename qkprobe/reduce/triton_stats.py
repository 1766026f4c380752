"""Mode statistics of one layer in Triton kernels, straight from the module's q and k.

:func:`mode_statistics_qk` returns what :func:`qkprobe.core.stats.mode_statistics` returns for
``a = q @ coord_q``, ``b = k @ coord_k`` (per head), in the column layout of
:data:`qkprobe.core.stats.STAT_NAMES`:

- the map kernel (one program per sample, head and block of 16 modes) reads the q and k tokens
  in their dtype and projects them on tensor cores with fp32 accumulate (bf16 / fp16: the fp32
  map split into parts of the input dtype, summed, ≈ fp32 exact; fp32: tf32x3), keeping, per
  mode, sum, max, min and two register-resident running top-k lists (k largest and k smallest,
  ≤ 64), merged block by block by k extractions (no sort); prefix and masked tokens are skipped;
  a NaN coordinate voids the five statistics of its side, as the torch path does. With the share
  on it also writes a and b (fp32) for the share kernel;
- the share kernel (one program per sample, head and block of query tokens) forms P·b from those
  a, b by a flash-style online softmax over key blocks (P = softmax(scale · q kᵀ + bias), never
  stored; or from the module's own probabilities when given) and writes per-block partial sums of
  Σ_i a_ir ((P b)_ir − mean_j b_jr); the (B, H, R) finish (scale · S / N, share) is torch.

:func:`plan` makes the launches (block sizes from :func:`block_config`), which is also what
:mod:`qkprobe.reduce.triton_aot` compiles for real targets in the tests. The torch path stays the
reference and the fallback; tests compare both, on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before this module is imported).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

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
    def _hdot(x, y, UPCAST: tl.constexpr):
        """x @ y of half operands, fp32 accumulate (tensor cores). UPCAST: the same products in fp32,
        for Triton's interpreter, which multiplies bf16 bit patterns as integers."""
        if UPCAST:
            return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="ieee")
        return tl.dot(x, y, out_dtype=tl.float32)

    @triton.jit
    def _project(x_rows, inb, sxd, c_cols, scd, rmask, split_stride, D, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DC: tl.constexpr, SPLIT: tl.constexpr,
                 INV: tl.constexpr, HALF: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """x @ map, fp32 (BN, BR), x's rows at ``x_rows`` (BN, 1) (``inb``: those in bounds), the map's
        columns at ``c_cols`` (1, BR), read DC dims at a time (small dot operands: no spills). Half x:
        the map is SPLIT parts of x's dtype, part s scaled by INV^-s (tensor-core dots, fp32
        accumulate, summed by Horner); fp32 x: one dot at input precision PREC."""
        acc = tl.zeros((BLOCK_N, BLOCK_R), tl.float32)
        offs = tl.arange(0, DC)
        for d0 in range(0, D, DC):
            dmask = (d0 + offs) < D
            x = tl.load(x_rows + (d0 + offs)[None, :] * sxd, mask=inb[:, None] & dmask[None, :], other=0.0)
            c_ptrs = c_cols + (d0 + offs)[:, None] * scd  # (DC, BR)
            cmask = dmask[:, None] & rmask[None, :]
            if HALF:
                part = _hdot(x, tl.load(c_ptrs + (SPLIT - 1) * split_stride, mask=cmask, other=0.0), UPCAST)
                for i in tl.static_range(1, SPLIT):
                    c = tl.load(c_ptrs + (SPLIT - 1 - i) * split_stride, mask=cmask, other=0.0)
                    part = part * INV + _hdot(x, c, UPCAST)
                acc += part
            else:
                acc += tl.dot(x, tl.load(c_ptrs, mask=cmask, other=0.0), input_precision=PREC)
        return acc

    @triton.jit
    def _side_stats(x_ptr, sxb, sxh, sxn, sxd, c_ptr, scs, sch, scd, scr, m_ptr, smb, smn, y_ptr, syb, syh, syn,
                    bi, h, r0, N, D, R, P, K, count, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_R: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr, SPLIT: tl.constexpr,
                    INV: tl.constexpr, HALF: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                    HAS_MASK: tl.constexpr, STORE: tl.constexpr):
        """(mean, max, min, top_pos, top_neg), each (BLOCK_R,), of x[bi, h, P:] @ c[h] (modes r0 + ·),
        over the ``count`` tokens past P that the mask keeps; K ≤ count entries in the top-k means.
        STORE: the coordinates of all N tokens also go to y (fp32, unit mode stride) for the share."""
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        c_cols = c_ptr + h * sch + offs_r[None, :] * scr  # (1, BR)
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
        start = 0 if STORE else P  # the share needs the prefix tokens' coordinates too
        for n0 in range(start, N, BLOCK_N):
            offs_n = n0 + rows
            inb = offs_n < N
            a = _project(base + offs_n[:, None] * sxn, inb, sxd, c_cols, scd, rmask, scs, D, BLOCK_N, BLOCK_D,
                         BLOCK_R, DC, SPLIT, INV, HALF, PREC, UPCAST)  # (BN, BR): this block's coordinates
            if STORE:
                tl.store(y_ptr + bi * syb + h * syh + offs_n[:, None] * syn + offs_r[None, :], a,
                         mask=inb[:, None] & rmask[None, :])
            nmask = inb & (offs_n >= P)
            if HAS_MASK:
                nmask = nmask & (tl.load(m_ptr + bi * smb + offs_n * smn, mask=inb, other=0) != 0)
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
        mean = total / count
        top_pos = tl.sum(tl.where(live, top, 0.0), axis=0) / K
        top_neg = tl.sum(tl.where(live, bot, 0.0), axis=0) / K
        void = (nan > 0) | (count == 0)
        qnan = float("nan")
        return (tl.where(void, qnan, mean), tl.where(void, qnan, hi), tl.where(void, qnan, lo),
                tl.where(void, qnan, top_pos), tl.where(void, qnan, top_neg))

    @triton.jit
    def _map_kernel(q_ptr, sqb, sqh, sqn, sqd, k_ptr, skb, skh, skn, skd,
                    cq_ptr, scqs, scqh, scqd, scqr, ck_ptr, scks, sckh, sckd, sckr,
                    m_ptr, smb, smn, cnt_ptr, out_ptr, sob, soh, sor, sos,
                    a_ptr, sab, sah, san, b_ptr, sbb, sbh, sbn, H, N, NK, D, R, P, TOPK,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, KP: tl.constexpr,
                    DC: tl.constexpr, SPLIT: tl.constexpr, INV: tl.constexpr, HALF: tl.constexpr, PREC: tl.constexpr,
                    UPCAST: tl.constexpr, HAS_MASK: tl.constexpr, STORE: tl.constexpr):
        """One program per (sample, head, block of modes), the mode blocks of a head adjacent (q and
        k read from HBM once, from L2 by the others); cnt_ptr: (B, 4) int32 map token counts;
        STORE: a = q @ cq and b = k @ ck, (B, H, N, R) fp32, written for the share kernel."""
        pid = tl.program_id(0)
        n_rb = tl.cdiv(R, BLOCK_R)
        bh = pid // n_rb
        bi = bh // H
        h = bh % H
        r0 = (pid % n_rb) * BLOCK_R
        nq = tl.load(cnt_ptr + bi * 4)
        nk = tl.load(cnt_ptr + bi * 4 + 1)
        q_mean, q_max, q_min, q_pos, q_neg = _side_stats(
            q_ptr, sqb, sqh, sqn, sqd, cq_ptr, scqs, scqh, scqd, scqr, m_ptr, smb, smn, a_ptr, sab, sah, san,
            bi, h, r0, N, D, R, P, tl.minimum(TOPK, nq), nq, BLOCK_N, BLOCK_D, BLOCK_R, KP, DC, SPLIT, INV, HALF,
            PREC, UPCAST, HAS_MASK, STORE)
        k_mean, k_max, k_min, k_pos, k_neg = _side_stats(
            k_ptr, skb, skh, skn, skd, ck_ptr, scks, sckh, sckd, sckr, m_ptr, smb, smn, b_ptr, sbb, sbh, sbn,
            bi, h, r0, NK, D, R, P, tl.minimum(TOPK, nk), nk, BLOCK_N, BLOCK_D, BLOCK_R, KP, DC, SPLIT, INV, HALF,
            PREC, UPCAST, HAS_MASK, STORE)
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
                      a_ptr, sab, sah, san, b_ptr, sbb, sbh, sbn,
                      p_ptr, spb, sph, spn, spm, m_ptr, smb, smn, cnt_ptr, part_ptr,
                      H, N, NK, D, R, scale,
                      HAS_PROBS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                      HALF: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """part[bi, h, m, r] = Σ_{valid i in query block m} a_ir ((P b)_ir − mean_{valid j} b_jr).

        a, b: the coordinates the map kernel wrote ((B, H, N, R) fp32, unit mode stride), not
        recomputed; ``p_ptr``: the probabilities P (HAS_PROBS) or an additive logit bias (HAS_BIAS),
        any strides; masked keys get probability 0; P·b and the logits on tensor cores (fp32
        operands at PREC)."""
        pid = tl.program_id(0)
        bi = pid // H
        h = pid % H
        mb = tl.program_id(1)
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_r = tl.arange(0, BLOCK_R)
        mmask = offs_m < N
        if HAS_MASK:
            mmask = mmask & (tl.load(m_ptr + bi * smb + offs_m * smn, mask=mmask, other=0) != 0)
        dmask = offs_d < D
        rmask = offs_r < R
        a = tl.load(a_ptr + bi * sab + h * sah + offs_m[:, None] * san + offs_r[None, :],
                    mask=mmask[:, None] & rmask[None, :], other=0.0)  # (BM, BR)
        if not HAS_PROBS:
            q = tl.load(q_ptr + bi * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                        mask=mmask[:, None] & dmask[None, :], other=0.0)  # (BM, BD) in its own dtype
        acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        bsum = tl.zeros((BLOCK_R,), tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        cols = tl.arange(0, BLOCK_N)
        for n0 in range(0, NK, BLOCK_N):
            offs_n = n0 + cols
            nmask = offs_n < NK
            if HAS_MASK:
                nmask = nmask & (tl.load(m_ptr + bi * smb + offs_n * smn, mask=nmask, other=0) != 0)
            bb = tl.load(b_ptr + bi * sbb + h * sbh + offs_n[:, None] * sbn + offs_r[None, :],
                         mask=nmask[:, None] & rmask[None, :], other=0.0)  # (BN, BR): key coordinates
            bsum += tl.sum(bb, axis=0)
            pm = mmask[:, None] & nmask[None, :]
            pp = p_ptr + bi * spb + h * sph + offs_m[:, None] * spn + offs_n[None, :] * spm
            if HAS_PROBS:
                p = tl.load(pp, mask=pm, other=0.0).to(tl.float32)
                acc += tl.dot(p, bb, input_precision=PREC)
            else:
                kb = tl.load(k_ptr + bi * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                             mask=nmask[:, None] & dmask[None, :], other=0.0)  # (BN, BD)
                if HALF:
                    s = _hdot(q, tl.trans(kb), UPCAST) * scale  # (BM, BN) logits
                else:
                    s = tl.dot(q, tl.trans(kb), input_precision=PREC) * scale
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
        mean_b = bsum / tl.load(cnt_ptr + bi * 4 + 2)
        lift = tl.where(mmask[:, None], a * (acc - mean_b[None, :]), 0.0)
        n_mb = tl.num_programs(1)
        tl.store(part_ptr + (pid * n_mb + mb) * R + offs_r, tl.sum(lift, axis=0), mask=rmask)


#: the kernels by the names :class:`Launch` uses
KERNELS = {"map": _map_kernel, "share": _share_kernel} if triton is not None else {}
#: (bits kept per map part, map parts) for half inputs: bf16 keeps 8 bits a part (3 parts ≈ fp32's
#: 24), fp16 11 (2 parts, the low part scaled up out of fp16's subnormals)
_SPLIT = {torch.bfloat16: (8, 3), torch.float16: (11, 2)}
PRECISIONS = ("ieee", "tf32", "tf32x3")


@dataclass(frozen=True)
class Blocks:
    """Block sizes and launch options of both kernels for one shape (see :func:`block_config`)."""

    map_n: int
    map_r: int
    map_dc: int  # dims of q / k per projection dot
    map_warps: int
    share_m: int
    share_n: int
    share_warps: int
    d: int
    r: int  # all modes in one share program
    stages: int = 2
    map_maxnreg: int = 255  # ptxas would stop at 168 and spill the top-k merge


#: the block configuration CPU tensors (Triton's interpreter) run: 0 = large blocks, quick to
#: interpret; tests set a GPU's capability (80, 90) to interpret exactly what that GPU would run
INTERPRETER_CAPABILITY = 0


def block_config(D: int, R: int, dtype: torch.dtype = torch.bfloat16, capability: int = 90) -> Blocks:
    """The one home of the block sizes: map tiles of 16 tokens × 16 modes, projected 32 dims at a
    time (16 for fp32, whose tf32x3 operands take three times the registers), keep the tile and both
    top-k lists in registers (no spills); the share keeps a (64, R) accumulator on sm_90 (wgmma's
    64 rows), (32, R) before sm_90 and for fp32 inputs above R = 64; 8 warps and 16-key blocks above
    R = 64. ``capability``: the device's compute capability, 10 · major + minor; 0: the
    interpreter's large blocks (whole heads, 64 tokens: ~6× fewer interpreted steps)."""
    BD, BR = _pow2(D), _pow2(R)
    if capability == 0:
        n = 64 if BR <= 64 else 32
        return Blocks(map_n=n, map_r=BR, map_dc=BD, map_warps=4, share_m=n, share_n=n, share_warps=4, d=BD, r=BR)
    wide = dtype == torch.float32
    return Blocks(map_n=16, map_r=16, map_dc=16 if wide else 32, map_warps=4,
                  share_m=64 if capability >= 90 and not (wide and BR > 64) else 32, share_n=32 if BR <= 64 else 16,
                  share_warps=4 if BR <= 64 else 8, d=BD, r=BR)


@dataclass(frozen=True)
class Launch:
    """One kernel launch, exactly as :func:`mode_statistics_qk` makes it (also what
    :mod:`qkprobe.reduce.triton_aot` compiles)."""

    kernel: str  # a key of KERNELS
    grid: Tuple[int, ...]
    args: tuple
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    maxnreg: Optional[int] = None

    def run(self):
        KERNELS[self.kernel][self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                                        num_stages=self.num_stages, maxnreg=self.maxnreg)


@dataclass
class Plan:
    """The launches of one call and what the torch finish needs."""

    launches: List[Launch]
    out: Tensor  # (B, H, R, len(STAT_NAMES))
    part: Optional[Tensor]  # (B, H, n_mb, R) per query block share sums
    counts: Tensor  # (B, 4) int32: map tokens of q, of k, valid keys, valid queries


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


_SPLIT_CACHE: Dict[tuple, tuple] = {}  # (id, dtype, device, precision) → (weakref, version, parts, factor)


def split_maps(coord: Tensor, dtype: torch.dtype, device, precision: str) -> Tuple[Tensor, float]:
    """(SPLIT, H, D, R) map parts for inputs of ``dtype`` and the Horner factor: fp32 inputs, the
    fp32 map; half inputs, parts of that dtype whose scaled sum is the fp32 map to ~fp32 precision
    (one part, a rounded map, with precision "tf32").

    Cached per map tensor (the reducer's maps live as long as their bases) until the tensor is
    changed in place or freed: the split is a dozen small device ops, per layer and batch otherwise."""
    key = (id(coord), dtype, str(device), precision)
    hit = _SPLIT_CACHE.get(key)
    if hit is not None and hit[0]() is coord and hit[1] == coord._version:
        return hit[2], hit[3]
    parts, factor = _split(coord, dtype, device, precision)
    if len(_SPLIT_CACHE) > 1024:  # drop the maps of freed bases
        for k in [k for k, v in _SPLIT_CACHE.items() if v[0]() is None]:
            del _SPLIT_CACHE[k]
    _SPLIT_CACHE[key] = (weakref.ref(coord), coord._version, parts, factor)
    return parts, factor


def _split(coord: Tensor, dtype: torch.dtype, device, precision: str) -> Tuple[Tensor, float]:
    c = coord.detach().to(device, torch.float32)
    if dtype not in _SPLIT:
        return c.unsqueeze(0), 1.0
    bits, n = _SPLIT[dtype]
    n = 1 if precision == "tf32" else n
    parts, rest = [], c
    for s in range(n):
        part = (rest * 2.0 ** (bits * s)).to(dtype)
        parts.append(part)
        rest = rest - part.float() * 2.0 ** (-bits * s)
    return torch.stack(parts), 2.0 ** -bits


def _counts(mask: Optional[Tensor], B: int, N: int, NK: int, p: int, device) -> Tensor:
    """(B, 4) int32: map tokens of q and of k (valid, past the prefix), valid keys, valid queries."""
    if mask is None:  # filled on the device: a host tensor copied in would wait for the stream
        counts = torch.empty((B, 4), dtype=torch.int32, device=device)
        for j, n in enumerate((N - p, NK - p, NK, N)):
            counts[:, j] = n
        return counts
    m = mask.to(torch.int32)
    mapped = m[:, p:].sum(1)
    full = m.sum(1)
    return torch.stack([mapped, mapped, full, full], 1).to(torch.int32).contiguous()


def _share_source(q: Tensor, probs: Optional[Tensor], attn_bias: Optional[Tensor], B: int, H: int, N: int,
                  NK: int) -> Tuple[Tensor, bool, bool]:
    """(tensor, has_probs, has_bias) for the share kernel's ``p_ptr``: the probabilities, else the
    additive bias (a boolean mask made -inf / 0), else q (not read)."""
    if probs is not None:
        if probs.shape[-2:] != (N, NK):
            raise ShapeError(f"probs must be (B, H, {N}, {NK}), got {tuple(probs.shape)}; pass the attention "
                             f"of the same tokens.")
        return probs.expand(B, H, N, NK), True, False
    if attn_bias is not None:
        bias = attn_bias
        if bias.dtype == torch.bool:  # True = may attend
            bias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device).masked_fill_(~bias, float("-inf"))
        return bias.to(q.device).expand(B, H, N, NK), False, True
    return q, False, False


def unsupported(q: Tensor, k: Tensor, topk: int, prefix_tokens: int = 0) -> Optional[str]:
    """Why the kernels do not take these q (…, N, D), k (…, Nk, D) with this top-k and these
    prefix tokens left out of the maps (None: they do): float64, or a top-k list past KMAX."""
    if compute_dtype(q, k) == torch.float64:
        return "the Triton kernels do not take float64 q/k"
    p = max(0, int(prefix_tokens))
    if max(min(topk, q.shape[-2] - p), min(topk, k.shape[-2] - p)) > KMAX:
        return f"the Triton kernels do not take topk={topk} (their top-k lists hold at most {KMAX} tokens)"
    return None


def plan(q: Tensor, k: Tensor, coord_q: Tensor, coord_k: Tensor, S: Tensor, scale: float, *,
         prefix_tokens: int = 0, include_prefix: bool = False, topk: int = 5, probs: Optional[Tensor] = None,
         attn_bias: Optional[Tensor] = None, attention: bool = True, out: Optional[Tensor] = None,
         precision: str = "tf32x3", token_mask: Optional[Tensor] = None, capability: Optional[int] = None) -> Plan:
    """The launches :func:`mode_statistics_qk` makes (tensors may be on the ``meta`` device;
    ``capability``: the target's, by default q's device's; INTERPRETER_CAPABILITY off CUDA)."""
    B, H, N, NK, D, R = _check(q, k, coord_q, coord_k, S)
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if topk < 1:
        raise UsageError(f"topk must be at least 1 (tokens in a top-k mean), got {topk}.")
    p = 0 if include_prefix else int(prefix_tokens)
    if p < 0 or p >= N or p >= NK:
        raise ShapeError(f"prefix_tokens={prefix_tokens} leaves no map tokens out of N={N}, "
                         f"Nk={NK}; lower it or pass include_prefix=True.")
    why = unsupported(q, k, topk, p)
    if why:
        raise ShapeError(f"reduce/triton: {why}; use the torch backend.")
    kmax = max(min(topk, N - p), min(topk, NK - p))  # the longer of the two sides' top-k lists
    if token_mask is not None and (NK != N or tuple(token_mask.shape) != (B, N)):
        raise ShapeError(f"token_mask must be (B, N) = ({B}, {N}) with as many keys as queries, got "
                         f"{tuple(token_mask.shape)} for N={N}, Nk={NK}; pass no mask for cross-attention.")
    shape = (B, H, R, len(STAT_NAMES))
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=q.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != q.device:
        raise ShapeError(f"out must be a float32 tensor of shape {shape} on {q.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}.")
    if q.dtype != k.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        q, k = q.float(), k.float()
    cq, inv = split_maps(coord_q, q.dtype, q.device, precision)
    ck, _ = split_maps(coord_k, q.dtype, q.device, precision)
    half = q.dtype != torch.float32
    if capability is None:
        if q.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(q.device)
            capability = 10 * major + minor
        else:
            capability = INTERPRETER_CAPABILITY
    blk = block_config(D, R, q.dtype, capability)
    counts = _counts(token_mask, B, N, NK, p, q.device)
    mask = token_mask.to(q.device, torch.int8) if token_mask is not None else counts
    mstr = mask.stride() if token_mask is not None else (0, 0)
    upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"  # the interpreter (see _hdot)
    common = dict(SPLIT=cq.shape[0], INV=inv, HALF=half, PREC=precision, UPCAST=upcast)
    maps = (cq, *cq.stride(), ck, *ck.stride())
    if attention:  # the coordinates, for the share: (B, H, N, R) and (B, H, Nk, R) fp32
        a_s = torch.empty((B, H, N, R), dtype=torch.float32, device=q.device)
        b_s = torch.empty((B, H, NK, R), dtype=torch.float32, device=q.device)
    else:
        a_s = b_s = out  # not written (STORE off)
    scratch = (a_s, *a_s.stride()[:3], b_s, *b_s.stride()[:3])
    launches = [Launch("map", (B * H * triton.cdiv(R, blk.map_r),),
                       (q, *q.stride(), k, *k.stride(), *maps, mask, *mstr, counts, out, *out.stride(),
                        *scratch, H, N, NK, D, R, p, topk),
                       dict(BLOCK_N=blk.map_n, BLOCK_D=blk.d, BLOCK_R=blk.map_r, KP=_pow2(kmax, 2), DC=blk.map_dc,
                            HAS_MASK=token_mask is not None, STORE=attention, **common), blk.map_warps, blk.stages,
                       blk.map_maxnreg)]
    part = None
    if attention:
        n_mb = triton.cdiv(N, blk.share_m)
        part = torch.empty((B, H, n_mb, R), dtype=torch.float32, device=q.device)
        aux, has_probs, has_bias = _share_source(q, probs, attn_bias, B, H, N, NK)
        strides = aux.stride() if (has_probs or has_bias) else (0, 0, 0, 0)
        launches.append(Launch("share", (B * H, n_mb),
                               (q, *q.stride(), k, *k.stride(), *scratch, aux, *strides, mask, *mstr, counts, part,
                                H, N, NK, D, R, float(scale)),
                               dict(HAS_PROBS=has_probs, HAS_BIAS=has_bias, HAS_MASK=token_mask is not None,
                                    BLOCK_M=blk.share_m, BLOCK_N=blk.share_n, BLOCK_D=blk.d, BLOCK_R=blk.r,
                                    HALF=half, PREC=precision, UPCAST=upcast), blk.share_warps, blk.stages))
    return Plan(launches, out, part, counts)


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
    precision: str = "tf32x3",
    token_mask: Optional[Tensor] = None,
) -> Tensor:
    """:func:`qkprobe.core.stats.mode_statistics` of a = q @ coord_q, b = k @ coord_k, in Triton.

    Args:
        q: (B, H, N, D), k: (B, H, Nk, D) the module's queries and keys (any strides; bf16, fp16,
            fp32), the same tensors the logits scale · q kᵀ (+ attn_bias) are made of.
        coord_q, coord_k: (H, D, R) the per-head coordinate maps; S: (H, R) singular values.
        probs: (B, H, N, Nk) the module's attention probabilities, if known (then attn_bias is
            ignored); attn_bias: float (broadcastable to (B, H, N, Nk)) or boolean (True = may attend).
        precision: input precision of the fp32 tensor-core dots: "tf32x3" (≈ fp32), "ieee" (exact fp32,
            no tensor cores) or "tf32" (fast; half inputs then also use one rounded map, not a split one).
        token_mask: (B, N) bool, True = real token (N == Nk): padding is left out of every statistic,
            top-k clipped per sample, the share averaged over that sample's real queries.
        Other arguments and the result: as :func:`~qkprobe.core.stats.mode_statistics` (float32 out,
        (B, H, R, len(STAT_NAMES))).
    """
    if triton is None:
        raise ImportError("triton is not installed")
    pl = plan(q, k, coord_q, coord_k, S, scale, prefix_tokens=prefix_tokens, include_prefix=include_prefix,
              topk=topk, probs=probs, attn_bias=attn_bias, attention=attention, out=out, precision=precision,
              token_mask=token_mask)
    for launch in pl.launches:
        launch.run()
    out = pl.out
    if pl.part is None:
        out[..., _MAP_COLUMNS:] = float("nan")
        return out
    contrib = out[..., STAT_INDEX["attn_contrib"]]
    n_queries = pl.counts[:, 3, None].to(torch.float32)  # (B, 1)
    torch.mul(pl.part.sum(2) / n_queries[..., None], S.detach().to(q.device, torch.float32) * float(scale),
              out=contrib)  # (B, H, R)
    total = contrib.sum(dim=-1, keepdim=True)
    nonzero = total != 0
    out[..., STAT_INDEX["attn_share"]] = torch.where(
        nonzero, contrib / torch.where(nonzero, total, torch.ones_like(total)), torch.zeros_like(contrib))
    return out
