"""Qwen3.5's single-token decoding step, without transformers' per-call machinery.

A decoding step of a small model is mostly fixed cost: transformers' forward builds a 4-D causal
mask, rotary tables for three position axes, output-capture and deprecation wrappers, and a
growing key/value cache by concatenation, and its Gated-DeltaNet layer runs its one-token
convolution as a grouped `conv1d` and its recurrence through a general T-step loop. On a CPU that
is about half of a step of the embedded default's student (bench/bench_shared_prefix.py's "model
forward" row against "prefill once"), and ZPPO pays it in three dependent decoding loops (plain,
teacher, guided).

`Qwen35Decoder` takes over after the prefill, which stays the model's own forward: it reads the
prefill's cache once into tensors of its own (full-attention keys and values in buffers with room
for every new token, Gated-DeltaNet convolution windows and recurrent states) and then computes
each step. What it derives from the weights (stacked projections, norm scales, decay rates) is read
when it is made; the engine makes one per prefill and pushes weights between its calls, so each
call decodes with the weights pushed last.
The arithmetic is transformers' (the same casts: norms, gates and the recurrence in float32, the
rest in the model's dtype); `tests/test_qwen35_decode.py` holds it to the model's forward.

It serves the text models `Qwen3_5ForCausalLM` with full-attention and Gated-DeltaNet layers and
the default rotary embedding, except on CUDA where flash-linear-attention or causal-conv1d is
installed (the model's forward then runs their fused kernels); `unsupported(model)` says why another
model decodes through its own forward (the engine prints which path runs).

Shapes: B rows, W cache columns (the left-padded prompt's width plus the tokens decoded so far).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LAYER_TYPES = ("linear_attention", "full_attention")


def unsupported(model: PreTrainedModel) -> str | None:
    """Why `model` cannot decode through `Qwen35Decoder`, or None when it can."""
    config = model.config
    if type(model).__name__ != "Qwen3_5ForCausalLM":
        return f"{type(model).__name__} is not a Qwen3.5 text model"
    if set(config.layer_types) - set(LAYER_TYPES):
        return f"layer types {sorted(set(config.layer_types) - set(LAYER_TYPES))} have no lean step"
    rope = model.model.rotary_emb
    if rope.rope_type != "default":
        return f"rotary embedding {rope.rope_type!r} (the lean step has the default one)"
    if config.hidden_act != "silu":
        return f"activation {config.hidden_act!r} (the lean step has silu)"
    fused = [name for name in ("fla", "causal_conv1d") if importlib.util.find_spec(name)]
    if model.device.type == "cuda" and fused:
        return f"on CUDA the model's forward runs the fused Gated-DeltaNet kernels of {' and '.join(fused)}"
    return None


def _norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3.5's zero-centred RMSNorm in float32; `scale` = 1 + its weight, in float32."""
    return F.rms_norm(x.float(), scale.shape, scale, eps).type_as(x)


def _scale(norm: torch.nn.Module) -> torch.Tensor:
    return 1.0 + norm.weight.detach().float()


class Qwen35Decoder:
    """One model's decoding state for B rows and its step.

    `cache`: the prefill's transformers cache; `mask` (B, W) 0/1: the prefill's columns that hold a
    token (left padding is 0); `room`: how many tokens may still be decoded. The model must be in
    eval mode. Its weights are read when the decoder is made (the engine makes one per prefill and
    pushes weights between calls): on the CPU each layer's input projections are stacked into one
    matrix, since there a matmul's fixed cost outweighs its arithmetic at these sizes; elsewhere a
    stacked copy would hold accelerator memory, and each projection runs on its own (`stack`
    chooses either on any device).
    """

    def __init__(self, model: PreTrainedModel, cache, mask: torch.Tensor, room: int, stack: bool | None = None):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"Qwen35Decoder: {reason}")
        self.model, self.config = model, model.config
        rows, width = mask.shape
        self.width = width  # the column the next token's key and value go to
        self.mask = torch.zeros(rows, width + room, dtype=torch.bool, device=mask.device)
        self.mask[:, :width] = mask.bool()
        self.state: list[list[torch.Tensor]] = []
        lm = model.model
        # What a step reads of the weights besides the projections: norm scales (1 + weight), the
        # Gated-DeltaNets' decay rates -exp(A_log).
        self.norm_scales = [(_scale(layer.input_layernorm), _scale(layer.post_attention_layernorm))
                            for layer in lm.layers]
        self.mixer_consts = [-layer.linear_attn.A_log.detach().float().exp() if layer.block_type == "linear_attention"
                             else (_scale(layer.self_attn.q_norm), _scale(layer.self_attn.k_norm))
                             for layer in lm.layers]
        self.final_scale = _scale(lm.norm)
        stack = mask.device.type == "cpu" if stack is None else stack
        self.mlp_in = [_Projection([layer.mlp.gate_proj, layer.mlp.up_proj], stack) for layer in lm.layers]
        self.mixer_in = [_Projection([layer.linear_attn.in_proj_qkv, layer.linear_attn.in_proj_z,
                                      layer.linear_attn.in_proj_b, layer.linear_attn.in_proj_a], stack)
                         if layer.block_type == "linear_attention" else
                         _Projection([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], stack)
                         for layer in lm.layers]
        for i, kind in enumerate(self.config.layer_types):
            if kind == "linear_attention":
                # (B, C, K) the last K convolution inputs; (B, heads, dk, dv) float32
                self.state.append([cache.get_conv_state(i).clone(), cache.get_recurrent_state(i).clone()])
            else:
                keys, values = cache.layers[i].keys, cache.layers[i].values  # (B, kv heads, width, d)
                k = keys.new_zeros(*keys.shape[:2], width + room, keys.shape[-1])
                v = torch.zeros_like(k)
                k[:, :, :width], v[:, :, :width] = keys, values
                self.state.append([k, v])

    def keep(self, index: torch.Tensor) -> None:
        """Keep (and repeat) the rows `index` (B',), in that order."""
        self.mask = self.mask[index]
        self.state = [[t[index] for t in layer] for layer in self.state]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Feed tokens (B,) at text positions (B,); returns the next token's logits (B, V)."""
        if self.width == self.mask.shape[1]:
            raise RuntimeError(f"Qwen35Decoder: no room left after {self.width} columns")
        lm, eps = self.model.model, self.config.rms_norm_eps
        self.mask[:, self.width] = True
        rope = lm.rotary_emb
        freqs = position[:, None].float() * rope.inv_freq.to(position.device)  # (B, rotary / 2)
        angles = torch.cat([freqs, freqs], -1)
        x = lm.embed_tokens(tokens)  # (B, H)
        cos = (angles.cos() * rope.attention_scaling).to(x.dtype)
        sin = (angles.sin() * rope.attention_scaling).to(x.dtype)
        for layer, state, mixer_in, consts, (pre, post), mlp_in in zip(
                lm.layers, self.state, self.mixer_in, self.mixer_consts, self.norm_scales, self.mlp_in):
            h = mixer_in(_norm(x, pre, eps))
            if layer.block_type == "linear_attention":
                x = x + self._delta_net(layer.linear_attn, h, consts, state)
            else:
                x = x + self._attention(layer.self_attn, h, consts, state, cos, sin)
            gate, up = mlp_in(_norm(x, post, eps))
            x = x + layer.mlp.down_proj(F.silu(gate) * up)
        self.width += 1
        return self.model.lm_head(_norm(x, self.final_scale, eps))

    @staticmethod
    def _delta_net(g, projected: list[torch.Tensor], rate: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
        """One Gated-DeltaNet token from its input projections (qkv, z, b, a of (B, ·)) -> (B, H),
        with decay rates `rate` = -exp(A_log) (heads,); updates the convolution window and the
        recurrent state in `state`."""
        qkv, z, b, a = projected
        rows, dtype = qkv.shape[0], qkv.dtype
        window = torch.cat([state[0][:, :, 1:], qkv[:, :, None].to(state[0].dtype)], -1)
        state[0] = window  # (B, C, K)
        mixed = F.silu((window.to(g.conv1d.weight.dtype) * g.conv1d.weight[:, 0]).sum(-1)).to(dtype)
        q, k, v = mixed.float().split([g.key_dim, g.key_dim, g.value_dim], -1)
        q, k = q.view(rows, g.num_k_heads, g.head_k_dim), k.view(rows, g.num_k_heads, g.head_k_dim)
        v = v.view(rows, g.num_v_heads, g.head_v_dim)
        # l2-normalized as transformers does, x * rsqrt(sum(x^2) + 1e-6), which is the RMS norm with
        # eps 1e-6 / dk over sqrt(dk); queries are also divided by sqrt(dk)
        dk = g.head_k_dim
        q = F.rms_norm(q, (dk,), eps=1e-6 / dk) / dk
        k = F.rms_norm(k, (dk,), eps=1e-6 / dk) / dk**0.5
        if g.num_v_heads != g.num_k_heads:  # each query / key head serves consecutive value heads
            q = q.repeat_interleave(g.num_v_heads // g.num_k_heads, 1)
            k = k.repeat_interleave(g.num_v_heads // g.num_k_heads, 1)
        beta = b.sigmoid().float()
        decay = (rate * F.softplus(a.float() + g.dt_bias)).exp()
        s = state[1].float() * decay[..., None, None]  # (B, heads, dk, dv)
        # products summed over dk, as transformers' torch path does (at dk = 16 on a CPU, 1.7x faster
        # than batched (1, dk) x (dk, dv) matmuls)
        delta = (v - (s * k[..., :, None]).sum(-2)) * beta[..., None]
        s = s + k[..., :, None] * delta[..., None, :]
        state[1] = s
        out = (s * q[..., :, None]).sum(-2).to(dtype)  # (B, heads, dv)
        # gated RMSNorm: normalized in float32, scaled in the model's dtype, gated by silu(z) in float32
        z = z.view(rows, g.num_v_heads, g.head_v_dim)
        n = g.norm.weight * F.rms_norm(out.float(), (g.head_v_dim,), eps=g.norm.variance_epsilon).to(dtype)
        return g.out_proj((n * F.silu(z.float())).to(dtype).reshape(rows, -1))

    def _attention(self, a, projected: list[torch.Tensor], scales: tuple[torch.Tensor, torch.Tensor],
                   state: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One full-attention token from its input projections (q with its gate, k, v of (B, ·))
        and its q / k norm scales -> (B, H); writes its key and value into `state`."""
        qg, k, v = projected
        rows, d, eps = qg.shape[0], a.head_dim, self.config.rms_norm_eps
        q, gate = qg.view(rows, -1, 2 * d).split(d, -1)
        q = _norm(q, scales[0], eps)
        k = _norm(k.view(rows, -1, d), scales[1], eps)
        v = v.view(rows, -1, d)
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        state[0][:, :, self.width], state[1][:, :, self.width] = k, v
        end = self.width + 1
        out = F.scaled_dot_product_attention(q[:, :, None], state[0][:, :, :end], state[1][:, :, :end],
                                             attn_mask=self.mask[:, None, None, :end], scale=a.scaling,
                                             enable_gqa=True)
        return a.o_proj(out[:, :, 0].reshape(rows, -1) * gate.reshape(rows, -1).sigmoid())


class _Projection:
    """Linear maps of one input (B, H) -> their outputs: one matmul over their stacked weights
    (`stack`, read now), or one per map over the live weights."""

    def __init__(self, linears: list[torch.nn.Linear], stack: bool):
        self.sizes = [m.out_features for m in linears]
        if not stack:
            self.parts = [(m.weight, m.bias) for m in linears]
            return
        bias = None
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias.detach()
                              for m in linears])
        self.parts = [(torch.cat([m.weight.detach() for m in linears]), bias)]

    def __call__(self, h: torch.Tensor) -> list[torch.Tensor]:
        if len(self.parts) == 1:
            return list(F.linear(h, *self.parts[0]).split(self.sizes, -1))
        return [F.linear(h, w, b) for w, b in self.parts]


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first `cos.shape[-1]` dims of x (B, heads, d) (partial rotary)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat([-rot[..., r // 2 :], rot[..., : r // 2]], -1)
    return torch.cat([rot * cos[:, None] + half * sin[:, None], rest], -1)
