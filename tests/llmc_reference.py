"""llm.c's own shard writer and loader check, transcribed line for line into Python: the reference our shards are
tested against (karpathy/llm.c: dev/data/data_common.py `write_datafile`, llmc/dataloader.h
`dataloader_load_shard_`)."""

from __future__ import annotations

import numpy as np

HEADER_SIZE = 256  # #define HEADER_SIZE 256 (int32 values)


def write_datafile(filename, toks) -> None:
    """data_common.py write_datafile(filename, toks, model_desc="gpt-2")."""
    assert len(toks) < 2**31, "token count too large"  # ~2.1B tokens
    header = np.zeros(256, dtype=np.int32)  # header is always 256 int32 values
    header[0] = 20240520  # HEADERS_INFO["gpt-2"]["magic"]
    header[1] = 1  # HEADERS_INFO["gpt-2"]["version"]
    header[2] = len(toks)  # number of tokens after the 256*4 bytes of header
    toks_np = np.array(toks, dtype=np.uint16)
    with open(filename, "wb") as f:
        f.write(header.tobytes())
        f.write(toks_np.tobytes())


def load_shard(filename) -> int:
    """dataloader_load_shard_'s checks: the token count, or AssertionError with llm.c's own message."""
    with open(filename, "rb") as f:
        raw = f.read(HEADER_SIZE * 4)
        assert len(raw) == HEADER_SIZE * 4, "freadCheck: short read"
        header = np.frombuffer(raw, dtype="<i4")  # int header[HEADER_SIZE] on a little-endian machine
        assert header[0] == 20240520, "Bad magic in the data file"
        assert header[1] == 1, "Bad version in data file"
        ntok = int(header[2])  # number of tokens in the file
        assert ntok > 0  # we expect some tokens in the file
        f.seek(0, 2)  # fseekCheck(loader->tokens_file, 0, SEEK_END)
        file_size_bytes = f.tell()
    expected_file_size = HEADER_SIZE * 4 + ntok * 2  # HEADER_SIZE * sizeof(int) + ntok * sizeof(uint16_t)
    assert file_size_bytes == expected_file_size, "Error: file size is not as expected"
    return ntok
