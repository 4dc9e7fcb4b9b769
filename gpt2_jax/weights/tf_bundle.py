"""TensorFlow tensor-bundle checkpoints (`PREFIX.index` + `PREFIX.data-0000K-of-0000N`) read and written without TF.

The `.index` file is a LevelDB-format table: data blocks of prefix-compressed `key -> value` entries with restart
points, an index block pointing at them, and a 48-byte footer ending in a magic number. Keys are tensor names (the
empty key holds a `BundleHeaderProto`), values are `BundleEntryProto` messages (dtype, shape, shard, offset, size,
masked crc32c) decoded here by a tiny protobuf reader. A tensor's bytes lie little-endian in its data shard.

The writer exists for tests (gpt-2-simple run directories with optimizer slots) and `convert --to openai`; it lays
the files out as TensorFlow's `SaveV2` does (sorted keys, one shard, uncompressed blocks).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from gpt2_jax.errors import UserError
from gpt2_jax.weights.crc32c import masked_crc32c

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
# TF DataType enum -> numpy dtype (DT_STRING and resource types are not plain bytes: listed as None).
TF_DTYPES: dict[int, np.dtype | None] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float64),
    3: np.dtype(np.int32),
    4: np.dtype(np.uint8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int8),
    7: None,
    9: np.dtype(np.int64),
    10: np.dtype(np.bool_),
    14: np.dtype(ml_dtypes.bfloat16),
    17: np.dtype(np.uint16),
    19: np.dtype(np.float16),
    22: np.dtype(np.uint32),
    23: np.dtype(np.uint64),
}
NUMPY_TO_TF = {dtype: code for code, dtype in TF_DTYPES.items() if dtype is not None}


# --- protobuf wire format: just what BundleEntryProto / BundleHeaderProto need -------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs; varints as int, fixed32/64 as int, length-delimited as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_field(field: int, value: int | bytes, *, fixed32: bool = False) -> bytes:
    if fixed32:
        return _encode_varint(field << 3 | 5) + struct.pack("<I", value)
    if isinstance(value, bytes):
        return _encode_varint(field << 3 | 2) + _encode_varint(len(value)) + value
    return _encode_varint(field << 3) + _encode_varint(value)


@dataclass(frozen=True)
class TensorEntry:
    """One BundleEntryProto: where a tensor's bytes lie and how to check them."""

    name: str
    dtype_code: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    masked_crc: int | None
    sliced: bool

    @property
    def dtype(self) -> np.dtype | None:
        return TF_DTYPES.get(self.dtype_code)


def _parse_entry(name: str, value: bytes) -> TensorEntry:
    fields = {"dtype_code": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "masked_crc": None, "sliced": False}
    for field, v in _proto_fields(value):
        if field == 1:
            fields["dtype_code"] = v
        elif field == 2:  # TensorShapeProto: repeated Dim dim = 2 { int64 size = 1 }
            dims = [dict(_proto_fields(dim)).get(1, 0) for f, dim in _proto_fields(v) if f == 2]
            fields["shape"] = tuple(dims)
        elif field in (3, 4, 5):
            fields[{3: "shard_id", 4: "offset", 5: "size"}[field]] = v
        elif field == 6:
            fields["masked_crc"] = v
        elif field == 7:
            fields["sliced"] = True
    return TensorEntry(name=name, **fields)


# --- LevelDB table -------------------------------------------------------------------------------------------------
def _read_block(data: bytes, handle: bytes | tuple[int, int], path: Path) -> bytes:
    offset, size = handle if isinstance(handle, tuple) else _block_handle(handle)
    block, trailer = data[offset : offset + size], data[offset + size : offset + size + 5]
    if len(trailer) < 5:
        raise UserError(f"{path} is truncated; download or copy the checkpoint again.")
    if trailer[0] != 0:
        raise UserError(f"{path} uses a compressed table block; re-save the checkpoint with TensorFlow's defaults.")
    if struct.unpack("<I", trailer[1:])[0] != masked_crc32c(block + trailer[:1]):
        raise UserError(f"{path} is corrupt (block checksum mismatch); download or copy the checkpoint again.")
    return block


def _block_handle(value: bytes) -> tuple[int, int]:
    offset, pos = _varint(value, 0)
    size, _ = _varint(value, pos)
    return offset, size


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end, pos, key = len(block) - 4 - 4 * n_restarts, 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def read_table(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a LevelDB table file, in key order."""
    data = path.read_bytes()
    if len(data) < FOOTER_SIZE or struct.unpack_from("<Q", data, len(data) - 8)[0] != TABLE_MAGIC:
        raise UserError(f"{path} is not a TensorFlow checkpoint index (bad magic number); is the file complete?")
    footer = data[-FOOTER_SIZE:]
    _, pos = _varint(footer, 0)  # skip the metaindex handle (offset, size): TF writes no filters
    _, pos = _varint(footer, pos)
    index_handle = _block_handle(footer[pos:])
    for _, handle in _block_entries(_read_block(data, index_handle, path)):
        yield from _block_entries(_read_block(data, handle, path))


def _build_block(entries: list[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    out, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += _encode_varint(shared) + _encode_varint(len(key) - shared) + _encode_varint(len(value))
        out += key[shared:] + value
        last = key
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))


def _short_successor(key: bytes) -> bytes:
    """LevelDB's FindShortSuccessor: the shortest key >= `key` (first byte that is not 0xff, incremented)."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def write_table(entries: list[tuple[bytes, bytes]], block_size: int = 262144) -> bytes:
    """A LevelDB table holding `entries` (sorted by key) in uncompressed data blocks of about `block_size` bytes
    (TF's bundle writer uses 256 KiB, so a GPT-2 index is a single block)."""
    out, index = bytearray(), []

    def add_block(block: bytes) -> bytes:
        handle = _encode_varint(len(out)) + _encode_varint(len(block))
        out.extend(block + b"\x00" + struct.pack("<I", masked_crc32c(block + b"\x00")))
        return handle

    start, size = 0, 0
    for i, (key, value) in enumerate(entries):
        size += len(key) + len(value) + 8
        if size >= block_size or i == len(entries) - 1:
            last = i == len(entries) - 1
            separator = _short_successor(key) if last else key  # any key >= this block's and < the next's
            index.append((separator, add_block(_build_block(entries[start : i + 1]))))
            start, size = i + 1, 0
    meta_handle = add_block(_build_block([]))
    index_handle = add_block(_build_block(index, restart_interval=1))
    footer = (meta_handle + index_handle).ljust(FOOTER_SIZE - 8, b"\x00") + struct.pack("<Q", TABLE_MAGIC)
    return bytes(out + footer)


# --- the bundle: index + data shards --------------------------------------------------------------------------------
class TFCheckpoint:
    """A tensor bundle opened by its prefix (`models/124M/model.ckpt`); tensors are read one at a time."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = Path(prefix)
        index = Path(f"{self.prefix}.index")
        if not index.is_file():
            raise UserError(f"No TensorFlow checkpoint index {index}; the checkpoint is incomplete or the path wrong.")
        self.entries: dict[str, TensorEntry] = {}
        self.num_shards, self.byte_order = 1, "<"
        try:
            for key, value in read_table(index):
                if key == b"":  # BundleHeaderProto: num_shards = 1, endianness = 2 (LITTLE = 0, BIG = 1)
                    header = dict(_proto_fields(value))
                    self.num_shards, self.byte_order = header.get(1, 1), ">" if header.get(2) else "<"
                else:
                    name = key.decode("utf-8")
                    self.entries[name] = _parse_entry(name, value)
        except (IndexError, ValueError, struct.error) as e:  # UnicodeDecodeError is a ValueError
            raise UserError(f"{index} is corrupt ({e}); download or copy the checkpoint again.")
        for shard in range(self.num_shards):
            self._check_shard(shard)

    def data_path(self, shard_id: int) -> Path:
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def _check_shard(self, shard_id: int) -> None:
        path = self.data_path(shard_id)
        if not path.is_file():
            raise UserError(f"Checkpoint data file {path} is missing; download or copy the checkpoint again.")
        needed = max((e.offset + e.size for e in self.entries.values() if e.shard_id == shard_id), default=0)
        if path.stat().st_size < needed:
            raise UserError(
                f"Checkpoint data file {path} is truncated ({path.stat().st_size:,} bytes, the index needs "
                f"{needed:,}); download or copy it again."
            )

    def read(self, name: str, *, verify_crc: bool = True) -> np.ndarray:
        """The tensor `name` as a numpy array of its stored dtype and shape."""
        entry = self.entries[name]
        if entry.dtype is None or entry.sliced:
            raise UserError(f"Tensor {name} in {self.prefix} is a string or partitioned variable, not plain weights.")
        count = int(np.prod(entry.shape, dtype=np.int64))
        if count * entry.dtype.itemsize != entry.size:
            raise UserError(
                f"Checkpoint {self.prefix}: {name} holds {entry.size} bytes but shape {entry.shape} of "
                f"{entry.dtype.name} needs {count * entry.dtype.itemsize}; the index is corrupt."
            )
        with open(self.data_path(entry.shard_id), "rb") as f:
            f.seek(entry.offset)
            array = np.fromfile(f, dtype=entry.dtype.newbyteorder(self.byte_order), count=count)
        if array.size != count:
            raise UserError(f"Checkpoint data for {name} in {self.prefix} is truncated; copy the checkpoint again.")
        if verify_crc and entry.masked_crc is not None and masked_crc32c(array) != entry.masked_crc:
            raise UserError(f"Checkpoint {self.prefix}: {name} fails its crc32c check; the data file is corrupt.")
        return array.astype(entry.dtype, copy=False).reshape(entry.shape)  # native byte order


def checkpoint_prefix(directory: str | os.PathLike) -> Path:
    """The prefix a directory's `checkpoint` file names (OpenAI: `model.ckpt`; gpt-2-simple: `model-1000`).

    Paths in that file may be absolute and from another machine (Colab's /content/...): the file name is then
    looked up beside the `checkpoint` file. Without the file, the newest `*.index` in the directory is used.
    """
    directory = Path(directory)
    state_file = directory / "checkpoint"
    if state_file.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"', state_file.read_text(encoding="utf-8"), re.M)
        if match:
            named = Path(match.group(1))
            for candidate in (named if named.is_absolute() else directory / named, directory / named.name):
                if Path(f"{candidate}.index").is_file():
                    return candidate
            raise UserError(
                f"{state_file} names checkpoint {match.group(1)!r} but {directory} has no {named.name}.index; "
                "copy the whole checkpoint (index and data files) into the directory."
            )
    indexes = sorted(directory.glob("*.index"), key=lambda p: (_step_number(p.name), p.stat().st_mtime))
    if not indexes:
        raise UserError(f"{directory} has no TensorFlow checkpoint (no 'checkpoint' file and no *.index file).")
    return indexes[-1].with_suffix("")


def _step_number(name: str) -> int:
    match = re.search(r"-(\d+)\.index$", name)
    return int(match.group(1)) if match else -1


def write_checkpoint(prefix: str | os.PathLike, tensors: Mapping[str, np.ndarray], *, block_size: int = 262144) -> None:
    """Write `tensors` as a one-shard bundle at `prefix` (+ `.index`, `.data-00000-of-00001`), as `SaveV2` would.

    Both files are written under temporary names and renamed, the index last, so a reader never sees a half bundle.
    """
    prefix = Path(prefix)
    data_path, index_path = Path(f"{prefix}.data-00000-of-00001"), Path(f"{prefix}.index")
    header = _encode_field(1, 1) + _encode_field(3, _encode_field(1, 1))  # num_shards=1, version{producer=1}
    entries, offset = [(b"", header)], 0
    tmp_data = data_path.with_name(data_path.name + ".tmp")
    with open(tmp_data, "wb") as f:
        for name in sorted(tensors):
            array = np.asarray(tensors[name], order="C")  # ascontiguousarray would make scalars 1-D
            if array.dtype not in NUMPY_TO_TF:
                raise ValueError(f"cannot store {name} of dtype {array.dtype} in a TF checkpoint")
            array = array.astype(array.dtype.newbyteorder("<"), copy=False)
            shape = b"".join(_encode_field(2, _encode_field(1, dim)) for dim in array.shape)
            entry = _encode_field(1, NUMPY_TO_TF[array.dtype]) + _encode_field(2, shape)
            if offset:
                entry += _encode_field(4, offset)
            if array.nbytes:
                entry += _encode_field(5, array.nbytes)
            entry += _encode_field(6, masked_crc32c(array), fixed32=True)
            entries.append((name.encode("utf-8"), entry))
            f.write(array.tobytes())
            offset += array.nbytes
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_data, data_path)
    tmp_index = index_path.with_name(index_path.name + ".tmp")
    with open(tmp_index, "wb") as f:
        f.write(write_table(entries, block_size))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_index, index_path)
