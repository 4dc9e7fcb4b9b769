"""The token cache: a dataset tokenized once and kept as one flat file that numpy memory-maps.

Layout: a 256-byte header (a 16-byte magic, then JSON padded with spaces) followed by the token ids as
little-endian uint16 or uint32. The header holds the full content key, the dtype and the counts; a file whose magic,
key or size disagrees with it (truncated, copied half-way, another version) is not trusted and is rebuilt.

Files are written under a temporary name in the same folder (`<name>.tmp-<pid>`), fsynced, then renamed into place,
so a killed process leaves at most a temporary file, never a half-written cache under the real name. Temporary
files of dead processes and caches of older versions of the same data are removed after the next successful write.

The name is `<stem>.tokens.<tokenizer>.<key16>.cache` (`*.tokens.*` is in the project's .gitignore); its
extension is none that `gpt2_jax.data.dataset` reads, so a folder scan never mistakes a cache for data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from gpt2_jax.io import StreamedFile, pid_alive
from gpt2_jax.tokenizers.base import Tokenizer

MAGIC = b"GPT2JAX-TOKENS1\n"
HEADER_BYTES = 256
CONTENT_HASH_LIMIT = 256 << 20  # above this many bytes of data, key on size + mtime instead of reading it all
_TEMP_SUFFIX = re.compile(r"\.tmp-(\d+)$")


def default_cache_dir() -> str:
    """$GPT2_JAX_CACHE, else $XDG_CACHE_HOME/gpt2_jax, else ~/.cache/gpt2_jax."""
    if os.environ.get("GPT2_JAX_CACHE"):
        return os.path.expanduser(os.environ["GPT2_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt2_jax")


def cache_name(stem: str, tokenizer_tag: str, key: str) -> str:
    return f"{stem}.tokens.{tokenizer_tag}.{key[:16]}.cache"


def tokenizer_tag(tokenizer: Tokenizer) -> str:
    """A short file-name-safe identity: the tokenizer's name plus 8 hex digits of its vocabulary fingerprint."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(tokenizer.name))[:32] or "tokenizer"
    return f"{name}-{hashlib.sha256(tokenizer_fingerprint(tokenizer).encode()).hexdigest()[:8]}"


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """What changes when the vocabulary does: the tokenizer's own `fingerprint`, or a hash of its decoded vocabulary."""
    own = getattr(tokenizer, "fingerprint", None)
    if own:
        return f"{tokenizer.name}|{tokenizer.n_vocab}|{tokenizer.eot_id}|{own}"
    h = hashlib.sha256(f"{tokenizer.name}|{tokenizer.n_vocab}|{tokenizer.eot_id}".encode())
    h.update(tokenizer.decode(list(range(tokenizer.n_vocab))).encode("utf-8", "surrogatepass"))
    h.update(np.asarray(tokenizer.encode("Fingerprint: naïve café, 東京, 123 456\n\n  tabs\tand 'quotes'."), "<i8"))
    return h.hexdigest()


def content_key(files: Sequence[str], root: str, salt: str) -> str:
    """Hash of every file's path (relative to `root`) and content, plus `salt` (tokenizer, reader version, dtype).

    Small datasets are hashed byte for byte, so any edit re-tokenizes; past CONTENT_HASH_LIMIT bytes in all the key
    uses each file's size and modification time instead, so a second run of a huge corpus still starts at once.
    """
    h = hashlib.blake2b(salt.encode(), digest_size=16)
    stats = [os.stat(f) for f in files]
    by_content = sum(s.st_size for s in stats) <= CONTENT_HASH_LIMIT
    for path, stat in zip(files, stats):
        h.update(b"\0" + os.path.relpath(path, root).replace(os.sep, "/").encode("utf-8", "surrogateescape") + b"\0")
        if by_content:
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        else:
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def read_cache(path: str, key: str) -> tuple[np.ndarray, dict] | None:
    """(tokens memmap, header) when `path` is a complete cache for `key`; None when absent or not trustworthy."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
        if len(raw) < HEADER_BYTES or not raw.startswith(MAGIC):
            return None
        header = json.loads(raw[len(MAGIC) :].decode("ascii"))
        dtype = np.dtype(header["dtype"]).newbyteorder("<")
        n_tokens = int(header["n_tokens"])
        if header.get("key") != key or n_tokens <= 0 or size != HEADER_BYTES + n_tokens * dtype.itemsize:
            return None
        return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,)), header
    except (OSError, ValueError, KeyError, TypeError):
        return None


class CacheWriter:
    """Stream token arrays into `<path>.tmp-<pid>`; `commit()` writes the header and renames it to `path`.

    Opening raises OSError when the folder is not writable (the caller then tries another folder); leaving the
    `with` block without `commit()` (an error, Ctrl-C) deletes the temporary file.
    """

    def __init__(self, path: str, key: str, dtype: np.dtype) -> None:
        self.path, self.key, self.dtype = path, key, np.dtype(dtype).newbyteorder("<")
        self.n_tokens = 0
        self.committed = False
        self._file = StreamedFile(path, f"{path}.tmp-{os.getpid()}", HEADER_BYTES)  # the counts come at the end
        self.temp_path = self._file.temp_path

    def write(self, tokens: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.n_tokens += len(tokens)

    def commit(self, **meta: int) -> np.ndarray:
        header = {"key": self.key, "dtype": self.dtype.name, "n_tokens": self.n_tokens, **meta}
        text = json.dumps(header, separators=(",", ":")).encode("ascii")
        if len(MAGIC) + len(text) > HEADER_BYTES:
            raise ValueError(f"token cache header too long: {text!r}")
        self._file.commit(MAGIC + text.ljust(HEADER_BYTES - len(MAGIC), b" "))
        self.committed = True
        _fsync_dir(os.path.dirname(self.path) or ".")
        _remove_stale(self.path)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=HEADER_BYTES, shape=(self.n_tokens,))

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def _remove_stale(path: str) -> None:
    """Delete caches of the same stem + tokenizer with another key, and temporary files of dead processes."""
    folder, name = os.path.split(path)
    prefix = name[: -len("0123456789abcdef.cache")]  # "<stem>.tokens.<tokenizer>."
    stale = re.compile(re.escape(prefix) + r"[0-9a-f]{16}\.cache(\.tmp-\d+)?$")
    for other in os.listdir(folder or "."):
        if other == name or not stale.match(other):
            continue
        temp = _TEMP_SUFFIX.search(other)
        if temp and pid_alive(int(temp.group(1))):
            continue  # another process is writing it right now
        try:
            os.remove(os.path.join(folder, other))
        except OSError:
            pass
