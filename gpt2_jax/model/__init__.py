"""The model: GPT-2's forward pass for training and evaluation, the cached forward for decoding, and FLOPs.

transformer.py  the Flax `GPT2` module (layers stacked and scanned), `init_params`, `abstract_params`
decode.py       the only cached forward: `DecodeWeights`, a per-layer KV cache, one step or a prefill
flops.py        FLOPs per token (nanoGPT's formula) and device peaks for MFU
"""
