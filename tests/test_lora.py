"""LoRA: adapters start at the base model, train alone, merge into it, resume exactly, and load in Hugging Face PEFT.

The step-level tests run the jitted train step on the tiny config; the run-level ones train one LoRA run (rank 4 on
every target, dropout on) from a tiny base saved to disk, through `run_training` as train.py does, then resume,
load, convert and damage copies of it. Several devices: tests/test_lora_devices.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerance import ulps

from gpt2_jax.config import get_config
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.model import lora
from gpt2_jax.model.lora import LoraConfig
from gpt2_jax.model.transformer import GPT2, Tuning, init_params
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer
from gpt2_jax.training import step as ts
from gpt2_jax.training.config import TrainConfig, resolve
from gpt2_jax.training.loop import run_training
from gpt2_jax.training.mesh import make_mesh, shard_batch
from gpt2_jax.training.optim import learning_rate_schedule, make_optimizer
from gpt2_jax.training.state import initial_state
from gpt2_jax.weights import lora_run
from gpt2_jax.weights.loading import load_model
from gpt2_jax.weights.native import save_native_model

ROOT = Path(__file__).resolve().parent.parent
CONFIG = get_config("tiny")
ALL = LoraConfig(rank=4, alpha=8.0, targets=tuple(lora.TARGETS))


@pytest.fixture(scope="module")
def base_params():
    return jax.device_get(init_params(CONFIG, 0))


def random_adapters(lora_config: LoraConfig, seed: int = 1):
    """Adapters with B nonzero too, so every adapter matters."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
    return jax.tree.map(
        lambda x: 0.1 * jax.random.normal(next(keys), x.shape), lora.init_adapters(CONFIG, lora_config, next(keys))
    )


def test_targets_flag_names_each_c_proj_apart():
    assert lora.parse_targets("all") == ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")
    assert lora.parse_targets("mlp.c_proj, c_attn") == ("c_attn", "mlp.c_proj")
    only_mlp = LoraConfig(4, 4.0, ("mlp.c_proj",))
    assert only_mlp.adapts("mlp", "c_proj") and not only_mlp.adapts("attn", "c_proj")
    with pytest.raises(UsageError, match="c_proj"):
        lora.parse_targets("c_proj")  # which one? the flag makes the user say
    with pytest.raises(UsageError, match="only apply to LoRA"):
        resolve({"init": "models/base", "lora_alpha": 16.0})
    with pytest.raises(UsageError, match="scratch"):
        resolve({"init": "scratch:tiny", "lora_rank": 8})
    assert resolve({"init": "models/base", "lora_rank": 8}).lora() == LoraConfig(8, 8.0, ("c_attn",))


def test_merged_weights_equal_base_plus_scaled_ba_and_the_adapted_forward(base_params):
    adapters = random_adapters(ALL)
    merged = jax.device_get(lora.merge(base_params, adapters, ALL))
    for block, layer in ALL.layers():
        a, b = (np.asarray(adapters["h"][block][layer][k], np.float64) for k in ("lora_A", "lora_B"))
        for i in range(CONFIG.n_layer):
            expected = base_params["h"][block][layer]["w"][i] + ALL.scale * a[i] @ b[i]
            np.testing.assert_allclose(merged["h"][block][layer]["w"][i], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["h"]["attn"]["c_attn"]["b"], base_params["h"]["attn"]["c_attn"]["b"])
    np.testing.assert_array_equal(merged["wte"], base_params["wte"])
    # The training forward with the adapters beside the base computes what plain GPT-2 does with merged weights.
    tokens = np.random.default_rng(0).integers(0, CONFIG.n_vocab, (2, 16))
    adapted = GPT2(CONFIG, Tuning(lora=ALL)).apply({"params": lora.combine(base_params, adapters)}, tokens)
    plain = GPT2(CONFIG).apply({"params": merged}, tokens)
    np.testing.assert_allclose(adapted, plain, atol=1e-5)


def test_step_zero_is_the_base_model_and_only_adapters_train(base_params):
    schedule = learning_rate_schedule(1e-2, warmup_steps=0, total_steps=10, schedule="constant")
    optimizer = make_optimizer(schedule)
    mesh = make_mesh(jax.devices()[:1])
    state = initial_state(CONFIG, optimizer, ALL, base_params, 0)
    train_step = ts.build_train_step(CONFIG, optimizer, schedule, mesh, tuning=Tuning(lora=ALL))
    batch = np.random.default_rng(0).integers(0, CONFIG.n_vocab, (4, 17)).astype(np.int32)
    base_loss = float(ts.mean_loss(base_params, CONFIG, batch))
    # No base leaf in the optimizer state: every moment is an adapter's shape.
    adapter_shapes = {x.shape for x in jax.tree.leaves(state.params)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert moments and {x.shape for x in moments} <= adapter_shapes
    assert len(moments) == 2 * len(jax.tree.leaves(state.params))  # mu and nu, nothing else
    adapters_before = jax.device_get(state.params)
    losses = []
    for _ in range(3):
        state, metrics = train_step(state, shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    # B = 0 adds exact zeros, so step 0 is the base model in real arithmetic; but the train step and mean_loss are two
    # graphs that sum the 64 token losses in their own orders (measured: 2 ulps apart on AVX-512 CPUs).
    assert losses[0] == pytest.approx(base_loss, abs=ulps(base_loss, 64))
    assert losses[2] < losses[0]
    for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(base_params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)  # the base never moves
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(adapters_before), strict=True):
        assert not np.array_equal(np.asarray(x), y)  # every A and B does


def test_bf16_run_keeps_the_frozen_matrices_in_bf16(base_params):
    bf16 = CONFIG.replace(dtype="bfloat16")
    optimizer = make_optimizer(learning_rate_schedule(1e-3, warmup_steps=0, total_steps=10))
    state = jax.eval_shape(lambda p: initial_state(bf16, optimizer, ALL, p, 0), base_params)
    assert state.frozen["h"]["mlp"]["c_fc"]["w"].dtype == jnp.bfloat16  # the forward casts it so anyway
    assert state.frozen["wte"].dtype == jnp.float32 and state.frozen["h"]["ln_1"]["g"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


# --- a LoRA run on disk -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, base_params) -> Path:
    out = tmp_path_factory.mktemp("base") / "tiny-base"
    out.mkdir()
    save_native_model(out, base_params, CONFIG, gpt2_tokenizer())
    return out


@pytest.fixture(scope="module")
def flags(corpus, base_dir) -> dict:
    return dict(
        init=str(base_dir), dataset=str(corpus), seq_len=32, batch_size=8, steps=20, learning_rate=1e-2,
        lr_schedule="constant", warmup_steps=2, log_every=1, val_every=0, val_batches=2, save_every=10, keep=5,
        sample_num=0, lora_rank=4, lora_alpha=8.0, lora_targets="all", dropout=0.1, lora_dropout=0.1,
    )  # fmt: skip


def train(out: Path, **flags) -> int:
    return run_training(dict(flags, out=str(out)), bundled_dataset=str(ROOT / "data" / "shakespeare"))


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def adapters_at(run: Path, step: int):
    return lora_run.load_adapters(run / "checkpoints" / str(step), CONFIG, lora_run.read_record(run))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, flags) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert train(out, **flags) == 0
    return out


def test_lora_run_checkpoints_hold_adapters_and_a_base_reference(straight, base_dir, base_params, capsys):
    record = json.loads((straight / "gpt2_jax.json").read_text())["lora"]
    assert record["rank"] == 4 and record["targets"] == list(lora.TARGETS)
    assert record["base"]["model"] == str(base_dir.absolute())
    adapters = adapters_at(straight, 20)
    assert {jax.tree_util.keystr(k)[-10:] for k, _ in jax.tree.leaves_with_path(adapters)} == {
        "['lora_A']",
        "['lora_B']",
    }
    opt_files = list((straight / "checkpoints" / "20" / "opt_state").rglob("*"))
    assert opt_files and sum(f.stat().st_size for f in opt_files if f.is_file()) < 200_000  # no base moments
    steps = losses(straight)
    assert np.mean([steps[s] for s in (18, 19, 20)]) < np.mean([steps[s] for s in (1, 2, 3)]) - 0.05


def test_lora_run_resumes_exactly_with_dropout(straight, flags, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / "20")
    assert train(run, restore_from="latest") == 0
    assert losses(run) == losses(straight)
    for x, y in zip(jax.tree.leaves(adapters_at(run, 20)), jax.tree.leaves(adapters_at(straight, 20)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_loading_a_lora_run_merges_its_adapters_into_the_base(straight, base_params):
    model = load_model(straight)
    assert model.step == 20 and "LoRA run" in model.source
    adapters = adapters_at(straight, 20)
    expected = jax.device_get(lora.merge(base_params, adapters, lora_run.read_record(straight).lora))
    for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(model.params["h"]["mlp"]["c_fc"]["w"], base_params["h"]["mlp"]["c_fc"]["w"])


def test_evaluate_takes_a_lora_run_and_finds_it_fitted_to_its_data(straight, base_dir, corpus, capsys):
    from gpt2_jax.evaluate import main as evaluate

    results = {}
    for name, model in (("run", straight), ("base", base_dir)):
        assert evaluate(["--model", str(model), "--data", str(corpus), "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["run"]["model"].startswith("LoRA run")
    assert results["run"]["loss"] < results["base"]["loss"] - 0.05


def test_changed_or_missing_base_model_is_one_sentence(straight, flags, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    record = json.loads((run / "gpt2_jax.json").read_text())
    record["lora"]["base"]["crc32"] += 1
    (run / "gpt2_jax.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"has changed since the LoRA run .* put back the model it was trained from"):
        load_model(run)
    with pytest.raises(UserError, match="has changed"):
        train(run, restore_from="latest", steps=25)
    record["lora"]["base"]["model"] = str(tmp_path / "gone")
    (run / "gpt2_jax.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"adapts the base model .*gone, which does not load now"):
        load_model(run)
    with pytest.raises(UsageError, match="trained with LoRA"):
        train(run, restore_from="latest", steps=25, lora_rank=8)


def test_peft_loads_the_export_with_our_logits_and_hf_export_is_merged(straight, base_dir, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    from gpt2_jax.convert import main as convert

    assert convert([str(base_dir), str(tmp_path / "base-hf"), "--to", "hf"]) == 0
    assert convert([str(straight), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert convert([str(straight), str(tmp_path / "merged-hf"), "--to", "hf"]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["target_modules"] == list(lora.TARGETS)

    tokens = np.random.default_rng(0).integers(0, CONFIG.n_vocab, (2, 24))
    model = load_model(straight, dtype="float32")
    ours = np.asarray(GPT2(model.config).apply({"params": model.params}, tokens))
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base-hf").eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    # Every target of every layer has its adapter: attn.c_proj and mlp.c_proj were told apart.
    lora_modules = [n for n, m in adapted.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(lora_modules) == len(lora.TARGETS) * CONFIG.n_layer
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged-hf").eval()
    with torch.no_grad():
        theirs = adapted(torch.from_numpy(tokens)).logits.numpy()
        from_merged = merged(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    np.testing.assert_allclose(from_merged, ours, atol=1e-4)
    card = (tmp_path / "merged-hf" / "README.md").read_text()
    assert "- lora\n" in card and "- method: LoRA (rank " in card  # the merged model's card says how it was tuned
    assert "LoRA" not in (tmp_path / "base-hf" / "README.md").read_text()
    with pytest.raises(UserError, match="not a LoRA training run"):
        convert([str(base_dir), str(tmp_path / "nope"), "--to", "peft"])


def test_train_config_keeps_lora_flags_in_the_saved_options():
    options = TrainConfig(lora_rank=8, lora_targets="c_attn,c_fc").to_json()
    assert options["lora_rank"] == 8 and options["lora_targets"] == "c_attn,c_fc" and options["dropout"] == 0.0
