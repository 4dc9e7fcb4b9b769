"""Datasets for training and evaluation: the files a path names, tokenized once into a cache, split, batched.

files.py    the files a dataset path names and a reader per format (.txt/.md, .jsonl, .csv, .npy/.bin tokens)
cache.py    the crash-safe, memory-mapped token cache keyed by content and tokenizer
dataset.py  `read_token_stream` (tokenize or read the cache, join documents with <|endoftext|>) and `load_dataset`
            (the same, with validation held out)
batches.py  `BatchSampler` (reproducible from seed and step) and evaluation windows
"""
