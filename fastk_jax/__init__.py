"""fastk-jax: multi-head GPT language models trained winner-take-all, decoded with Fast-K."""

__version__ = "0.1.0"
