"""GPT-2-family decoder whose LM head is P parallel heads.

The trunk follows GPT-2 exactly, so its weights map one to one. It has
pre-LayerNorm blocks (epsilon 1e-5), learned absolute positions, GELU with the
tanh approximation and biases on every projection and LayerNorm. Dropout
follows the embeddings, the attention weights and each residual branch. With P = 1 and a
tied head the model is a standard GPT-2.

Limits: no rotary embeddings, no flash attention, and the KV cache holds the
whole `max_len` window; attention is O(T^2) in memory per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fastk_jax import heads as heads_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyperparameters (a plain copy of `config.model`)."""
  vocab_size: int
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 256
  mlp_ratio: int = 4
  max_len: int = 256
  dropout: float = 0.0
  num_lm_heads: int = 4
  head_bias: bool = False
  tie_pilot_head: bool = True
  head_init_noise: float = 0.02
  dtype: str = "float32"

  @classmethod
  def from_config(cls, model_config, vocab_size: int) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in model_config.to_dict().items() if k in fields}
    values["vocab_size"] = vocab_size
    return cls(**values)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]


def _dense(in_features, out_features, axes, *, rngs, std=0.02):
  return nnx.Linear(
      in_features, out_features,
      kernel_init=nnx.initializers.normal(std),
      kernel_metadata={"logical_axes": axes},
      bias_metadata={"logical_axes": axes[1:]},
      rngs=rngs)


def _layer_norm(dim, *, rngs):
  return nnx.LayerNorm(
      dim, epsilon=1e-5,
      scale_metadata={"logical_axes": ("embed",)},
      bias_metadata={"logical_axes": ("embed",)},
      rngs=rngs)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with an optional KV cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.embed_dim
    # GPT-2 scales the residual projections' init by 1/sqrt(2 * layers).
    residual_std = 0.02 / (2 * cfg.num_layers) ** 0.5
    self.qkv = _dense(d, 3 * d, ("embed", "qkv"), rngs=rngs)
    self.out = _dense(d, d, ("qkv", "embed"), rngs=rngs, std=residual_std)
    self.attn_dropout = nnx.Dropout(cfg.dropout)
    self.resid_dropout = nnx.Dropout(cfg.dropout)
    self.num_heads = cfg.num_heads
    self.dtype = cfg.compute_dtype

  def __call__(self, x, *, kv_mask, cache=None, cache_index=None,
               deterministic=True, rngs=None):
    batch, length, dim = x.shape
    head_dim = dim // self.num_heads

    qkv = self.qkv(x.astype(self.dtype))  # [B, T, 3d]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q = q.reshape(batch, length, self.num_heads, head_dim)  # [B, T, H, Dh]
    k = k.reshape(batch, length, self.num_heads, head_dim)
    v = v.reshape(batch, length, self.num_heads, head_dim)

    # With a cache, the new keys and values go to slots [cache_index, +T) and
    # the queries attend over the whole cache window.
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(
          cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(
          cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
      cache = {"k": k, "v": v}
      query_slots = cache_index + jnp.arange(length)
    else:
      query_slots = jnp.arange(length)
    key_slots = jnp.arange(k.shape[1])

    # Causal mask by slot, and padding slots (kv_mask False) are never keys.
    mask = query_slots[:, None] >= key_slots[None, :]  # [T, S]
    mask = mask[None, None] & kv_mask[:, None, None, :]  # [B, 1, T, S]

    scores = jnp.einsum("bthd,bshd->bhts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(head_dim).astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)  # [B, H, T, S]
    weights = self.attn_dropout(weights, deterministic=deterministic, rngs=rngs)
    y = jnp.einsum("bhts,bshd->bthd", weights.astype(self.dtype),
                   v.astype(self.dtype))
    y = y.reshape(batch, length, dim)
    y = self.resid_dropout(self.out(y), deterministic=deterministic, rngs=rngs)
    return y, cache


class MLP(nnx.Module):
  """GPT-2 feed-forward block: Linear, tanh-approximated GELU, Linear."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.embed_dim
    hidden = cfg.mlp_ratio * d
    residual_std = 0.02 / (2 * cfg.num_layers) ** 0.5
    self.fc = _dense(d, hidden, ("embed", "mlp"), rngs=rngs)
    self.proj = _dense(hidden, d, ("mlp", "embed"), rngs=rngs, std=residual_std)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.dtype = cfg.compute_dtype

  def __call__(self, x, *, deterministic=True, rngs=None):
    h = jax.nn.gelu(self.fc(x.astype(self.dtype)), approximate=True)
    return self.dropout(self.proj(h), deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.ln_1 = _layer_norm(cfg.embed_dim, rngs=rngs)
    self.attn = CausalSelfAttention(cfg, rngs=rngs)
    self.ln_2 = _layer_norm(cfg.embed_dim, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, *, kv_mask, cache=None, cache_index=None,
               deterministic=True, rngs=None):
    y, cache = self.attn(self.ln_1(x), kv_mask=kv_mask, cache=cache,
                         cache_index=cache_index, deterministic=deterministic,
                         rngs=rngs)
    x = x + y.astype(x.dtype)
    x = x + self.mlp(self.ln_2(x), deterministic=deterministic,
                     rngs=rngs).astype(x.dtype)
    return x, cache


class GPT(nnx.Module):
  """GPT-2 trunk plus P LM heads.

  `__call__` returns final hidden states, not logits: the winner-take-all loss
  and Fast-K decoding each read the heads in their own way, and the full
  `[batch, seq, P, V]` logits are too large to build during training.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.embed_dim
    if cfg.embed_dim % cfg.num_heads:
      raise ValueError(
          f"model.embed_dim={cfg.embed_dim} must be divisible by "
          f"model.num_heads={cfg.num_heads}.")
    self.lm_heads = heads_lib.LMHeads(
        cfg.num_lm_heads, cfg.vocab_size, d, use_bias=cfg.head_bias,
        init_noise=cfg.head_init_noise, rngs=rngs)
    # A tied pilot head means head 0 doubles as the token embedding, exactly
    # like GPT-2's wte/lm_head sharing, so no separate table is stored.
    if cfg.tie_pilot_head:
      self.wte = None
    else:
      self.wte = nnx.Param(
          0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, d)),
          logical_axes=("vocab", "embed"))
    self.wpe = nnx.Param(
        0.01 * jax.random.normal(rngs.params(), (cfg.max_len, d)),
        logical_axes=(None, "embed"))
    self.embed_dropout = nnx.Dropout(cfg.dropout)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.ln_f = _layer_norm(d, rngs=rngs)

  def token_embedding(self):
    """Return the `[V, d]` token embedding table."""
    if self.wte is None:
      return self.lm_heads.kernel[0]
    return self.wte[...]

  def init_cache(self, batch_size: int, max_len: int | None = None,
                 dtype=None) -> list[dict[str, Any]]:
    """Return an empty KV cache: per layer, k and v `[B, S, H, Dh]`."""
    cfg = self.cfg
    length = max_len or cfg.max_len
    shape = (batch_size, length, cfg.num_heads, cfg.embed_dim // cfg.num_heads)
    dtype = dtype or cfg.compute_dtype
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(cfg.num_layers)]

  def __call__(self, tokens, *, positions=None, kv_mask=None, cache=None,
               cache_index=None, deterministic=True, rngs=None):
    """Run the trunk.

    Args:
      tokens: `[B, T]` int token ids.
      positions: `[B, T]` position ids; defaults to 0..T-1 (or, with a cache,
        `cache_index`..). Left-padded batches pass per-row positions.
      kv_mask: `[B, S]` bool, False for key slots to ignore (padding). S is the
        cache length with a cache, else T.
      cache: per-layer KV cache from `init_cache`, or None.
      cache_index: int32 scalar, the cache slot of `tokens[:, 0]`.
      deterministic: disables dropout when True.
      rngs: `nnx.Rngs` with a "dropout" stream, needed when not deterministic.

    Returns:
      (hidden `[B, T, d]` after the final LayerNorm, updated cache or None).
    """
    batch, length = tokens.shape
    if cache is not None and cache_index is None:
      cache_index = jnp.int32(0)
    if positions is None:
      start = 0 if cache is None else cache_index
      positions = jnp.broadcast_to(start + jnp.arange(length), (batch, length))
    if kv_mask is None:
      slots = length if cache is None else cache[0]["k"].shape[1]
      kv_mask = jnp.ones((batch, slots), bool)

    x = jnp.take(self.token_embedding(), tokens, axis=0)  # [B, T, d]
    x = x + jnp.take(self.wpe[...], positions, axis=0)
    x = self.embed_dropout(x, deterministic=deterministic, rngs=rngs)

    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else cache[i]
      x, layer_cache = block(x, kv_mask=kv_mask, cache=layer_cache,
                             cache_index=cache_index,
                             deterministic=deterministic, rngs=rngs)
      if new_cache is not None:
        new_cache.append(layer_cache)

    hidden = self.ln_f(x)
    return hidden, new_cache

  def logits(self, hidden):
    """Return every head's full logits `[..., P, V]`. Small inputs only."""
    return self.lm_heads(hidden, self.cfg.compute_dtype)


def create_model(model_config, vocab_size: int, seed: int) -> GPT:
  """Build a GPT from `config.model` with parameters drawn from `seed`."""
  cfg = ModelConfig.from_config(model_config, vocab_size)
  return GPT(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
