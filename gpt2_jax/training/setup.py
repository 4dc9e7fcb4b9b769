"""Everything train.py builds before the first step, as one `Session`: run directory, options, devices, model, data,
state, compiled steps.

`prepare` takes the run directory's lock, then builds in this order, so that a bad flag fails before anything slow:
the start and the options (start.py), the devices and the mesh, the model (from `--init`, or the one a checkpoint
continues) and how it computes, the dataset, the state and its compiled steps (state.py). It ends by writing the
run's model description and printing a summary of what it built.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

from gpt2_jax.config import GPT2Config, get_config, is_scratch, scratch_preset
from gpt2_jax.console import is_primary, note, warn
from gpt2_jax.data import files as data_files
from gpt2_jax.data.dataset import TokenDataset, load_dataset
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.model.flops import peak_flops
from gpt2_jax.model.lora import LoraConfig, adapter_count
from gpt2_jax.model.params import count_params
from gpt2_jax.model.transformer import Tuning, init_params
from gpt2_jax.precision import resolve_compute_dtype
from gpt2_jax.tokenizers.base import Tokenizer
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer, load_tokenizer
from gpt2_jax.tokenizers.sentencepiece import train_sentencepiece
from gpt2_jax.training.checkpoints import Checkpoints
from gpt2_jax.training.config import TrainConfig
from gpt2_jax.training.distributed import barrier
from gpt2_jax.training.memory import StepMemory, StepShape, advice, alternatives, estimate
from gpt2_jax.training.mesh import check_batch, device_memory_bytes, gib, make_mesh, on_cpu, select_devices
from gpt2_jax.training.optim import OptimizerConfig
from gpt2_jax.training.run_dir import RunDir
from gpt2_jax.training.start import StartMode, resolve_start
from gpt2_jax.training.state import (
    abstract_state,
    choose_sharding,
    fresh_state,
    placeable,
    restored_state,
    step_functions,
)
from gpt2_jax.training.step import TrainState
from gpt2_jax.weights import native
from gpt2_jax.weights.loading import load_lora_base, load_model
from gpt2_jax.weights.lora_run import LoraRecord, base_reference, read_record


@dataclasses.dataclass
class Session:
    cfg: TrainConfig  # resolved: seq_len is set
    run: RunDir
    checkpoints: Checkpoints
    model_config: GPT2Config
    tokenizer: Tokenizer
    dataset: TokenDataset
    seq_len: int
    mesh: jax.sharding.Mesh
    sharding: str  # 'replicated' or 'fsdp' (mesh.py)
    state: TrainState
    train_step: Callable
    eval_step: Callable
    start_step: int
    meta: dict[str, Any] | None  # the restored checkpoint's meta, None for a fresh run
    records: list[dict[str, Any]]  # metrics so far (kept from a resumed run)
    peak_flops: float | None  # of all the devices together; None for an accelerator without a known peak
    description: str
    dtype_reason: str  # why the compute dtype is what it is (precision.py), for the start-up line

    def close(self) -> None:
        """Finish pending saves (reporting, not raising, a failure: an error may already be on its way out)."""
        try:
            self.checkpoints.wait()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
        finally:
            try:
                self.checkpoints.close()
            finally:
                self.run.lock.release()


def prepare(explicit: dict[str, Any], *, bundled_dataset: str) -> Session:
    """The session for the flags the user gave (`explicit`), holding the run directory's lock."""
    run = RunDir(explicit.get("out") or f"runs/{explicit.get('run_name', 'run1')}", writer=is_primary())
    run.create()
    took_over = run.lock.acquire() if run.writer else None
    if took_over:
        note(took_over)
    try:
        return _prepare_locked(run, explicit, bundled_dataset)
    except BaseException:
        run.lock.release()
        raise


def _prepare_locked(run: RunDir, explicit: dict[str, Any], bundled_dataset: str) -> Session:
    cfg, start = resolve_start(run, explicit, bundled_dataset)
    dataset_path = cfg.dataset or bundled_dataset
    devices = select_devices(cfg.devices)  # flags that need no model or data fail first
    dtype, dtype_reason = resolve_compute_dtype(cfg.dtype, devices[0])
    per_device = check_batch(cfg.batch_size, len(devices), cfg.accumulate_gradients)
    mesh = make_mesh(devices)

    lora_config = cfg.lora()
    if start.fresh:
        model_config, params, tokenizer, description = build_fresh_model(cfg, dtype, dataset_path)
        record = LoraRecord(lora_config, base_reference(cfg.init, cfg.seed, params)) if lora_config else None
    else:
        model_config, params, tokenizer, description = continued_model(start.source.parent)
        record = continued_lora(start.source.parent, lora_config)
        if record is not None:  # the checkpoint holds the adapters; the base comes from where the run recorded it
            params = load_lora_base(record, start.source.parent)
    model_config = compute_settings(model_config, cfg, dtype)
    cfg = dataclasses.replace(cfg, seq_len=checked_seq_len(cfg.seq_len, model_config))
    dataset = _load_dataset_once(dataset_path, tokenizer, cfg)

    optimizer = OptimizerConfig.of(cfg)
    tuning = Tuning(lora=lora_config, dropout=cfg.dropout)
    sharding, state_bytes = choose_sharding(cfg.sharding, model_config, optimizer, mesh, lora_config)
    step_shape = StepShape(model_config, optimizer, tuning, per_device, cfg.seq_len, cfg.accumulate_gradients, mesh,
                           sharding)  # fmt: skip
    memory = estimate(step_shape)
    compiled = step_functions(model_config, optimizer, mesh, cfg.accumulate_gradients, sharding, tuning)
    checkpoints = Checkpoints(run.checkpoints, keep=cfg.keep)
    if start.fresh:
        begin = fresh_state(run, checkpoints, params, cfg.seed, compiled.init_state)
    else:
        abstract = abstract_state(model_config, optimizer, lora_config)
        begin = restored_state(run, checkpoints, start, abstract, compiled.shardings)
        if record is not None:
            frozen = compiled.place_frozen(placeable(params))
            begin = dataclasses.replace(begin, state=begin.state.replace(frozen=frozen))
    del params  # the state holds the only copy the run needs
    run.write_model(model_config, tokenizer, cfg.to_json(), lora=record.to_json() if record else None)

    peak, peak_source = _peak_flops(devices[0], dtype)
    if peak is not None and devices[0].platform != "cpu":  # CPU "devices" share one socket: the measured peak is
        peak *= len(devices)  # already the total
    session = Session(
        cfg=cfg, run=run, checkpoints=checkpoints, model_config=model_config, tokenizer=tokenizer, dataset=dataset,
        seq_len=cfg.seq_len, mesh=mesh, sharding=sharding, state=begin.state, train_step=compiled.train_step,
        eval_step=compiled.eval_step, start_step=begin.step, meta=begin.meta, records=begin.records, peak_flops=peak,
        description=description, dtype_reason=dtype_reason,
    )  # fmt: skip
    _print_summary(session, start, devices, per_device, optimizer, peak_source, state_bytes, memory)
    _check_memory(step_shape, memory, devices[0])
    return session


# --- the model ------------------------------------------------------------------------------------------------------
def build_fresh_model(cfg: TrainConfig, dtype: str, dataset_path: str) -> tuple[GPT2Config, Any, Tokenizer, str]:
    """(config, params, tokenizer, description) from --init: scratch:PRESET or anything load_model reads."""
    if is_scratch(cfg.init):
        preset = scratch_preset(cfg.init)
        if cfg.tokenizer == "sentencepiece":
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer = train_sentencepiece(_dataset_texts(dataset_path, cfg.text_column), cfg.vocab_size, tmp)
            vocab = f"a new {tokenizer.n_vocab}-piece SentencePiece vocabulary"
        else:
            tokenizer, vocab = gpt2_tokenizer(), "GPT-2's vocabulary"
        config = get_config(preset, n_vocab=tokenizer.n_vocab)
        params = init_params(config, cfg.seed)
        return config, params, tokenizer, f"{preset} from scratch ({vocab})"
    loaded = load_model(cfg.init, dtype=dtype, seed=cfg.seed)
    return loaded.config, loaded.params, loaded.tokenizer, loaded.source


def continued_model(model_dir: Path) -> tuple[GPT2Config, None, Tokenizer, str]:
    """(config, no params: the checkpoint holds them, tokenizer, description) of the run a checkpoint belongs to."""
    return native.read_model_json(model_dir), None, load_tokenizer(model_dir), f"{model_dir.name}, continued"


def adapter_shape(lora_config: LoraConfig | None) -> tuple | None:
    """What a checkpoint's adapters depend on (--lora_dropout may change between runs)."""
    return None if lora_config is None else (lora_config.rank, lora_config.alpha, lora_config.targets)


def continued_lora(model_dir: Path, lora_config: LoraConfig | None) -> LoraRecord | None:
    """The LoRA record of the run a checkpoint belongs to; its checkpoints fit only the same adapters."""
    record = read_record(model_dir)
    if adapter_shape(record.lora if record else None) != adapter_shape(lora_config):
        had = f"LoRA {record.lora}" if record else "full fine-tuning"
        now = f"LoRA {lora_config}" if lora_config else "full fine-tuning"
        raise UsageError(
            f"The checkpoints of {model_dir} were trained with {had} and this run asks for {now}; continue with the "
            "same --lora_rank, --lora_alpha and --lora_targets, or start a new run."
        )
    return record._replace(lora=lora_config) if record else None


def _dataset_texts(path: str, text_column: str | None) -> Iterator[str]:
    """The dataset's text documents, for training a SentencePiece vocabulary on them."""
    files = data_files.find_dataset_files(path)
    if data_files.are_shards(files, "--dataset"):
        raise UsageError(
            "--tokenizer sentencepiece learns a vocabulary from text, but --dataset names llm.c shards, which hold "
            "GPT-2's token ids already; leave --tokenizer at gpt2."
        )
    pieces = (piece for f in files.paths for piece in data_files.read_file(f, 1 << 32, False, text_column))
    return (text for _, text, _ in pieces if isinstance(text, str))


def compute_settings(config: GPT2Config, cfg: TrainConfig, dtype: str) -> GPT2Config:
    """How the model computes (none of it changes the params): compute dtype, remat, layers unrolled per scan step."""
    unroll = min(cfg.scan_unroll or default_scan_unroll(config), config.n_layer)
    return config.replace(dtype=dtype, remat=cfg.remat, scan_unroll=unroll)


def default_scan_unroll(config: GPT2Config) -> int:
    """Layers per scan iteration when --scan_unroll is not given: all of them on GPU/TPU, where the scan's slicing
    and stacking copies cost ~25% of a 124M step (H200), one on a CPU, where unrolling only lengthens the compile."""
    return 1 if on_cpu() else config.n_layer


def checked_seq_len(seq_len: int | None, config: GPT2Config) -> int:
    """--seq_len, by default the model's context, which it may not exceed."""
    seq_len = seq_len or config.n_ctx
    if seq_len > config.n_ctx:
        raise UsageError(f"--seq_len {seq_len} is longer than the model's context n_ctx={config.n_ctx}.")
    return seq_len


# --- the data -------------------------------------------------------------------------------------------------------
def _load_dataset_once(path: str, tokenizer: Tokenizer, cfg: TrainConfig) -> TokenDataset:
    """The dataset, tokenized by process 0 alone in a multi-process run: the others wait, then read its token cache
    (or tokenize for themselves where the data folder is not shared)."""

    def load() -> TokenDataset:
        return load_dataset(
            path,
            tokenizer,
            val_fraction=cfg.val_fraction,
            val_path=cfg.val_dataset,
            seq_len=cfg.seq_len,
            text_column=cfg.text_column,
        )

    if jax.process_count() == 1:
        return load()
    if not is_primary():
        barrier("dataset tokenized")
        return load()
    try:
        return load()
    finally:  # also when it fails: the others then fail on the same data with the same sentence, not hang
        barrier("dataset tokenized")


# --- the summary ----------------------------------------------------------------------------------------------------
@functools.cache
def _peak_flops(device: jax.Device, dtype: str) -> tuple[float | None, str]:
    """The peak behind MFU, taken once per process (a CPU's is measured): every log line of a run divides by it."""
    return peak_flops(device, dtype)


def _print_summary(
    s: Session,
    start: StartMode,
    devices: list[jax.Device],
    per_device: int,
    optimizer: OptimizerConfig,
    peak_source: str,
    state_bytes: dict[str, int],
    memory: StepMemory,
) -> None:
    cfg, mc = s.cfg, s.model_config
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    layout = "replicated" if s.sharding == "replicated" else f"sharded {len(devices)} ways (fsdp)"
    other = "fsdp" if s.sharding == "replicated" else "replicated"
    lora_config = cfg.lora()
    what = "frozen base + LoRA adapters + their AdamW" if lora_config else "params + AdamW"
    state = f"state: {what} {gib(state_bytes[s.sharding])} per device, {layout}"
    if len(devices) > 1:
        state += f"; {other}: {gib(state_bytes[other])}"
    how = {"fresh": "new run", "resume": f"resuming at step {s.start_step}", "path": f"from step {s.start_step}"}
    budget = device_memory_bytes(devices[0])
    of = f" of the {gib(budget)} a {devices[0].device_kind} gives JAX" if budget else ""
    lines = [
        f"run: {s.run.path} ({how[start.kind]}), {cfg.steps} steps",
        f"model: {s.description}: {mc.n_layer} layers x {mc.n_embd} ({mc.n_head} heads), vocab {mc.n_vocab}, "
        f"{count_params(mc):,} params; {mc.dtype} compute ({s.dtype_reason}), float32 params"
        + (", remat" if mc.remat else ""),
        f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}){processes}",
        *([_lora_line(lora_config, mc)] if lora_config else []),
        state,
        f"memory: {memory.describe()}, estimated before compiling{of}",
        f"batch: global {cfg.batch_size} sequences = {per_device} per device x {len(devices)} devices x "
        f"{cfg.accumulate_gradients} micro-batches; seq_len {s.seq_len}; {cfg.batch_size * s.seq_len:,} tokens/step",
        f"optimizer: AdamW lr {cfg.learning_rate:g} ({cfg.lr_schedule}, {cfg.warmup_steps} warmup steps"
        + (f", to {optimizer.min_lr:g})" if cfg.lr_schedule == "cosine" else ")")
        + f", weight decay {cfg.weight_decay:g}, grad clip {cfg.grad_clip:g}",
        peak_source if s.peak_flops is None else f"MFU against {s.peak_flops / 1e12:.3g} TFLOP/s ({peak_source})",
    ]
    if cfg.dropout or cfg.lora_dropout:
        lines.append(f"dropout: {cfg.dropout:g} (embedding, attention, residual), {cfg.lora_dropout:g} (LoRA input)")
    print("\n".join(lines), flush=True)


def _check_memory(step: StepShape, memory: StepMemory, device: jax.Device) -> None:
    """A warning, with what would fit, when the step's estimate exceeds what the device gives JAX (GPUs and TPUs
    report it; CPUs do not). Only a warning: the estimate leaves out XLA's workspace and may err either way."""
    budget = device_memory_bytes(device)
    if budget is not None and memory.total > budget:
        warn(advice(memory, budget, device.device_kind, alternatives(step)))


def _lora_line(lora_config: LoraConfig, mc: GPT2Config) -> str:
    trainable = adapter_count(mc, lora_config)
    return (
        f"LoRA: rank {lora_config.rank}, alpha {lora_config.alpha:g} on {', '.join(lora_config.targets)}: "
        f"{trainable:,} trainable params ({100 * trainable / count_params(mc):.2f}% of the model), base frozen"
    )
