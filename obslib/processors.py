"""Attention processors for attention modules whose Q/K and V head dimensions were changed (SlimDiff).

diffusers' stock processors derive one head dimension from the key projection and let
``scaled_dot_product_attention`` scale the logits by 1/sqrt(that dimension). After spectral compression
a module has ``heads`` heads of query/key dimension r_qk and value dimension r_v (r_qk may differ from
r_v; SDPA accepts that), and its logits must keep the scale of the *original* head dimension, or the
softmax would sharpen. These processors read both dimensions off the projections' outputs and pass the
original scale explicitly; everything else follows diffusers' ``JointAttnProcessor2_0`` (SD3/SD3.5 joint
attention) and ``AttnProcessor2_0`` (UNet, DiT, PixArt self- and cross-attention) line by line.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


class ReshapedJointAttnProcessor:
    """``JointAttnProcessor2_0`` with per-module Q/K and V head dimensions and a fixed softmax scale."""

    kind = "joint"

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        b, h = hidden_states.shape[0], attn.heads
        query = _heads(attn.to_q(hidden_states), b, h)
        key = _heads(attn.to_k(hidden_states), b, h)
        value = _heads(attn.to_v(hidden_states), b, h)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq = _heads(attn.add_q_proj(encoder_hidden_states), b, h)
            ek = _heads(attn.add_k_proj(encoder_hidden_states), b, h)
            ev = _heads(attn.add_v_proj(encoder_hidden_states), b, h)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, -1, h * value.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, : residual.shape[1]], out[:, residual.shape[1]:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, encoder_hidden_states) if encoder_hidden_states is not None else out


class ReshapedAttnProcessor:
    """``AttnProcessor2_0`` with per-module Q/K and V head dimensions and a fixed softmax scale."""

    kind = "plain"

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        h = attn.heads
        query, key, value = (_heads(x, batch, h) for x in (query, attn.to_k(encoder_hidden_states),
                                                            attn.to_v(encoder_hidden_states)))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, -1, h * value.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# stock processor class name -> its reshaped counterpart; the manifest stores the ``kind``
RESHAPED = {"JointAttnProcessor2_0": ReshapedJointAttnProcessor, "AttnProcessor2_0": ReshapedAttnProcessor}
BY_KIND = {cls.kind: cls for cls in RESHAPED.values()}


def reshaped_processor(attn):
    """The reshaped counterpart of the module's current processor (None when there is none)."""
    proc = attn.processor
    if isinstance(proc, tuple(BY_KIND.values())):
        return type(proc)
    return RESHAPED.get(type(proc).__name__)
