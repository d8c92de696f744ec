"""Fast-K and dense decoding, pilot strategies and compiled generation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastk_jax import config_lib
from fastk_jax import decoding
from fastk_jax import generate as generate_lib
from fastk_jax import heads as heads_lib
from fastk_jax import model as model_lib

VOCAB = 48
DIM = 16


def _heads(num_heads=3, bias=True, seed=0):
  """Random heads scaled so that the distributions are far from uniform."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  kernel = jax.random.normal(k1, (num_heads, VOCAB, DIM))
  bias_array = 0.5 * jax.random.normal(k2, (num_heads, VOCAB)) if bias else None
  return kernel, bias_array


def _hidden(rows=6, seed=1):
  return 0.5 * jax.random.normal(jax.random.key(seed), (rows, DIM))


@functools.lru_cache(maxsize=None)
def _model(num_lm_heads=3):
  c = config_lib.base_config()
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.embed_dim = DIM
  c.model.max_len = 40
  c.model.num_lm_heads = num_lm_heads
  c.model.head_init_noise = 0.5  # Heads that disagree often.
  return model_lib.create_model(c.model, VOCAB, seed=0)


def _decode_config(**overrides):
  c = config_lib.base_config().decode
  c.top_k = 6
  c.max_new_tokens = 8
  for field, value in overrides.items():
    c[field] = value
  return c


# --- One step -----------------------------------------------------------------


@pytest.mark.parametrize("combine", ["max", "mean"])
def test_fastk_full_k_equals_dense(combine):
  kernel, bias = _heads()
  weights = decoding.split_heads(kernel, bias)
  hidden = _hidden()
  pilots = jnp.array([0, 1, 2, 0, 1, 2])
  fastk = decoding.fastk_step(hidden, weights, pilots, top_k=VOCAB,
                              combine=combine)
  dense = decoding.dense_step(hidden, weights, pilots, top_k=VOCAB,
                              combine=combine)
  np.testing.assert_allclose(fastk.probs, dense.probs, atol=1e-6)
  np.testing.assert_array_equal(fastk.greedy_token, dense.greedy_token)
  np.testing.assert_array_equal(fastk.token_head, dense.token_head)
  np.testing.assert_array_equal(fastk.greedy_head, dense.greedy_head)
  np.testing.assert_allclose(fastk.head_entropy, dense.head_entropy, atol=1e-5)


@pytest.mark.parametrize("decoder", ["fastk", "dense"])
@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize("combine", ["max", "mean"])
def test_distribution_is_normalised(decoder, num_heads, combine):
  kernel, bias = _heads(num_heads)
  hidden = _hidden()
  for pilots in (jnp.int32(num_heads - 1), jnp.arange(6) % num_heads):
    probs, shortlist = decoding.next_token_distribution(
        hidden, kernel, bias, decoder=decoder, top_k=5, pilot_heads=pilots,
        combine=combine)
    assert probs.shape == (6, VOCAB)
    assert shortlist.shape == (6, 5)
    assert np.all(np.asarray(probs) >= 0.0)
    np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, atol=1e-5)


def test_fastk_distribution_follows_rule():
  kernel, bias = _heads()
  hidden = _hidden()
  pilots = jnp.array([2, 2, 0, 1, 0, 1])
  top_k = 5
  probs, shortlist = decoding.next_token_distribution(
      hidden, kernel, bias, decoder="fastk", top_k=top_k, pilot_heads=pilots)
  probs, shortlist = np.asarray(probs), np.asarray(shortlist)
  logits = np.asarray(heads_lib.dense_logits(hidden, kernel, bias))  # [N, P, V]
  for row in range(6):
    head_probs = np.asarray(jax.nn.softmax(logits[row], axis=-1))  # [P, V]
    pilot_probs = head_probs[pilots[row]]
    inside = np.zeros(VOCAB, bool)
    inside[shortlist[row]] = True
    # Outside the shortlist: the pilot's own probabilities.
    np.testing.assert_allclose(probs[row, ~inside], pilot_probs[~inside],
                               rtol=1e-5, atol=1e-7)
    # Inside: the pilot's mass on S, split by the max of renormalised heads.
    mass = pilot_probs[inside].sum()
    renormalised = head_probs[:, shortlist[row]]
    renormalised /= renormalised.sum(axis=-1, keepdims=True)
    score = renormalised.max(axis=0)
    np.testing.assert_allclose(probs[row, shortlist[row]],
                               mass * score / score.sum(), rtol=1e-5)


def test_greedy_is_best_head_token_pair():
  kernel, bias = _heads()
  weights = decoding.split_heads(kernel, bias)
  hidden = _hidden()
  out = decoding.fastk_step(hidden, weights, jnp.int32(1), top_k=4)
  logits = np.asarray(heads_lib.dense_logits(hidden, kernel, bias))
  for row in range(6):
    ids = np.asarray(out.shortlist[row])
    renormalised = np.asarray(jax.nn.softmax(logits[row][:, ids], axis=-1))
    head, index = np.unravel_index(np.argmax(renormalised), renormalised.shape)
    assert int(out.greedy_token[row]) == ids[index]
    assert int(out.greedy_head[row]) == head
    assert int(out.token_head[row, ids[index]]) == head
    assert int(out.greedy_token[row]) == int(np.argmax(out.probs[row]))


def test_pilot_argmax_in_shortlist():
  kernel, bias = _heads()
  weights = decoding.split_heads(kernel, bias)
  hidden = _hidden(rows=20)
  pilots = jnp.arange(20) % 3
  out = decoding.fastk_step(hidden, weights, pilots, top_k=3)
  logits = np.asarray(heads_lib.dense_logits(hidden, kernel, bias))
  pilot_argmax = np.argmax(logits[np.arange(20), np.asarray(pilots)], axis=-1)
  shortlist = np.asarray(out.shortlist)
  for row in range(20):
    assert pilot_argmax[row] in shortlist[row]
  np.testing.assert_array_equal(shortlist[:, 0], pilot_argmax)


def test_gathered_scores_equal_full_logits():
  kernel, bias = _heads()
  hidden = _hidden()
  ids = jnp.array([[0, 5, 47], [3, 3, 1], [46, 2, 9],
                   [7, 8, 9], [10, 0, 1], [4, 44, 45]])
  full = heads_lib.dense_logits(hidden, kernel, bias)  # [N, P, V]
  expected = jnp.take_along_axis(full, ids[:, None, :], axis=-1)
  gathered = decoding.gather_shortlist_logits(hidden, kernel, bias, ids)
  np.testing.assert_allclose(gathered, expected, rtol=1e-5, atol=1e-5)
  reference = heads_lib.gather_logits(hidden, kernel, bias, ids)  # [N, P, K]
  np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)


def test_per_row_pilot_logits():
  kernel, bias = _heads(num_heads=4)
  weights = decoding.split_heads(kernel, bias)
  hidden = _hidden()
  full = np.asarray(heads_lib.dense_logits(hidden, kernel, bias))
  # Head 3 is used by no row, so its lax.cond branch is skipped.
  pilots = np.array([0, 2, 2, 1, 0, 1])
  logits = decoding.pilot_logits(hidden, weights, jnp.asarray(pilots))
  np.testing.assert_allclose(logits, full[np.arange(6), pilots], rtol=1e-5,
                             atol=1e-5)
  scalar = decoding.pilot_logits(hidden, weights, jnp.int32(3))
  np.testing.assert_allclose(scalar, full[:, 3], rtol=1e-5, atol=1e-5)


def test_single_head_is_softmax():
  kernel, bias = _heads(num_heads=1)
  hidden = _hidden()
  expected = jax.nn.softmax(heads_lib.dense_logits(hidden, kernel, bias)[:, 0])
  for decoder in ("fastk", "dense"):
    probs, _ = decoding.next_token_distribution(
        hidden, kernel, bias, decoder=decoder, top_k=7, pilot_heads=0)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)


def test_top_p_keeps_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  filtered = np.asarray(decoding.top_p_filter(logits, 0.7))
  assert np.isfinite(filtered[0, :2]).all()
  assert np.isneginf(filtered[0, 2:]).all()
  # A tiny nucleus keeps only the most likely token.
  tiny = np.asarray(decoding.top_p_filter(logits, 1e-3))
  assert np.isfinite(tiny[0]).sum() == 1


# --- Pilot strategies ---------------------------------------------------------


def test_utilization_pilot():
  assert decoding.utilization_pilot(np.array([3, 9, 9, 1])) == 1
  assert decoding.utilization_pilot(np.array([0, 0, 5])) == 2
  assert decoding.utilization_pilot(None) == 0


def test_round_robin_pilot():
  pilots = [int(decoding.round_robin_pilot(step, 3)) for step in range(7)]
  assert pilots == [0, 1, 2, 0, 1, 2, 0]


def test_lowest_entropy_pilot():
  # Row 0: head 2 is peaked; row 1: head 0 is peaked; row 2: heads 0 and 1 tie.
  shortlist_logits = jnp.array([
      [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [9.0, 0.0, 0.0]],
      [[0.0, 8.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]],
      [[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]],
  ])
  entropy = decoding.shortlist_entropy(shortlist_logits)  # [3, 3]
  np.testing.assert_allclose(entropy[0, 0], np.log(3.0), rtol=1e-6)
  pilots = decoding.lowest_entropy_pilot(entropy)
  np.testing.assert_array_equal(pilots, [2, 0, 0])


def test_select_pilot_strategies():
  entropy = jnp.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.4]])
  kwargs = dict(num_heads=3, pilot_head=2, utilization_head=1,
                previous_entropy=entropy)
  assert int(decoding.select_pilot("fixed", step=5, **kwargs)) == 2
  assert int(decoding.select_pilot("utilization", step=5, **kwargs)) == 1
  assert int(decoding.select_pilot("round_robin", step=4, **kwargs)) == 1
  first = decoding.select_pilot("lowest_entropy", step=0, **kwargs)
  np.testing.assert_array_equal(first, [1, 1])  # Falls back to utilization.
  later = decoding.select_pilot("lowest_entropy", step=3, **kwargs)
  np.testing.assert_array_equal(later, [1, 0])
  with pytest.raises(ValueError, match="config.decode.pilot"):
    decoding.select_pilot("busiest", step=0, **kwargs)


def test_teacher_forced_lowest_entropy():
  kernel, bias = _heads()
  hidden = 0.5 * jax.random.normal(jax.random.key(2), (2, 7, DIM))
  win_counts = np.array([1, 1, 4])
  pilots = decoding.teacher_forced_pilots(
      hidden, kernel, bias, pilot="lowest_entropy", top_k=4,
      win_counts=win_counts)
  # Reference: one position at a time, straight from the full logits.
  logits = np.asarray(heads_lib.dense_logits(hidden, kernel, bias))  # [B,T,P,V]
  for row in range(2):
    pilot = 2
    for t in range(7):
      assert int(pilots[row, t]) == pilot
      ids = np.argsort(-logits[row, t, pilot])[:4]
      entropy = decoding.shortlist_entropy(logits[row, t][None, :, ids])[0]
      pilot = int(np.argmin(entropy))


def test_teacher_forced_simple_strategies():
  kernel, bias = _heads()
  hidden = jnp.zeros((2, 5, DIM))
  round_robin = decoding.teacher_forced_pilots(
      hidden, kernel, bias, pilot="round_robin", top_k=4)
  np.testing.assert_array_equal(round_robin, [[0, 1, 2, 0, 1]] * 2)
  fixed = decoding.teacher_forced_pilots(
      hidden, kernel, bias, pilot="fixed", top_k=4, pilot_head=2)
  np.testing.assert_array_equal(fixed, np.full((2, 5), 2))
  utilization = decoding.teacher_forced_pilots(
      hidden, kernel, bias, pilot="utilization", top_k=4,
      win_counts=np.array([0, 7, 2]))
  np.testing.assert_array_equal(utilization, np.full((2, 5), 1))


# --- Validation ---------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("pilot", "busiest", "config.decode.pilot='busiest'"),
    ("pilot_head", 3, "config.decode.pilot_head=3"),
    ("top_k", 0, "config.decode.top_k=0"),
    ("top_k", VOCAB + 1, f"config.decode.top_k={VOCAB + 1}"),
    ("decoder", "sparse", "config.decode.decoder='sparse'"),
    ("combine", "sum", "config.decode.combine='sum'"),
    ("top_p", 0.0, "config.decode.top_p=0.0"),
])
def test_invalid_decode_config(field, value, message):
  config = config_lib.base_config()
  config.model.num_lm_heads = 3
  config.decode.top_k = 6
  config.decode[field] = value
  with pytest.raises(ValueError, match=message) as error:
    decoding.validate_decode_config(config, VOCAB)
  assert "Invalid" in str(error.value)
  # generate() runs the same check before tracing anything.
  with pytest.raises(ValueError, match=message):
    decoding.generate(_model(), [[1, 2]], config.decode)


def test_next_token_distribution_rejects_large_k():
  kernel, bias = _heads()
  with pytest.raises(ValueError, match="top_k"):
    decoding.next_token_distribution(
        _hidden(), kernel, bias, decoder="fastk", top_k=VOCAB + 1,
        pilot_heads=0)


def test_generate_rejects_long_prompt():
  with pytest.raises(ValueError, match="model.max_len=40"):
    decoding.generate(_model(), [list(range(35))], _decode_config())


# --- Generation ---------------------------------------------------------------


def _greedy_without_cache(model, prompt, decode_config, win_counts):
  """Greedy decoding that reruns the whole prefix at every step."""
  settings = decoding.DecodeSettings.from_config(decode_config)
  kernel, bias = model.lm_heads.weights()
  weights = decoding.split_heads(kernel, bias)
  buffer_len = model.cfg.max_len

  @jax.jit
  def last_hidden(tokens, length):
    # Causal attention: the zeros after `length` do not change earlier slots.
    hidden, _ = model(tokens[None])
    return hidden[0, length - 1]

  tokens = list(prompt)
  entropy = jnp.zeros((1, model.cfg.num_lm_heads))
  out_tokens, out_heads, out_pilots = [], [], []
  for step in range(settings.max_new_tokens):
    buffer = np.zeros(buffer_len, np.int32)
    buffer[:len(tokens)] = tokens
    hidden = last_hidden(jnp.asarray(buffer), len(tokens))[None]
    pilot = decoding.select_pilot(
        settings.pilot, step=step, num_heads=model.cfg.num_lm_heads,
        pilot_head=settings.pilot_head,
        utilization_head=decoding.utilization_pilot(win_counts),
        previous_entropy=entropy)
    out = decoding.decode_step(hidden, weights, pilot, decoder=settings.decoder,
                               top_k=settings.top_k, combine=settings.combine)
    token = int(out.greedy_token[0])
    out_tokens.append(token)
    out_heads.append(int(out.token_head[0, token]))
    out_pilots.append(int(jnp.broadcast_to(pilot, (1,))[0]))
    entropy = out.head_entropy
    tokens.append(token)
  return out_tokens, out_heads, out_pilots


@pytest.mark.parametrize("decoder, pilot", [
    ("fastk", "lowest_entropy"),
    ("dense", "round_robin"),
])
def test_cached_generation_equals_recompute(decoder, pilot):
  model = _model()
  win_counts = np.array([0, 3, 1])
  decode_config = _decode_config(decoder=decoder, pilot=pilot)
  prompts = [[5, 17, 3], [9, 1, 2, 40, 33, 7, 7, 21], [30]]
  out = decoding.generate(model, prompts, decode_config, win_counts=win_counts)
  np.testing.assert_array_equal(out.num_tokens, [8, 8, 8])
  for row, prompt in enumerate(prompts):
    tokens, heads, pilots = _greedy_without_cache(
        model, prompt, decode_config, win_counts)
    np.testing.assert_array_equal(out.tokens[row], tokens)
    np.testing.assert_array_equal(out.heads[row], heads)
    np.testing.assert_array_equal(out.pilots[row], pilots)


def test_sampling_reproducible_for_seed():
  model = _model()
  prompts = [[5, 17, 3], [9, 1]]
  config = _decode_config(temperature=1.0, top_p=0.95, max_new_tokens=12)
  first = decoding.generate(model, prompts, config)
  second = decoding.generate(model, prompts, config)
  np.testing.assert_array_equal(first.tokens, second.tokens)
  np.testing.assert_array_equal(first.heads, second.heads)
  assert np.all((first.heads >= 0) & (first.heads < 3))
  config.seed = 1
  other = decoding.generate(model, prompts, config)
  assert not np.array_equal(first.tokens, other.tokens)


def test_eos_stops_row():
  model = _model()
  prompts = [[5, 17, 3], [30, 2]]
  config = _decode_config()
  free = decoding.generate(model, prompts, config)
  # Use row 0's third token as EOS; the test needs row 1 never to produce it.
  eos_id = int(free.tokens[0, 2])
  assert eos_id not in free.tokens[1], "choose prompts whose rows differ"
  stopped = decoding.generate(model, prompts, config, eos_id=eos_id)
  first_eos = list(free.tokens[0]).index(eos_id)
  assert stopped.num_tokens[0] == first_eos + 1
  np.testing.assert_array_equal(stopped.tokens[0, :first_eos + 1],
                                free.tokens[0, :first_eos + 1])
  assert np.all(stopped.tokens[0, first_eos + 1:] == eos_id)
  assert np.all(stopped.heads[0, first_eos + 1:] == -1)
  assert np.all(stopped.pilots[0, first_eos + 1:] == -1)
  # The other row never generates the EOS token, so it runs to the limit.
  assert stopped.num_tokens[1] == 8
  np.testing.assert_array_equal(stopped.tokens[1], free.tokens[1])


def test_single_head_generation():
  out = decoding.generate(_model(num_lm_heads=1), [[1, 2, 3]],
                          _decode_config(pilot="lowest_entropy"))
  assert out.tokens.shape == (1, 8)
  assert np.all(out.heads == 0)
  assert np.all(out.pilots == 0)


class _CharTokenizer:
  """Maps characters to ids below VOCAB, with id 0 as end-of-text."""
  vocab_size = VOCAB
  eos_id = 0

  def encode(self, text):
    return [1 + ord(c) % (VOCAB - 1) for c in text]

  def decode(self, ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


@dataclasses.dataclass
class _State:
  model: object
  tokenizer: object
  win_counts: np.ndarray


def test_generate_text_strings():
  state = _State(_model(), _CharTokenizer(), np.array([0, 2, 1]))
  long_prompt = "x" * 60  # Longer than max_len=40 minus 8 new tokens.
  texts, output = generate_lib.generate_batch(
      state, ["abc", "", long_prompt], _decode_config())
  assert len(texts) == 3
  for row, text in enumerate(texts):
    ids = output.tokens[row, :output.num_tokens[row]].tolist()
    expected = ids[:-1] if ids and ids[-1] == 0 else ids
    assert text == _CharTokenizer().decode(expected)
  assert generate_lib.generate_text(state, ["abc"], _decode_config()) == texts[:1]
