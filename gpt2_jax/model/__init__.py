"""The model: GPT-2's forward pass for training and evaluation, the cached forward for decoding, and FLOPs.

ops.py          the math both forwards share: layer norm, GELU, the attention core, cache mask and positions, head
transformer.py  the Flax `GPT2` module (layers stacked and scanned; LoRA and dropout when training), `init_params`,
                `abstract_params`
lora.py         LoRA adapters: targets, shapes, init, merging into the base weights
decode.py       the only cached forward, run by every sampler: `DecodeWeights`, `init_cache`, `forward` (prefill
                or one step)
kv_cache.py     its cache: the two layouts (an array per layer on a CPU, one buffer on accelerators), their writes
fused_decode.py Pallas kernels for a decode step of a few tokens (5 per layer), picked by `kernels="pallas"`
params.py       the parameter table: every tensor's name, shape and its OpenAI and Hugging Face names
flops.py        FLOPs per token (nanoGPT's formula) and device peaks for MFU
"""
