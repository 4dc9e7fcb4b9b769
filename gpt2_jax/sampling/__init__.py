"""Sampling: logit processors, the jitted decode loop on the device, and the host side that drives it.

processors.py  `SamplingConfig` and the logit processors (repetition penalty, bans, temperature, top-k, top-p)
loop.py        `prefill_and_sample` and `decode_chunk`: the decode loop, jitted, its state donated chunk to chunk
generate.py    the host side: prompt buckets, left padding, streaming text, stop strings, sliding windows
"""
