"""Where the training state lies (gpt2_jax/sharding.py): placement rules, per-device bytes, the memory check.

Shapes only: an AbstractMesh stands in for 8 devices and `jax.eval_shape` for the state, so even 1558M costs no
memory. That fsdp trains exactly like replicated is tested in test_train_step.py (8 real CPU devices).
"""

from __future__ import annotations

import jax
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec
from jax.tree_util import DictKey

from gpt2_jax.config import get_config
from gpt2_jax.errors import UserError
from gpt2_jax.model.params import count_params
from gpt2_jax.model.transformer import abstract_params
from gpt2_jax.training.mesh import bytes_per_device, choose_strategy, leaf_spec, tree_shardings
from gpt2_jax.training.optim import make_optimizer
from gpt2_jax.training.step import create_state

MESH8 = AbstractMesh((8,), ("data",), axis_types=(AxisType.Auto,))
GIB = 2**30


def abstract_train_state(preset: str):
    optimizer = make_optimizer(optax.constant_schedule(1e-4))
    return jax.eval_shape(lambda p: create_state(p, optimizer, 0), abstract_params(get_config(preset)))


def test_leaf_spec_splits_the_largest_divisible_dimension_never_the_layer_axis():
    h = (DictKey("h"), DictKey("mlp"), DictKey("c_fc"), DictKey("w"))
    assert leaf_spec(h, (48, 1600, 6400), 8) == PartitionSpec(None, None, "data")
    assert leaf_spec(h, (64, 1024, 4096), 8) == PartitionSpec(None, None, "data")  # 64 layers: still not axis 0
    assert leaf_spec((DictKey("wte"),), (50257, 768), 8) == PartitionSpec(None, "data")  # 50257 is odd
    assert leaf_spec((DictKey("wpe"),), (1024, 768), 8) == PartitionSpec("data", None)
    assert leaf_spec((DictKey("wte"),), (50257, 771), 8) == PartitionSpec()  # nothing divides: stays whole
    assert leaf_spec((DictKey("ln_f"), DictKey("g")), (768,), 8) == PartitionSpec()  # too small to bother
    assert leaf_spec((DictKey("wpe"),), (1024, 768), 1) == PartitionSpec()


def test_1558M_state_replicated_and_sharded_8_ways():
    """params + two AdamW moments in float32: 12 bytes per parameter replicated, about an eighth of it sharded."""
    state = abstract_train_state("1558M")
    n_params = count_params(get_config("1558M"))
    replicated = bytes_per_device(state, tree_shardings(state, MESH8, "replicated"))
    fsdp = bytes_per_device(state, tree_shardings(state, MESH8, "fsdp"))
    assert replicated == 12 * n_params + 4 + 8 + 2 * 4  # + step, rng and the two optimizer counters
    assert 12 * n_params / 8 <= fsdp < 1.01 * 12 * n_params / 8  # only small vectors stay whole
    assert replicated / GIB == pytest.approx(17.41, abs=0.01)


class FakeDevice:
    device_kind = "24 GiB test GPU"

    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return None if self.limit is None else {"bytes_limit": self.limit}


def test_auto_picks_replicated_when_it_fits_and_fsdp_when_not():
    sizes = {"replicated": 17 * GIB, "fsdp": 2 * GIB}
    assert choose_strategy("auto", sizes, FakeDevice(80 * GIB), 8) == "replicated"
    assert choose_strategy("auto", sizes, FakeDevice(24 * GIB), 8) == "fsdp"
    assert choose_strategy("auto", sizes, FakeDevice(None), 8) == "replicated"  # a CPU reports no limit
    assert choose_strategy("fsdp", sizes, FakeDevice(None), 8) == "fsdp"


def test_a_state_that_cannot_fit_is_refused_before_anything_is_allocated():
    sizes = {"replicated": 17 * GIB, "fsdp": 17 * GIB / 8}
    with pytest.raises(UserError, match=r"17.00 GiB per device \(replicated\).*--sharding fsdp \(2.12 GiB"):
        choose_strategy("replicated", sizes, FakeDevice(24 * GIB), 8)
    with pytest.raises(UserError, match=r"needs 17.00 GiB per device.*add devices and split"):
        choose_strategy("auto", sizes, FakeDevice(24 * GIB), 1)  # one device: nothing to shard across
    with pytest.raises(UserError, match=r"2.12 GiB per device \(fsdp\)"):
        choose_strategy("fsdp", sizes, FakeDevice(2 * GIB), 8)
