"""The manifest `prepare` keeps beside its shards, `OUT_DIR/manifest.json`, and what it decides at a (re)start.

It records the settings (the input files with their sizes and modification times, the shard size and split, the
tokenizer), every finished shard (file, split, tokens, sha256, and `next`: where the token stream stands after it),
and at the end `complete: true` with the totals. It is rewritten atomically after each shard, so it never lists a
shard that is not complete on disk.

At a start (`resume_point`): the same settings and an unfinished manifest resume after its last shard that is still
intact; anything after it (the partial `.tmp`, a shard renamed just before a kill) is deleted and redone. Shards or a
manifest of anything else in OUT_DIR are refused in one sentence, or deleted first with `overwrite`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gpt2_jax.data import shards
from gpt2_jax.data.files import DatasetFiles
from gpt2_jax.errors import UserError
from gpt2_jax.io import atomic_write_bytes
from gpt2_jax.tokenizers.base import Tokenizer

MANIFEST = "manifest.json"
VERSION = 1  # bump when the stream prepare writes changes for the same input and settings
FORMAT = "llm.c token shards: 256 little-endian int32 (magic 20240520, version 1, token count, zeros), uint16 tokens"


def settings_of(files: DatasetFiles, tokenizer: Tokenizer, **choices: Any) -> dict[str, Any]:
    """What the shards depend on: the input files as they are now, the tokenizer, and the run's `choices`."""
    listed = []
    for path in files.paths:
        stat = os.stat(path)
        listed.append([os.path.relpath(path, files.root).replace(os.sep, "/"), stat.st_size, stat.st_mtime_ns])
    vocabulary = {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab, "eot_id": tokenizer.eot_id}
    return {"version": VERSION, "input": {"root": files.root, "files": listed}, "tokenizer": vocabulary, **choices}


def shard_name(name: str, index: int, val_shards: int) -> str:
    """llm.c's FineWeb naming: `NAME_val_000000.bin`, then `NAME_train_000001.bin` (one index across both)."""
    return f"{name}_{'val' if index < val_shards else 'train'}_{index:06d}.bin"


def write(out_dir: str, settings: dict, finished: list[dict], totals: dict | None = None) -> None:
    """The manifest as it stands: `totals` only at the end, which makes it complete."""
    record = {"format": FORMAT, "settings": settings, "shards": finished, "complete": totals is not None}
    if totals is not None:
        record["totals"] = totals
    text = json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(os.path.join(out_dir, MANIFEST), text.encode("utf-8"))


def read(out_dir: str) -> dict | None:
    """The manifest in `out_dir`, or None when there is none or it cannot be read as one."""
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("shards"), list) else None


def resume_point(out_dir: str, settings: dict, overwrite: bool) -> tuple[list[dict], dict | None]:
    """(the finished shards to keep, the totals when the run is already complete); clears what is not kept."""
    settings = json.loads(json.dumps(settings))  # as it reads back from the file: lists, not tuples
    ours = _prepare_files(out_dir)
    record = read(out_dir)
    if record is not None and record.get("settings") == settings and not overwrite:
        kept = _intact_prefix(out_dir, record["shards"])
        _remove(out_dir, [f for f in ours if f != MANIFEST and f not in {s["file"] for s in kept}])
        complete = record.get("complete") and len(kept) == len(record["shards"])
        return kept, record.get("totals") if complete else None
    if ours and not overwrite:
        raise UserError(_refusal(out_dir, ours, record, settings))
    _remove(out_dir, ours)
    return [], None


def _prepare_files(out_dir: str) -> list[str]:
    """Names in `out_dir` that a prepare run writes: llm.c shards, their temporary files, the manifest."""
    found = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name == MANIFEST or name.endswith(".bin.tmp"):
            found.append(name)
        elif name.endswith(".bin") and os.path.isfile(path) and shards.is_shard(path):
            found.append(name)
    return found


def _intact_prefix(out_dir: str, listed: list[dict]) -> list[dict]:
    """The listed shards up to the first one missing or damaged since (each header and size checked, not the hash:
    that would read every shard again)."""
    kept = []
    for shard in listed:
        try:
            if shards.shard_tokens(os.path.join(out_dir, shard["file"])) != shard["tokens"]:
                break
        except (UserError, OSError, KeyError):
            break
        kept.append(shard)
    return kept


def _remove(out_dir: str, names: list[str]) -> None:
    for name in names:
        if name != MANIFEST:
            os.remove(os.path.join(out_dir, name))
    if MANIFEST in names:  # last: while shards are being deleted it still says whose they are
        os.remove(os.path.join(out_dir, MANIFEST))


def _refusal(out_dir: str, ours: list[str], record: dict | None, settings: dict) -> str:
    fix = "pick an empty folder, or pass --overwrite to delete them"
    if record is None:
        some = ", ".join(ours[:3]) + (", ..." if len(ours) > 3 else "")
        return f"{out_dir} already holds llm.c shards ({some}) that no prepare manifest describes; {fix}."
    theirs = record.get("settings") or {}
    # What the user chose first; the rest (the stream's version, the group size) change only with gpt2-jax itself.
    chosen = ("input", "name", "shard_size", "val_shards", "text_column", "tokenizer")
    changed = next((key for key in chosen if theirs.get(key) != settings.get(key)), None)
    what = {"input": "input (other files, or changed since)", None: "version of gpt2-jax"}.get(changed, changed)
    return f"{out_dir} holds the shards of another prepare run (made with a different {what}); {fix}."
