"""Training data: which files a dataset names, tokenized once into a cache, split, and drawn in batches.

files.py    the files a dataset path names and a reader per format (.txt/.md, .jsonl, .csv, .npy/.bin tokens)
cache.py    the crash-safe, memory-mapped token cache keyed by content and tokenizer
dataset.py  `load_dataset`: tokenize (or read the cache), join documents with <|endoftext|>, hold out validation
batches.py  `BatchSampler` (reproducible from seed and step) and evaluation windows
"""
