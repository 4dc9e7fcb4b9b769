"""Datasets for training and evaluation: the files a path names, tokenized once into a cache, split, batched; and
`prepare`'s llm.c shards.

files.py         the files a dataset path names and a reader per format (.txt/.md, .jsonl, .csv, .parquet, .npy/.bin)
parquet.py       parquet files, one row group at a time
shards.py        llm.c's token shards: the format, and many read as one stream (`TokenShards`)
joining.py       documents joined into one token stream with <|endoftext|>, in groups to encode in parallel
cache.py         the crash-safe, memory-mapped token cache keyed by content and tokenizer
dataset.py       `read_token_stream` (tokenize or read the cache, or map llm.c shards) and `load_dataset` (the same,
                 with validation held out)
batches.py       `BatchSampler` (reproducible from seed and step) and evaluation windows
shard_corpus.py  `prepare_shards`: a dataset tokenized by worker processes into llm.c shards, resumably
manifest.py      the manifest beside the shards, and what a (re)start of prepare keeps
workers.py       `OrderedPool`: a map over worker processes, in order, with a bounded number in flight
"""
