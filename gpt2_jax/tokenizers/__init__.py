"""Tokenizers: GPT-2's byte-level BPE (through tiktoken, offline) and SentencePiece for new vocabularies.

base.py           the `Tokenizer` protocol and helpers both kinds share
gpt2_bpe.py       GPT-2's BPE from encoder.json + vocab.bpe (packaged under vocab/gpt2), `load_tokenizer`
sentencepiece.py  SentencePiece models with exact round trips, and training one on a corpus
"""
