"""Our TensorFlow tensor-bundle reader and writer against a checkpoint written by real TensorFlow (the fixture)."""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gpt2_jax.errors import UserError
from gpt2_jax.weights.crc32c import crc32c, crc_update
from gpt2_jax.weights.tf_bundle import TFCheckpoint, checkpoint_prefix, write_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny" / "openai"
SUFFIXES = (".index", ".data-00000-of-00001")
DATA = "model.ckpt.data-00000-of-00001"


def test_reads_tensorflow_checkpoint_and_verifies_every_crc():
    ckpt = TFCheckpoint(FIXTURE / "model.ckpt")
    assert ckpt.num_shards == 1
    assert len(ckpt.entries) == 4 + 2 * 12  # wte, wpe, ln_f/{g,b} + 12 tensors per layer
    assert ckpt.entries["model/wte"].shape == (1000, 64)
    assert ckpt.entries["model/h1/mlp/c_fc/w"].shape == (1, 64, 256)
    for name in ckpt.entries:
        array = ckpt.read(name, verify_crc=True)
        assert array.dtype == np.float32 and array.shape == ckpt.entries[name].shape
    ln_f_b = np.fromfile(FIXTURE / DATA, np.float32, count=64, offset=ckpt.entries["model/ln_f/b"].offset)
    np.testing.assert_array_equal(ckpt.read("model/ln_f/b"), ln_f_b)


def test_writer_reproduces_tensorflow_bytes_exactly(tmp_path):
    ckpt = TFCheckpoint(FIXTURE / "model.ckpt")
    write_checkpoint(tmp_path / "model.ckpt", {name: ckpt.read(name) for name in ckpt.entries})
    for suffix in SUFFIXES:
        assert (tmp_path / f"model.ckpt{suffix}").read_bytes() == (FIXTURE / f"model.ckpt{suffix}").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_round_trip_of_dtypes_shapes_and_multi_block_index(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        f"model/h{i}/attn/c_attn/w/Adam_{j}": rng.standard_normal((2, 3)).astype(np.float32)
        for i in range(9)
        for j in range(3)
    }
    tensors.update(
        global_step=np.array(1000, np.int64),
        beta1_power=np.array(0.9**1000, np.float32),
        half=rng.standard_normal(5).astype(np.float16),
        brain=rng.standard_normal((4, 1)).astype(ml_dtypes.bfloat16),
        ints=np.arange(7, dtype=np.int32),
        empty=np.zeros((0, 3), np.float32),
    )
    write_checkpoint(tmp_path / "model-1000", tensors, block_size=256)  # many data blocks and restart points
    ckpt = TFCheckpoint(tmp_path / "model-1000")
    assert sorted(ckpt.entries) == sorted(tensors)
    for name, expected in tensors.items():
        got = ckpt.read(name, verify_crc=True)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_crc32c_known_value_and_vectorised_lanes_equal_the_byte_loop():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    data = np.random.default_rng(1).integers(0, 256, (1 << 20) + 12345, dtype=np.uint8)
    assert crc32c(data) == crc_update(0xFFFFFFFF, data.tobytes()) ^ 0xFFFFFFFF


def _copy_fixture(tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, out)
    return out


def test_corrupt_truncated_and_missing_files_are_one_clear_sentence(tmp_path):
    folder = _copy_fixture(tmp_path)
    data = bytearray((folder / DATA).read_bytes())
    data[1000] ^= 0xFF  # inside model/h0/attn/c_attn/w
    (folder / DATA).write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"c_attn/w fails its crc32c check"):
        TFCheckpoint(folder / "model.ckpt").read("model/h0/attn/c_attn/w", verify_crc=True)

    (folder / DATA).write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UserError, match=r"is truncated \(336,384 bytes, the index needs 672,768\)"):
        TFCheckpoint(folder / "model.ckpt")
    (folder / DATA).unlink()
    with pytest.raises(UserError, match="is missing"):
        TFCheckpoint(folder / "model.ckpt")

    index = folder / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:-10])
    with pytest.raises(UserError, match="not a TensorFlow checkpoint index"):
        TFCheckpoint(folder / "model.ckpt")
    corrupt = bytearray((FIXTURE / "model.ckpt.index").read_bytes())
    corrupt[40] ^= 0x55
    index.write_bytes(bytes(corrupt))
    with pytest.raises(UserError, match="checksum mismatch"):
        TFCheckpoint(folder / "model.ckpt")


def test_checkpoint_prefix_follows_the_checkpoint_file_even_from_another_machine(tmp_path):
    folder = _copy_fixture(tmp_path)
    assert checkpoint_prefix(folder) == folder / "model.ckpt"
    # gpt-2-simple on Colab writes absolute paths; the file name is looked up beside the `checkpoint` file.
    (folder / "checkpoint").write_text('model_checkpoint_path: "/content/checkpoint/run1/model.ckpt"\n')
    assert checkpoint_prefix(folder) == folder / "model.ckpt"
    (folder / "checkpoint").write_text('model_checkpoint_path: "model-2000"\n')
    with pytest.raises(UserError, match=r"has no model-2000\.index"):
        checkpoint_prefix(folder)
    (folder / "checkpoint").unlink()
    for step in (500, 1000):  # without a `checkpoint` file the highest step wins
        for suffix in SUFFIXES:
            shutil.copy(folder / f"model.ckpt{suffix}", folder / f"model-{step}{suffix}")
    (folder / "model.ckpt.index").unlink()
    assert checkpoint_prefix(folder) == folder / "model-1000"
