"""A trace-friendly LLaMA forward with a static, in-place KV cache (for Core ML export).

`StaticLlama` re-expresses a Hugging Face ``LlamaForCausalLM`` as one ``forward(input_ids,
position)`` over a fixed number ``T`` of new tokens: the keys and values of those tokens are
written in place into two registered buffers (``k_cache``, ``v_cache``; (layers, 1,
kv_heads, context, head_dim)) at ``position .. position + T - 1``, and every query attends
over the whole cache with a causal mask built from ``position``. Buffers updated in place
are what coremltools turns into Core ML states (iOS 18 / macOS 15), so the same module
gives a fixed-shape prefill (``T = prefill_len``) and a one-token decode step (``T = 1``).

Every projection becomes a plain ``nn.Linear`` holding the dense weight (`LUTLinear`
decoded once; `edkm.deploy.coreml` puts the LUT back after conversion). Limits: batch 1,
default RoPE only (no rope scaling), no attention / MLP bias beyond what ``nn.Linear``
carries, SiLU MLP; anything else raises ``ValueError`` naming what it found.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edkm._checks import check_int
from edkm.layers import LUTEmbedding, LUTLinear

SUPPORTED_LINEARS = "nn.Linear, edkm LUTLinear, or edkm LowRankLinear made of those"


def dense_linear(module: nn.Module, name: str) -> nn.Module:
    """A float ``nn.Linear`` (or a two-factor ``nn.Sequential``) computing what ``module`` does.

    Args:
        module: ``nn.Linear``, `LUTLinear`, or a ``LowRankLinear`` whose factors are those.
        name: Module name, for the error message.
    Returns:
        A new module in float32 (weights decoded from the LUT where there is one).
    Raises:
        ValueError: a module type Core ML export does not handle (names it and the layer).
    """
    if isinstance(module, LUTLinear):
        weight, bias = module.dense_weight(), module.bias
    elif type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
    elif type(module).__name__ == "LowRankLinear":
        return nn.Sequential(dense_linear(module.down, f"{name}.down"), dense_linear(module.up, f"{name}.up"))
    else:
        if hasattr(module, "parametrizations"):
            raise ValueError(f"layer {name!r} is still a DKM-prepared {type(module).__name__}: the model was never "
                             "finalized; call edkm.finalize(model) (or load an export with edkm.load_compressed)")
        raise ValueError(f"layer {name!r} is a {type(module).__name__}, which the Core ML export cannot take; "
                         f"supported projections: {SUPPORTED_LINEARS}")
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight.detach().float())
        if bias is not None:
            out.bias.copy_(bias.detach().float())
    return out


class _Block(nn.Module):
    """One decoder layer: attention + SwiGLU MLP, projections as dense float modules."""

    def __init__(self, layer: nn.Module, prefix: str) -> None:
        super().__init__()
        att, mlp = layer.self_attn, layer.mlp
        parts = (("self_attn", att, ("q_proj", "k_proj", "v_proj", "o_proj")),
                 ("mlp", mlp, ("gate_proj", "up_proj", "down_proj")))
        for sub, part, names in parts:
            for n in names:
                setattr(self, n, dense_linear(getattr(part, n), f"{prefix}.{sub}.{n}"))
        self.norm1 = nn.Parameter(layer.input_layernorm.weight.detach().float().clone())
        self.norm2 = nn.Parameter(layer.post_attention_layernorm.weight.detach().float().clone())


class StaticLlama(nn.Module):
    """``logits = forward(input_ids (1, T) int, position (1,) int)`` with an in-place KV cache.

    Args:
        model: A ``LlamaForCausalLM`` (float, finalized with LUT layers, or loaded from an export).
        context: Cache length: positions ``0 .. context - 1``.
        cache_dtype: dtype of the KV cache buffers (Core ML states are fp16).
    """

    def __init__(self, model: nn.Module, context: int, cache_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        cfg = model.config
        if getattr(cfg, "model_type", None) != "llama":
            kind = getattr(cfg, "model_type", None)
            raise ValueError(f"Core ML export supports LLaMA models, got model_type={kind!r}")
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"Core ML export supports default RoPE only, got {rope!r}")
        if cfg.hidden_act != "silu":
            raise ValueError(f"Core ML export supports SiLU MLPs only, got hidden_act={cfg.hidden_act!r}")
        check_int("context", context)
        inner = model.model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps, self.context = cfg.rms_norm_eps, context
        self.query_len: int | None = None
        emb = inner.embed_tokens
        weight = emb.dense_weight() if isinstance(emb, LUTEmbedding) else emb.weight
        self.embed = nn.Parameter(weight.detach().float().clone())
        self.blocks = nn.ModuleList(_Block(layer, f"model.layers.{i}") for i, layer in enumerate(inner.layers))
        self.norm = nn.Parameter(inner.norm.weight.detach().float().clone())
        self.lm_head = dense_linear(model.lm_head, "lm_head")
        # RoPE tables for every cache position, computed in fp32 here: fp16 angles (as Core ML
        # would compute them) lose ~0.25 rad at positions 256..512.
        inv_freq = inner.rotary_emb.inv_freq.detach().float()
        freqs = torch.arange(context, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (context, head_dim / 2)
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        self.register_buffer("rope_cos", emb.cos() * scale)  # (context, head_dim)
        self.register_buffer("rope_sin", emb.sin() * scale)
        shape = (len(self.blocks), 1, self.kv_heads, context, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype))

    def _rms(self, x: Tensor, w: Tensor) -> Tensor:
        # x / sqrt(mean(x^2) + eps) computed as y / sqrt(mean(y^2) + eps / s^2) with y = x / s,
        # s = max|x| per token (>= 1e-3): equal in exact arithmetic, but safe in fp16, where
        # SmolLM2's residual stream (|x| up to ~2e4, mean(x^2) ~7e5) overflows x^2 (max 65504).
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-3)
        y = x / s
        return w * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps / s.pow(2)))

    def forward(self, input_ids: Tensor, position: Tensor) -> Tensor:
        """Logits (1, T, vocab) for ``input_ids`` (1, T) placed at ``position`` (1,) onwards."""
        # A traced `input_ids.shape[1]` would be a graph value; fixed-shape exports set
        # `query_len` so the trace sees a Python int.
        T = self.query_len or input_ids.shape[1]
        pos = position.reshape(())  # 0-d int tensor: a traced, dynamic slice start
        offsets = torch.arange(T, dtype=position.dtype)
        q_pos = pos + offsets  # (T,)
        cos, sin = F.embedding(q_pos, self.rope_cos), F.embedding(q_pos, self.rope_sin)  # (T, head_dim)
        dt = self.embed.dtype  # compute dtype: float32 for tracing (Core ML then runs fp16)
        keys = torch.arange(self.context, dtype=position.dtype)
        future = keys[None, :] > q_pos[:, None]  # (T, context)
        # -1e4: finite in fp16, and exp() of it underflows to 0. Arithmetic, not torch.where:
        # coremltools would store where()'s broadcast (T, context) operands as constants.
        mask = future.to(dt) * -1e4
        h = F.embedding(input_ids.to(torch.int64), self.embed)  # (1, T, hidden)
        group = self.heads // self.kv_heads
        for i, blk in enumerate(self.blocks):
            x = self._rms(h, blk.norm1)
            q = blk.q_proj(x).view(1, T, self.heads, self.head_dim).transpose(1, 2)  # (1, H, T, D)
            k = blk.k_proj(x).view(1, T, self.kv_heads, self.head_dim).transpose(1, 2)
            v = blk.v_proj(x).view(1, T, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q, self.head_dim // 2) * sin
            k = k * cos + _rotate_half(k, self.head_dim // 2) * sin
            self.k_cache[i : i + 1, :, :, pos : pos + T, :] = k.to(self.k_cache.dtype).unsqueeze(0)
            self.v_cache[i : i + 1, :, :, pos : pos + T, :] = v.to(self.v_cache.dtype).unsqueeze(0)
            kc = self.k_cache[i].to(dt).repeat_interleave(group, dim=1)  # (1, H, context, D)
            vc = self.v_cache[i].to(dt).repeat_interleave(group, dim=1)
            att = q @ kc.transpose(-1, -2) / math.sqrt(self.head_dim) + mask  # (1, H, T, context)
            out = att.softmax(-1) @ vc  # (1, H, T, D)
            h = h + blk.o_proj(out.transpose(1, 2).reshape(1, T, self.heads * self.head_dim))
            x = self._rms(h, blk.norm2)
            h = h + blk.down_proj(F.silu(blk.gate_proj(x)) * blk.up_proj(x))
        return self.lm_head(self._rms(h, self.norm))


def _rotate_half(x: Tensor, half: int) -> Tensor:
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
