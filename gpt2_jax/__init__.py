"""gpt2-jax: GPT-2 in JAX/Flax, built for accelerator throughput.

The package is a set of small modules, one concept each; import what you need from them:
config (GPT2Config, presets), model (GPT2, init_params), decoding (KV cache, prefill, decode_step),
tokenizer (GPT-2 BPE, SentencePiece), errors (UserError), cli (entry-point wrapper).
"""

__version__ = "0.1.0"
