"""The LLaMA decoder (Touvron et al., 2023): pre-norm RMSNorm, SwiGLU, rotary embeddings, no biases.

Parameter names and the rotary layout are those of Hugging Face's `LlamaForCausalLM`, so its checkpoints load
unchanged and PEFT adapters name the same modules (`model.layers.0.self_attn.q_proj`, ...).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels, packed_attention
from .config import LlamaConfig

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)  # in fp32 whatever the compute dtype, as transformers

    def recompute_output(self, x: torch.Tensor, y: torch.Tensor):
        """A context in which y = self(x) is recomputed for the backward pass instead of saved."""
        weight = self.weight.detach()
        if weight.shape != x.shape[-1:]:  # already partitioned away again (DeepSpeed ZeRO-3): keep y
            return contextlib.nullcontext()
        weight = weight.clone()  # (dim,): the value now, whatever happens to the parameter later
        ops = kernels.ops_for(x)
        return kernels.recompute_saved(y, lambda: kernels.rms_norm_forward(x, weight, self.eps, ops))


class Linear(nn.Linear):
    """nn.Linear (PEFT adapts it as one), with a faster product for the few rows of decoding on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight) if self.bias is None else super().forward(x)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The rotation frequency of each pair of dimensions, (head_dim/2,) fp32, as transformers computes them:
    theta^(-2i/d), then for Llama 3.1's "llama3" scaling the low frequencies (wavelengths beyond the original
    context / low_freq_factor) divided by `factor`, the high ones (below original / high_freq_factor) kept, and
    those between blended smoothly; "linear" scaling divides all of them by `factor`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high, old = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                   scaling: dict | None = None):
    """cos and sin of each position's rotation angles, (B, T, head_dim), in HF's half-split layout."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, position_ids.device)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class KVCache:
    """Keys and values of all layers for incremental decoding; `length` slots are filled."""

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions for a cache of {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = kernels.rotary(q, cos, sin), kernels.rotary(k, cos, sin)  # pairs (i, i + head_dim/2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv_heads, S, head_dim), S = cached + T
        # mask: None means plain causal (or, for a single new token, attend to everything cached).
        if isinstance(mask, packed_attention.PackedPlan):  # packed documents on CUDA: no (T, T) mask
            out = packed_attention.packed_attention(q, k, v, mask)  # (B, n_heads, T, head_dim)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                enable_gqa=self.n_kv_heads != self.n_heads)  # (B, n_heads, T, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, hidden_dim)
        h = kernels.swiglu(gate, up)  # silu(gate) * up
        # down_proj saves its input for its weight gradient: keep gate and up (saved anyway) and recompute it.
        ops = kernels.ops_for(gate)
        with kernels.recompute_saved(h, lambda: kernels.swiglu_forward(gate, up, ops)):
            return self.down_proj(h)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        h = self.input_layernorm(x)
        # The linear layers save their input h for their weight gradients: recompute it from x (saved anyway).
        with self.input_layernorm.recompute_output(x, h):
            x = x + self.self_attn(h, cos, sin, mask, cache, layer)
        h = self.post_attention_layernorm(x)
        with self.post_attention_layernorm.recompute_output(x, h):
            return x + self.mlp(h)


class LMHead(Linear):
    """The output projection. With `targets` it returns the summed cross-entropy, computed in chunks."""

    chunk_size = 512  # rows per chunk; the largest temporary is chunk_size x vocab_size fp32 values

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(h)
        return kernels.linear_cross_entropy(h, self.weight, targets, self.chunk_size)


def _token_rows(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(frozen weight, row indices, trained rows) of a layer wrapped by PEFT's trainable tokens, for computing the
    rows apart from the frozen matrix; None in every other case (PEFT's own forward then merges the matrix)."""
    adapter = getattr(module, "token_adapter", None)
    if adapter is None or adapter.disable_adapters or adapter.merged or len(adapter.active_adapters) != 1:
        return None
    name = adapter.active_adapters[0]
    weight, trained = adapter.base_layer.weight, adapter.trainable_tokens_delta[name]
    indices = adapter.token_indices[name]
    if (weight.requires_grad or hasattr(weight, "ds_id") or hasattr(trained, "ds_id")
            or len(set(indices)) < len(indices)):
        return None  # a trained base, ZeRO-3 partitions, or a repeated row (PEFT's index_copy sums their gradients)
    return weight, torch.tensor(indices, device=weight.device), trained


def _hooks_allow_fast_path(module: nn.Module) -> bool:
    """No hook that could change what the layer is called with: pre-hooks (PEFT's mixed-adapter batches), global
    hooks, hooks on PEFT's inner layer. The wrapper's own forward hooks (PEFT's make_inputs_require_grad,
    NEFTune's noise) are run by `_embed` on its output."""
    glob = nn.modules.module
    inner = module.token_adapter
    return not (module._forward_pre_hooks or inner._forward_pre_hooks or inner._forward_hooks
                or getattr(glob, "_global_forward_hooks", None) or getattr(glob, "_global_forward_pre_hooks", None))


class Transformer(nn.Module):
    # With tie_word_embeddings the head is the embedding matrix; PEFT reads this (as transformers spells it) to
    # keep trainable token rows tied.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.dim),
            layers=nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers)),
            norm=RMSNorm(config.dim, config.norm_eps),
        ))
        self.lm_head = LMHead(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        self.activation_checkpointing = False
        self.kernels: str | None = None  # the fused ops' backend (llama_core.kernels.backend); None: the caller's

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, reduction: str = "mean", last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab), or with `labels` the next-token loss.

        labels: (B, T) aligned with input_ids (shifted inside, as in transformers); IGNORE_INDEX is not trained.
        reduction: "mean" over the trained tokens, or "sum" (divide by `count_targets(labels)` yourself: gradient
            accumulation normalizes by the tokens of the whole accumulation window).
        position_ids: (B, T). Without a cache, a position that does not follow its predecessor by one starts a new
            document: packed rows attend within each document only (block-diagonal causal mask).
        attention_mask: (B, S) 1 for real tokens, 0 for padding, over all S = cached + T key positions.
        cache: a KVCache; its `length` slots are attended to and the new keys/values appended.
        last_only: logits of the last position only, (B, 1, vocab) (decoding needs no more).
        """
        with kernels.backend(self.kernels):
            return self._forward(input_ids, labels, position_ids, attention_mask, cache, reduction, last_only)

    def _forward(self, input_ids, labels, position_ids, attention_mask, cache, reduction, last_only):
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is not None and position_ids.shape != (B, T):
            raise ValueError(f"position_ids must be (B, T) = {(B, T)}, got {tuple(position_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != (B, start + T):
            raise ValueError(f"attention_mask must be (B, cached + T) = {(B, start + T)}, got "
                             f"{tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
            packed = False
        else:
            packed = cache is None
        h = self._embed(input_ids)  # (B, T, dim)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype,
                                  self.config.rope_scaling)
        impl = None
        if packed and attention_mask is None and input_ids.is_cuda:  # flash varlen / flex document mask
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else h.dtype
            impl = packed_attention.choose_impl(input_ids.device, dtype, self.config.head_dim)
        if impl is not None:
            mask = packed_attention.packed_plan(position_ids, impl)
        else:
            mask = attention_mask_for(position_ids if packed else None, attention_mask, start, T, input_ids.device)
        for i, layer in enumerate(self.model.layers):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        if labels is None:
            return self.lm_head(self.model.norm(h[:, -1:] if last_only else h))
        h = self.model.norm(h)
        # Position t predicts token t+1; only rows with a target go through the output projection.
        targets = labels[:, 1:].reshape(-1)
        keep = targets != IGNORE_INDEX
        rows = h[:, :-1].reshape(-1, h.shape[-1])[keep]
        if isinstance(self.lm_head, LMHead):
            loss = self.lm_head(rows, targets[keep])
        elif (token_rows := _token_rows(self.lm_head)) is not None:  # PEFT's trainable token rows, unmerged
            weight, index, trained = token_rows
            loss = kernels.linear_cross_entropy(rows, weight, targets[keep], LMHead.chunk_size, index, trained)
        else:  # wrapped by PEFT otherwise: its forward knows no targets, its weight is the merged one
            loss = kernels.linear_cross_entropy(rows, self.lm_head.weight, targets[keep], LMHead.chunk_size)
        if reduction == "sum":
            return loss
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return loss / keep.sum().clamp(min=1)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = self.model.embed_tokens
        token_rows = _token_rows(embed)
        if token_rows is None or not _hooks_allow_fast_path(embed):
            return embed(input_ids)
        weight, index, trained = token_rows  # PEFT's trainable token rows: no merged copy of the whole matrix
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slot[index] = torch.arange(index.numel(), device=weight.device)
        slot = slot[input_ids]  # (B, T): the token's trained row, or -1
        h = F.embedding(input_ids, weight)
        # F.embedding, not trained[slot]: indexing's backward adds with atomics on CPU, in no fixed order
        h = torch.where((slot >= 0)[..., None], F.embedding(slot.clamp(min=0), trained).to(h.dtype), h)
        for key, hook in embed._forward_hooks.items():  # as calling the module would (nn.Module._call_impl)
            with_kwargs = key in embed._forward_hooks_with_kwargs
            out = hook(embed, (input_ids,), {}, h) if with_kwargs else hook(embed, (input_ids,), h)
            h = h if out is None else out
        return h

    def tie_weights(self) -> None:
        """With tie_word_embeddings, make the head the embedding's parameter (again: `to_empty` unties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters, the tied embedding and head counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, weight.dtype, weight.device)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None, std: float = 0.02) -> None:
        """Random initialization (normal(0, std) linears and embeddings, unit norms), repeatable with `seed`."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():  # a tied head is the embedding: named once
            p.copy_(initial_value(name, p.shape, generator, std))


def initial_value(name: str, shape, generator: torch.Generator | None, std: float = 0.02) -> torch.Tensor:
    """The initial value of one parameter (fp32, CPU); called in `named_parameters` order it is repeatable."""
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return torch.ones(shape)
    return torch.randn(shape, generator=generator) * std


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of trained tokens in `labels` (after the shift): the denominator of the mean loss."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def attention_mask_for(position_ids, attention_mask, start: int, T: int, device):
    """A boolean (B, 1, T, S) mask, True where a query may attend to a key, or None for plain causal attention."""
    if position_ids is None and attention_mask is None:
        return None if start == 0 or T == 1 else _causal(start, T, device)[None, None]
    if position_ids is not None:  # packed documents: a new one starts wherever the positions do not continue
        doc = packed_attention.document_ids(position_ids)  # (B, T)
        mask = (doc[:, :, None] == doc[:, None, :]) & _causal(0, T, device)
    else:
        mask = _causal(start, T, device).expand(attention_mask.shape[0], T, start + T)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, :].bool()
        # A padding query with no visible key would give NaN; let every query see itself.
        queries = torch.arange(start, start + T, device=device)
        mask = mask | (queries[:, None] == torch.arange(start + T, device=device)[None, :])
    return mask[:, None]


def _causal(start: int, T: int, device) -> torch.Tensor:
    """(T, start + T): query i (absolute position start + i) sees keys 0 .. start + i."""
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
