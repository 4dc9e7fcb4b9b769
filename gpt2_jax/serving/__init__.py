"""Serving: a model behind OpenAI's completions API, with continuous batching over the jitted decoder.

rows.py      the device side: a fixed set of rows with per-row cache positions; `admit` (prefill one request into
             a row) and `decode_rows` (a chunk of steps for every row), both jitted, the rows donated
engine.py    `Engine`: the thread that admits queued jobs into free rows between chunks and hands out their text
choice.py    `ChoiceText`: one choice's text, stop strings and log-probabilities as its tokens arrive
protocol.py  the completions request checked field by field, OpenAI's error object and response shapes
app.py       the FastAPI app: /v1/completions (streaming or not), /v1/models, /health; auth, limits, disconnects
"""
