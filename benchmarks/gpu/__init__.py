"""The GPU verification call: `python -m benchmarks.gpu --out DIR` (its __main__.py is the map of what it measures);
one module per part, the peers in peers/."""
