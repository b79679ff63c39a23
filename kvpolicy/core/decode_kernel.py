"""Decode attention (one query token per row) straight from a layer's stored buffers, in Triton.

Why a kernel of its own: a quantized layer's keys and values are int8 or fp8 codes with a float32
scale per vector (``layers/codecs.py``). Through SDPA the step first writes the whole layer back
out at 16 bits and then reads that copy, so int8 *adds* traffic where it should halve it; and a
kvpolicy layer needs its own mask (slots hold arbitrary positions), which SDPA takes only as a
materialised tensor. This kernel reads each stored code and scale once, builds the mask from the
slots' positions as it goes, and serves the whole GQA group of a KV head from one read of its
keys (``G`` query heads as the ``M`` side of one ``tl.dot``).

Shape of the work (flash-decoding): program ``(row * H_kv + head, split)`` walks one share of the
filled slots and writes a partial (running max, normaliser, weighted sum) per query head; a second
kernel combines the splits. The number of filled slots is read on the device (the frozen layer's
``slot`` counter), so the launch is the same every step: capturable in a CUDA graph, no host read.

The oracle is :func:`kvpolicy.core.decode_attention.reference` (dequantize, mask, SDPA on CPU);
tests run this file under Triton's interpreter (``TRITON_INTERPRET=1``) against it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: ``codes`` values: how the stored rows hold a vector
PLAIN, INT8, FP8 = 0, 1, 2


@triton.jit
def _share(K, V, POS, PAD, SLOT, NEXT, SEG_START, SEG_END, bh, split, kv_heads, stride_kb, stride_kh, stride_kl,
           stride_vb, stride_vh, stride_vl, stride_pb, stride_ph, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
           RAGGED: tl.constexpr):
    """Program ``(bh, split)``'s row and head, where its (row, head)'s keys, values and positions start, the
    position being decoded, the row's padding, and its share ``[start, end)`` of the filled slots."""
    b = bh // kv_heads
    h = bh % kv_heads
    if RAGGED:  # flat [N, W] buffers: this (row, head)'s segment starts at SEG_START and ends at SEG_END + SLOT
        first = tl.load(SEG_START + bh)
        filled = tl.load(SEG_END + bh) + tl.load(SLOT) - first
        k_base = K + first * stride_kl
        v_base = V + first * stride_vl
        p_base = POS + first
    else:
        filled = tl.load(SLOT)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        p_base = POS + b * stride_pb + h * stride_ph
    per_split = (filled + SPLITS - 1) // SPLITS
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, filled)
    qpos = tl.load(NEXT) - 1  # the token being decoded (appended before attention)
    return b, h, k_base, v_base, p_base, qpos, tl.load(PAD + b), start, end


@triton.jit
def _visible(p_base, offs, end, pad, qpos, WINDOW: tl.constexpr):
    """Which of the slots ``offs`` the decoded token attends: inside its share, a real token of the row, not
    after the query, and on a sliding layer less than ``WINDOW`` positions before it (``masks.allowed``)."""
    inside = offs < end
    pos = tl.load(p_base + offs, mask=inside, other=-1)
    ok = inside & (pos >= pad) & (pos <= qpos)
    if WINDOW > 0:
        ok = ok & (pos > qpos - WINDOW)
    return ok


@triton.jit
def _softmax_step(scores, ok, m, den):
    """One block of the online softmax: the block's unnormalised probabilities, the factor that rescales what
    came before, and the updated running max and normaliser."""
    scores = tl.where(ok[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(scores - m_new[:, None])
    return p, alpha, m_new, den * alpha + tl.sum(p, 1)


@triton.jit
def _partial_kernel(
    Q, K, V, POS, PAD, SLOT, NEXT, SEG_START, SEG_END, O_PART, M_PART, L_PART,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_pb, stride_ph,
    kv_heads, scaling,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, WINDOW: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, RAGGED: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h, k_base, v_base, p_base, qpos, pad, start, end = _share(
        K, V, POS, PAD, SLOT, NEXT, SEG_START, SEG_END, bh, split, kv_heads, stride_kb, stride_kh, stride_kl,
        stride_vb, stride_vh, stride_vl, stride_pb, stride_ph, SPLITS, BLOCK_N, RAGGED)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < G
    dmask = d < D
    q = tl.load(Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    q = (q * scaling).to(DOT_DTYPE)

    m = tl.full([G_PAD], -1.0e30, tl.float32)
    den = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        offs = s0 + tl.arange(0, BLOCK_N)
        ok = _visible(p_base, offs, end, pad, qpos, WINDOW)
        kv_mask = ok[:, None] & dmask[None, :]
        k = tl.load(k_base + offs[:, None] * stride_kl + d[None, :], mask=kv_mask, other=0)
        v = tl.load(v_base + offs[:, None] * stride_vl + d[None, :], mask=kv_mask, other=0)
        # [G_PAD, BLOCK_N]: the group's queries against each key, read once
        scores = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION, out_dtype=tl.float32)
        p, alpha, m, den = _softmax_step(scores, ok, m, den)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION,
                                       out_dtype=tl.float32)

    part = bh * SPLITS + split
    tl.store(O_PART + (part * G_PAD + g)[:, None] * D_PAD + d[None, :], acc)
    tl.store(M_PART + part * G_PAD + g, m)
    tl.store(L_PART + part * G_PAD + g, den)


@triton.jit
def _lane(words, j: tl.constexpr, CODES: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Byte ``j`` of each int32 word (little-endian: code ``4 i + j`` of the vector) as a value in ``DOT_DTYPE``:
    an int8 code, or an fp8 one (exact in bf16/fp16 either way)."""
    code = ((words >> (8 * j)) & 0xFF).to(tl.int8)
    if CODES == 2:
        return code.to(tl.float8e4nv, bitcast=True).to(DOT_DTYPE)
    return code.to(DOT_DTYPE)


@triton.jit
def _lane_query(Q_ROW, g, gmask, dd, dmask, j: tl.constexpr, scaling, DOT_DTYPE: tl.constexpr, stride_qh):
    """Elements ``4 i + j`` of the group's queries, scaled: what multiplies lane ``j`` of the codes."""
    q = tl.load(Q_ROW + g[:, None] * stride_qh + (4 * dd + j)[None, :], mask=gmask[:, None] & dmask[None, :],
                other=0.0)
    return (q.to(tl.float32) * scaling).to(DOT_DTYPE)


@triton.jit
def _partial_kernel_8bit(
    Q, K, V, POS, PAD, SLOT, NEXT, SEG_START, SEG_END, O_PART, M_PART, L_PART,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_pb, stride_ph,
    kv_heads, scaling,
    G: tl.constexpr, G_PAD: tl.constexpr, D4: tl.constexpr, D4_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, CODES: tl.constexpr, WINDOW: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, RAGGED: tl.constexpr,
):
    """As :func:`_partial_kernel`, for int8/fp8 rows read as int32 words (``K``/``V`` are int32 views, strides
    in words): a row of ``D + 4`` bytes is only 4-byte aligned, so byte loads could not be vectorised; here
    every load moves 4 codes, and the 4 byte lanes of a word are 4 products of ``D / 4`` each. Word ``D4`` of a
    row is the float32 scale."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h, k_base, v_base, p_base, qpos, pad, start, end = _share(
        K, V, POS, PAD, SLOT, NEXT, SEG_START, SEG_END, bh, split, kv_heads, stride_kb, stride_kh, stride_kl,
        stride_vb, stride_vh, stride_vl, stride_pb, stride_ph, SPLITS, BLOCK_N, RAGGED)

    g = tl.arange(0, G_PAD)
    dd = tl.arange(0, D4_PAD)
    gmask = g < G
    dmask = dd < D4
    q_row = Q + b * stride_qb + (h * G) * stride_qh
    q0 = _lane_query(q_row, g, gmask, dd, dmask, 0, scaling, DOT_DTYPE, stride_qh)
    q1 = _lane_query(q_row, g, gmask, dd, dmask, 1, scaling, DOT_DTYPE, stride_qh)
    q2 = _lane_query(q_row, g, gmask, dd, dmask, 2, scaling, DOT_DTYPE, stride_qh)
    q3 = _lane_query(q_row, g, gmask, dd, dmask, 3, scaling, DOT_DTYPE, stride_qh)

    m = tl.full([G_PAD], -1.0e30, tl.float32)
    den = tl.full([G_PAD], 0.0, tl.float32)
    acc0 = tl.full([G_PAD, D4_PAD], 0.0, tl.float32)
    acc1 = tl.full([G_PAD, D4_PAD], 0.0, tl.float32)
    acc2 = tl.full([G_PAD, D4_PAD], 0.0, tl.float32)
    acc3 = tl.full([G_PAD, D4_PAD], 0.0, tl.float32)
    for s0 in range(start, end, BLOCK_N):
        offs = s0 + tl.arange(0, BLOCK_N)
        ok = _visible(p_base, offs, end, pad, qpos, WINDOW)
        kv_mask = ok[:, None] & dmask[None, :]
        kw = tl.load(k_base + offs[:, None] * stride_kl + dd[None, :], mask=kv_mask, other=0)
        scores = tl.dot(q0, tl.trans(_lane(kw, 0, CODES, DOT_DTYPE)), input_precision=PRECISION, out_dtype=tl.float32)
        scores += tl.dot(q1, tl.trans(_lane(kw, 1, CODES, DOT_DTYPE)), input_precision=PRECISION,
                         out_dtype=tl.float32)
        scores += tl.dot(q2, tl.trans(_lane(kw, 2, CODES, DOT_DTYPE)), input_precision=PRECISION,
                         out_dtype=tl.float32)
        scores += tl.dot(q3, tl.trans(_lane(kw, 3, CODES, DOT_DTYPE)), input_precision=PRECISION,
                         out_dtype=tl.float32)
        k_scale = tl.load(k_base + offs * stride_kl + D4, mask=ok, other=0).to(tl.float32, bitcast=True)
        p, alpha, m, den = _softmax_step(scores * k_scale[None, :], ok, m, den)
        v_scale = tl.load(v_base + offs * stride_vl + D4, mask=ok, other=0).to(tl.float32, bitcast=True)
        p = (p * v_scale[None, :]).to(DOT_DTYPE)
        vw = tl.load(v_base + offs[:, None] * stride_vl + dd[None, :], mask=kv_mask, other=0)
        acc0 = acc0 * alpha[:, None] + tl.dot(p, _lane(vw, 0, CODES, DOT_DTYPE), input_precision=PRECISION,
                                              out_dtype=tl.float32)
        acc1 = acc1 * alpha[:, None] + tl.dot(p, _lane(vw, 1, CODES, DOT_DTYPE), input_precision=PRECISION,
                                              out_dtype=tl.float32)
        acc2 = acc2 * alpha[:, None] + tl.dot(p, _lane(vw, 2, CODES, DOT_DTYPE), input_precision=PRECISION,
                                              out_dtype=tl.float32)
        acc3 = acc3 * alpha[:, None] + tl.dot(p, _lane(vw, 3, CODES, DOT_DTYPE), input_precision=PRECISION,
                                              out_dtype=tl.float32)

    part = bh * SPLITS + split
    row = O_PART + (part * G_PAD + g)[:, None] * D_PAD
    tl.store(row + (4 * dd + 0)[None, :], acc0)
    tl.store(row + (4 * dd + 1)[None, :], acc1)
    tl.store(row + (4 * dd + 2)[None, :], acc2)
    tl.store(row + (4 * dd + 3)[None, :], acc3)
    tl.store(M_PART + part * G_PAD + g, m)
    tl.store(L_PART + part * G_PAD + g, den)


@triton.jit
def _combine_kernel(
    O_PART, M_PART, L_PART, OUT, stride_ob, stride_oh, kv_heads,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, SPLITS: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // kv_heads
    h = bh % kv_heads
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    s = tl.arange(0, SPLITS)
    part = bh * SPLITS + s
    m = tl.load(M_PART + part[:, None] * G_PAD + g[None, :])  # [SPLITS, G_PAD]
    den = tl.load(L_PART + part[:, None] * G_PAD + g[None, :])
    top = tl.max(m, 0)
    w = tl.exp(m - top[None, :])  # an empty split: m = -1e30, den = 0, weight 0
    total = tl.sum(w * den, 0)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for i in range(SPLITS):
        wi = tl.exp(tl.load(M_PART + (bh * SPLITS + i) * G_PAD + g) - top)
        oi = tl.load(O_PART + ((bh * SPLITS + i) * G_PAD + g)[:, None] * D_PAD + d[None, :])
        acc += wi[:, None] * oi
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(OUT + b * stride_ob + (h * G + g)[:, None] * stride_oh + d[None, :], out.to(OUT.dtype.element_ty),
             mask=(g < G)[:, None] & (d < D)[None, :])


#: built for Triton's interpreter (``TRITON_INTERPRET=1`` at import): the kernels then run on CPU tensors
INTERPRETED = type(_partial_kernel).__name__ == "InterpretedFunction"


def pads(group: int, head_dim: int) -> tuple[int, int]:
    """The padded query group and head dimension of the partial results (``tl.dot`` takes 16 at least; the
    8-bit kernel's lanes need ``4 x`` a padded quarter of the head dimension)."""
    return max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(head_dim),
                                                       4 * max(16, triton.next_power_of_2(head_dim // 4)))


def launch(query, keys, values, pos, pad, slot, next_pos, out, parts, *, codes: int, window: int, scaling: float,
           block_n: int, splits: int, dot_dtype, segments=None) -> None:
    """Run both kernels: ``query`` ``[B, H_q, D]``; ``keys``/``values`` ``[B, H_kv, L, W]`` as stored; ``pos``
    ``[B, H_kv or 1, L]``; ``pad`` ``[B]``; ``slot``/``next_pos`` ``[1]`` (filled slots, next position);
    ``out`` ``[B, H_q, D]``; ``parts``: (o ``[B*H_kv*splits*G_PAD*D_PAD]``, m, l ``[B*H_kv*splits*G_PAD]``)
    float32 scratch. ``segments``: ``(start, end)`` ``[B, H_kv]`` for flat buffers (``keys`` ``[N, W]``, ``pos``
    ``[N]``): segment ``(b, h)`` holds entries ``start[b, h]`` to ``end[b, h] + slot``."""
    b, hq, d = query.shape
    ragged = segments is not None
    hkv = segments[0].shape[1] if ragged else keys.shape[1]
    g_pad, d_pad = pads(hq // hkv, d)
    g = hq // hkv
    o_part, m_part, l_part = parts
    tl_dot = {"bfloat16": tl.bfloat16, "float16": tl.float16, "float32": tl.float32}[dot_dtype]
    if codes != PLAIN:  # 8-bit rows as int32 words (D/4 words of codes, then the scale's word)
        keys, values = keys.view(torch.int32), values.view(torch.int32)
    if ragged:
        seg_start, seg_end = segments
        k_strides, v_strides, p_strides = (0, 0, keys.stride(0)), (0, 0, values.stride(0)), (0, 0)
    else:
        seg_start = seg_end = slot  # not read
        k_strides, v_strides = (keys.stride(0), keys.stride(1), keys.stride(2)), tuple(values.stride()[:3])
        p_strides = (pos.stride(0), pos.stride(1) if pos.shape[1] > 1 else 0)
    args = (query, keys, values, pos, pad, slot, next_pos, seg_start, seg_end, o_part, m_part, l_part,
            query.stride(0), query.stride(1), *k_strides, *v_strides, *p_strides, hkv, scaling)
    common = dict(G=g, G_PAD=g_pad, D_PAD=d_pad, BLOCK_N=block_n, SPLITS=splits, WINDOW=window,
                  DOT_DTYPE=tl_dot, PRECISION="ieee" if dot_dtype == "float32" else "tf32", RAGGED=ragged)
    if codes == PLAIN:
        _partial_kernel[(b * hkv, splits)](*args, D=d, **common)
    else:
        _partial_kernel_8bit[(b * hkv, splits)](*args, CODES=codes, D4=d // 4,
                                                D4_PAD=max(16, triton.next_power_of_2(d // 4)), **common)
    _combine_kernel[(b * hkv,)](
        o_part, m_part, l_part, out, out.stride(0), out.stride(1), hkv,
        G=g, G_PAD=g_pad, D=d, D_PAD=d_pad, SPLITS=splits,
    )
