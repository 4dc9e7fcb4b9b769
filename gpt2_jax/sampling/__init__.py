"""Sampling: logit processors, the jitted decode loop on the device, and the host side that drives it.

processors.py  `SamplingConfig` and the logit processors (repetition penalty, bans, temperature, top-k, top-p)
loop.py        `prefill_and_sample` and `decode_chunk`: the decode loop, jitted, its state donated chunk to chunk
generate.py    the host side in tokens: a `Request`, prompt buckets, left padding, the chunk loop, sliding windows
text.py        prompts encoded; `RowText`: a row's text as it arrives, stop strings, safe streaming
sampler.py     `Sampler` (weights laid out for decoding once; text in, texts or `Sample`s out) and `generate_text`
"""
