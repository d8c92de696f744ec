"""Compiled memory of the winner-take-all loss and its gradient.

Compares the chunked custom-VJP loss (`loss.wta_loss`) with the naive one that
builds full `[tokens, P, V]` logits (`loss.wta_loss_reference`). Nothing is
run: each function is compiled ahead of time for ShapeDtypeStruct inputs and
XLA's `memory_analysis()` reports the temporary bytes it would allocate.

  python -m fastk_jax.benchmark loss
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastk_jax import loss as loss_lib


def compiled_temp_bytes(fn, *shapes) -> int:
  """Return the temporary bytes of `jax.grad(fn)` compiled for `shapes`."""
  grad_fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
  compiled = grad_fn.lower(*shapes).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def loss_memory_table(embed_dim=768, vocab=50257, batch=8, seq=1024,
                      heads=(1, 4), chunk_size=1024) -> list[dict]:
  """Measure chunked and naive loss+grad temporaries for each P."""
  rows = []
  for num_heads in heads:
    hidden = jax.ShapeDtypeStruct((batch, seq, embed_dim), jnp.float32)
    kernel = jax.ShapeDtypeStruct((num_heads, vocab, embed_dim), jnp.float32)
    targets = jnp.zeros((batch, seq), jnp.int32)

    def chunked(h, w):
      return loss_lib.wta_loss(h, w, None, targets, chunk_size=chunk_size)[0]

    def naive(h, w):
      return loss_lib.wta_loss_reference(h, w, None, targets)

    rows.append({
        "P": num_heads,
        "chunked_bytes": compiled_temp_bytes(chunked, hidden, kernel),
        "naive_bytes": compiled_temp_bytes(naive, hidden, kernel),
        "logits_bytes": batch * seq * num_heads * vocab * 4,
    })
  return rows


def run_loss_benchmark(chunk_sizes=(256, 1024)) -> None:
  """Print the loss memory table at the GPT-2 small head shape."""
  tokens = 8 * 1024
  print(f"Loss + gradient temporaries, d=768, V=50257, {tokens} tokens "
        f"(batch 8 x 1024), float32 (jax {jax.__version__}, "
        f"{jax.devices()[0].platform})")
  print(f"{'P':>2}  {'chunk':>5}  {'full logits':>12}  {'naive':>12}  "
        f"{'chunked':>12}  {'naive/chunked':>13}")
  gib = lambda b: f"{b / 2**30:8.2f} GiB"
  for chunk_size in chunk_sizes:
    for row in loss_memory_table(chunk_size=chunk_size):
      print(f"{row['P']:>2}  {chunk_size:>5}  {gib(row['logits_bytes']):>12}  "
            f"{gib(row['naive_bytes']):>12}  {gib(row['chunked_bytes']):>12}  "
            f"{row['naive_bytes'] / row['chunked_bytes']:>12.1f}x")
