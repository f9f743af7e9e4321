"""``nn.MultiheadAttention`` as a traceable function whose projections fxquant can quantize.

``torch.fx`` keeps ``nn.MultiheadAttention`` opaque (a torch.nn leaf), so its four projections
escape the recipe. :class:`~fxquant.graph.tracer.QuantTracer` traces
:func:`multi_head_attention` in its place, which computes the same thing as the module's slow
path (``F.multi_head_attention_forward``) with the same operations in the same order, split so
that the graph shows:

- the in-projection as ``F.linear`` calls on the module's own parameters (``get_attr`` nodes
  ``<path>.in_proj_weight``, or ``<path>.q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``
  when ``kdim``/``vdim`` differ from ``embed_dim``), found by ``annotate_layers`` as layers
  named after those parameters;
- the out-projection as a call of the ``out_proj`` submodule (a Linear);
- everything that depends on shapes, dtypes or flags (batch-first and unbatched layouts, masks,
  ``bias_k``/``bias_v``, ``add_zero_attn``, the attention itself, dropout, weight averaging)
  inside four leaf functions (``torch.fx.wrap``), which run as plain Python at call time.

Packed in-projection (``in_proj_weight``, shape ``(3E, E)``):

- self-attention (``query is key is value`` while tracing, the common case): one
  ``F.linear(x, in_proj_weight, in_proj_bias)`` then the split torch does: bit for bit the
  module's slow path, batched inputs (float32 and under CPU bfloat16 autocast);
- otherwise (encoder-decoder ``key is value``, or three distinct inputs) the distinct inputs are
  concatenated along the sequence and projected by one ``F.linear`` on the whole weight; each
  input keeps the rows of its own sequence and the columns of its own third. A weight quantizer
  so sees the whole tensor once, as in self-attention, and the layer has one weight and one input
  quantizer. (A slice ``in_proj_weight[:E]`` is not a ``get_attr``, so a layer on it would not be
  found; one ``F.linear`` per input on the whole weight would quantize the same weight two or
  three times, into separate quantizers.) The price: every row computes all ``3E`` outputs, so
  the in-projection costs 2x (``key is value``) to 3x (distinct) the FLOPs of torch's.

Where torch multiplies by thirds of the weight and this module by the whole (the second case,
and unbatched input, for which torch unsqueezes q, k and v one by one and so loses
``query is key``), the products have other shapes, which the BLAS may sum in another order:
results then equal torch's to float32 rounding (measured: up to 2.4e-7 relative at E=8, equal
at E=64 and 256 on x86-64; one bfloat16 ulp under autocast). Separate ``q/k/v_proj_weight`` are
projected exactly as torch does.

Identity of ``query``/``key``/``value`` is decided while tracing: ``attn(x, x, x)`` traces as
self-attention; a model passing equal tensors through different variables gets the general path
(also correct, just slower).

``mha.training`` is read when the graph runs (the tracer makes ``.training`` reads runtime
reads), so dropout follows ``train()``/``eval()`` of the traced model. The fused inference kernel
the module picks in eval mode without grad (``torch._native_multi_head_attention``) is never
used: with ``need_weights=False`` it sums in another order, and the float module's output then
differs from the traced one's by up to 3e-6 of its largest magnitude (measured: 1.5e-7 at E=8,
3.0e-6 at E=256, 8.5e-7 on torchvision's vit_b_16); with weights they are equal.
Forward hooks registered on the ``nn.MultiheadAttention`` itself do not run in the traced graph
(those on ``out_proj`` do).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["multi_head_attention", "traces_as_function", "composite_attention"]


def traces_as_function(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.MultiheadAttention`` whose ``forward`` is torch's own (a
    subclass overriding ``forward``, such as torch.ao's quantizable one, is left alone)."""
    return (isinstance(module, nn.MultiheadAttention)
            and type(module).forward is nn.MultiheadAttention.forward)


@contextlib.contextmanager
def composite_attention() -> Iterator[None]:
    """Inside, torch's attention modules skip their fused inference kernel
    (``torch.backends.mha`` fast path) and compute the composite path a traced graph computes,
    which rounds differently; the setting is restored after."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def multi_head_attention(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                         key_padding_mask: Tensor | None = None, need_weights: bool = True,
                         attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                         is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """``mha(query, key, value, ...)`` by torch's slow path, traceable by ``torch.fx``.

    Same arguments and result as :meth:`nn.MultiheadAttention.forward`: ``(output, weights)``,
    ``weights`` None unless ``need_weights``.
    """
    same_kv = key is value
    same_qkv = same_kv and query is key
    packed = mha._qkv_same_embed_dim
    embed_dim = mha.embed_dim
    inputs = _seq_first(query, key, value, key_padding_mask, attn_mask, num_heads=mha.num_heads,
                        batch_first=mha.batch_first, packed=packed)
    q_in = inputs[0]
    k_in = q_in if same_qkv else inputs[1]
    v_in = k_in if same_kv else inputs[2]
    key_padding_mask = inputs[3] if key_padding_mask is not None else None
    attn_mask = inputs[4] if attn_mask is not None else None

    bias = mha.in_proj_bias
    if not packed:
        b_q, b_k, b_v = (None, None, None) if bias is None else (bias[:embed_dim],
                                                               bias[embed_dim:2 * embed_dim],
                                                               bias[2 * embed_dim:])
        q = F.linear(q_in, mha.q_proj_weight, b_q)
        k = F.linear(k_in, mha.k_proj_weight, b_k)
        v = F.linear(v_in, mha.v_proj_weight, b_v)
    elif same_qkv:
        proj = F.linear(q_in, mha.in_proj_weight, bias)
        # torch's split of the packed projection (_in_projection_packed), op for op
        proj = (proj.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2)
                .contiguous())
        q, k, v = proj[0], proj[1], proj[2]
    else:
        distinct = [q_in, k_in] if same_kv else [q_in, k_in, v_in]
        proj = F.linear(torch.cat(distinct), mha.in_proj_weight, bias)
        split = _split_projection(proj, *distinct)
        q, k, v = split[0], split[1], split[2]

    attended = _attend(q, k, v, key_padding_mask, attn_mask, mha.bias_k, mha.bias_v,
                       num_heads=mha.num_heads, add_zero_attn=mha.add_zero_attn,
                       dropout_p=mha.dropout, training=mha.training, need_weights=need_weights,
                       average_attn_weights=average_attn_weights, is_causal=is_causal)
    output = mha.out_proj(attended[0])
    result = _batch_layout(output, attended[1], query, batch_first=mha.batch_first)
    return result[0], result[1]


# The leaf functions below run as plain Python when the graph runs; ``torch.fx.wrap`` makes the
# tracer record a call to each instead of tracing into it.


def _seq_first(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
               attn_mask: Tensor | None, *, num_heads: int, batch_first: bool, packed: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Check shapes, turn masks into float masks and inputs into ``(L, N, E)`` as torch does
    (MultiheadAttention.forward then the start of F.multi_head_attention_forward)."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                  other_name="", target_type=query.dtype, check_other=False)
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if batch_first and is_batched:  # keep the "is" relations, as torch does
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if packed and key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
    if not packed and key.shape[:2] != value.shape[:2]:
        raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match "
                             f"value's {value.shape[:2]}")
    return query, key, value, key_padding_mask, attn_mask


def _split_projection(proj: Tensor, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v from ``F.linear(cat(inputs), in_proj_weight)``: input ``i``'s rows (its sequence)
    and its third of the columns; with two inputs the second gives k and v."""
    embed_dim = proj.size(-1) // 3
    rows = proj.split([x.size(0) for x in inputs])
    q = rows[0][..., :embed_dim].contiguous()
    if len(inputs) == 3:
        k = rows[1][..., embed_dim:2 * embed_dim].contiguous()
        v = rows[2][..., 2 * embed_dim:].contiguous()
        return q, k, v
    kv = (rows[1][..., embed_dim:].unflatten(-1, (2, embed_dim)).unsqueeze(0).transpose(0, -2)
          .squeeze(-2).contiguous())
    return q, kv[0], kv[1]


def _attend(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
            attn_mask: Tensor | None, bias_k: Tensor | None, bias_v: Tensor | None, *,
            num_heads: int, add_zero_attn: bool, dropout_p: float, training: bool,
            need_weights: bool, average_attn_weights: bool, is_causal: bool
            ) -> tuple[Tensor, Tensor | None]:
    """F.multi_head_attention_forward from the projected ``(L, N, E)`` q, k, v up to the
    out-projection: returns its ``(L * N, E)`` input and the attention weights (or None)."""
    tgt_len, bsz, embed_dim = q.shape
    head_dim = embed_dim // num_heads
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                           "Transformer module method `generate_square_subsequent_mask` to "
                           "create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # SDPA applies the causal mask itself
    elif key_padding_mask is not None:
        is_causal = False  # the merged mask is no longer causal
    src_len = k.size(0)
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but "
                                   f"should be {(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should "
                               f"be {(bsz * num_heads, tgt_len, src_len)}.")
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        zeros = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        F._check_key_padding_mask(key_padding_mask, src_len, bsz)
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len)
                            .expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    return out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim), None


def _batch_layout(output: Tensor, weights: Tensor | None, query: Tensor, *, batch_first: bool
                  ) -> tuple[Tensor, Tensor | None]:
    """The out-projection's ``(L * N, E)`` result in the layout of ``query`` (torch's last steps):
    ``(L, N, E)``, ``(N, L, E)`` when batch-first, ``(L, E)`` unbatched."""
    is_batched = query.dim() == 3
    tgt_len = query.size(1 if batch_first and is_batched else 0)
    output = output.view(tgt_len, -1, output.size(1))
    if not is_batched:
        output = output.squeeze(1)
        weights = weights.squeeze(0) if weights is not None else None
    if batch_first and is_batched:
        output = output.transpose(1, 0)
    return output, weights


for _leaf in ("_seq_first", "_split_projection", "_attend", "_batch_layout"):
    torch.fx.wrap(_leaf)
