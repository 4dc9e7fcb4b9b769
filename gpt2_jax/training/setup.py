"""Everything train.py builds before the first step: run directory, options, model, data, devices, state.

How a run starts depends on `--restore_from` and on what the run directory holds:

    (not given) / fresh   new run; a directory holding checkpoints is refused unless `fresh --overwrite`
    latest                continue the newest complete checkpoint (its options, except flags given again); an
                          empty directory starts fresh, as gpt-2-simple does
    PATH                  continue another run's (or an older) checkpoint in this directory; `--overwrite` is
                          needed when this directory already holds checkpoints

Half-written checkpoints (a run killed while saving) are reported and removed; a checkpoint that does not read back
is skipped with a warning for the one before it.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gpt2_jax.config import GPT2Config, count_params, get_config
from gpt2_jax.data import files as data_files
from gpt2_jax.data.dataset import TokenDataset, load_dataset
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.model.flops import peak_flops
from gpt2_jax.model.transformer import abstract_params, init_params
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer, load_tokenizer
from gpt2_jax.tokenizers.sentencepiece import train_sentencepiece
from gpt2_jax.training.checkpoints import Checkpoints, complete_steps, half_written, resolve_checkpoint_path
from gpt2_jax.training.config import DEMO_ACCELERATOR, DEMO_CPU, SCRATCH_PREFIX, TrainConfig, is_scratch, resolve
from gpt2_jax.training.distributed import barrier, is_primary
from gpt2_jax.training.mesh import bytes_per_device, choose_strategy, gib, tree_shardings
from gpt2_jax.training.optim import learning_rate_schedule, make_optimizer
from gpt2_jax.training.run_dir import RunDir
from gpt2_jax.training.step import (
    TrainState,
    build_eval_step,
    build_train_step,
    check_batch,
    create_state,
    make_mesh,
    select_devices,
)
from gpt2_jax.weights import native
from gpt2_jax.weights.loading import default_compute_dtype, load_model

PRETRAINED_CANDIDATES = ("models/124M-jax", "models/124M", "models/gpt2")  # converted first: it loads fastest
MODEL_MARKERS = ("gpt2_jax.json", "model.ckpt.index", "model.safetensors", "checkpoint")


@dataclasses.dataclass
class Session:
    cfg: TrainConfig
    run: RunDir
    checkpoints: Checkpoints
    model_config: GPT2Config
    tokenizer: Any
    dataset: TokenDataset
    seq_len: int
    mesh: jax.sharding.Mesh
    sharding: str  # 'replicated' or 'fsdp' (sharding.py)
    state: TrainState
    train_step: Any
    eval_step: Any
    start_step: int
    meta: dict[str, Any] | None  # the restored checkpoint's meta, None for a fresh run
    records: list[dict[str, Any]]  # metrics so far (kept from a resumed run)
    peak_flops: float
    description: str

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


def note(message: str) -> None:
    if is_primary():
        print(f"note: {message}", file=sys.stderr, flush=True)


def find_pretrained(search_dirs: list[Path]) -> str | None:
    for base in search_dirs:
        for name in PRETRAINED_CANDIDATES:
            path = base / name
            if path.is_dir() and any((path / marker).exists() for marker in MODEL_MARKERS):
                return str(path) if base == Path.cwd() else str(path.absolute())
    return None


def _refuse_existing(run: RunDir, steps: list[int], what: str) -> UsageError:
    return UsageError(
        f"{run.path} already holds checkpoints (newest: step {steps[-1]}) and {what}; continue it with "
        "--restore_from latest, start over with --restore_from fresh --overwrite (deletes them), "
        "or train into another --run_name."
    )


def choose_start(run: RunDir, explicit: dict[str, Any]) -> tuple[str, Path | None, int | None]:
    """('fresh' | 'resume' | 'path', source checkpoints dir, source step) from --restore_from and the directory."""
    existing = complete_steps(run.checkpoints)
    restore_from, overwrite = explicit.get("restore_from"), bool(explicit.get("overwrite"))
    if restore_from is None or restore_from == "fresh":
        if existing and not (restore_from == "fresh" and overwrite):
            what = "--overwrite was not given" if restore_from == "fresh" else "no --restore_from was given"
            raise _refuse_existing(run, existing, what)
        return "fresh", None, None
    if restore_from == "latest":
        if not existing:
            note(f"{run.path} has no complete checkpoint yet, so this run starts fresh")
            return "fresh", None, None
        return "resume", run.checkpoints.absolute(), None
    source, step = resolve_checkpoint_path(restore_from)
    if source == run.checkpoints.absolute() and (step is None or (existing and step == existing[-1])):
        return "resume", source, None
    if existing and not overwrite:
        raise _refuse_existing(run, existing, f"--restore_from {restore_from} would continue elsewhere")
    return "path", source, step


def build_fresh_model(cfg: TrainConfig, dtype: str, dataset_path: str) -> tuple[GPT2Config, Any, Any, str]:
    """(config, params, tokenizer, description) from --init: scratch:PRESET or anything load_model reads."""
    if is_scratch(cfg.init):
        preset = cfg.init[len(SCRATCH_PREFIX) :]
        if cfg.tokenizer == "sentencepiece":
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer = train_sentencepiece(_dataset_texts(dataset_path), cfg.vocab_size, tmp)
            vocab = f"a new {tokenizer.n_vocab}-piece SentencePiece vocabulary"
        else:
            tokenizer, vocab = gpt2_tokenizer(), "GPT-2's vocabulary"
        config = get_config(preset, n_vocab=tokenizer.n_vocab)
        params = init_params(config, cfg.seed)
        return config, params, tokenizer, f"{preset} from scratch ({vocab})"
    loaded = load_model(cfg.init, dtype=dtype, seed=cfg.seed)
    return loaded.config, loaded.params, loaded.tokenizer, loaded.source


def _dataset_texts(path: str):
    """The dataset's text documents, for training a SentencePiece vocabulary on them."""
    files = data_files.find_dataset_files(path)
    texts = (p for f in files.paths for _, p, _ in data_files.read_file(f, 1 << 32, False) if isinstance(p, str))
    return texts


@functools.lru_cache(maxsize=4)
def abstract_state(model_config: GPT2Config, optimizer: Any) -> TrainState:
    """The training state's shapes and dtypes (`jax.eval_shape`: nothing allocated, even for 1558M); traced once per
    configuration, though the memory check, the step's shardings and a restore all ask for it."""
    return jax.eval_shape(lambda p: create_state(p, optimizer, 0), abstract_params(model_config))


def restore_state(
    source: Checkpoints, step: int | None, abstract: TrainState, shardings: TrainState
) -> tuple[TrainState, dict[str, Any]]:
    """The newest readable checkpoint (not after `step`), its arrays placed straight onto `shardings`."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored_step, params, opt_state, meta = source.restore_newest(target.params, target.opt_state, at_most=step)
    if step is not None and restored_step != step:
        note(f"checkpoint step {step} does not read back; continuing from step {restored_step} instead")
    # From numpy, not a jnp array: a process may place host values on a mesh spanning other hosts' devices.
    step_array = jax.device_put(np.asarray(restored_step, np.int32), shardings.step)
    rng = jax.device_put(np.asarray(meta["rng"], np.uint32), shardings.rng)
    return TrainState(params=params, opt_state=opt_state, step=step_array, rng=rng), meta


def prepare(explicit: dict[str, Any], *, bundled_dataset: str) -> Session:
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
    leftovers = half_written(run.checkpoints)
    if leftovers:
        names = ", ".join(p.name for p in leftovers)
        note(f"ignoring half-written checkpoint(s) {names} in {run.checkpoints} (a run stopped while saving them)")
    mode, source_dir, source_step = choose_start(run, explicit)

    saved, defaults = None, None
    if mode != "fresh":
        saved = RunDir(source_dir.parent).read_training_options() or {}
    elif "init" not in explicit:
        pretrained = find_pretrained([Path.cwd(), Path(bundled_dataset).parent.parent])
        defaults = {"init": pretrained} if pretrained else dict(DEMO_CPU if _on_cpu() else DEMO_ACCELERATOR)
        if not pretrained:
            print(
                "No pretrained GPT-2 found in models/124M (get it with `python -m gpt2_jax.download 124M`), so "
                f"this is the demo: a small GPT-2 ({defaults['init']}, 6 layers x 384, its own "
                f"{defaults['vocab_size']}-piece vocabulary) trained from scratch for "
                f"{explicit.get('steps', defaults['steps'])} steps, then samples. Pass --init to choose the model.",
                flush=True,
            )
    cfg = resolve(explicit, saved=saved, defaults=defaults)
    if cfg.warmup_steps >= cfg.steps:
        note(f"--warmup_steps {cfg.warmup_steps} is not below --steps {cfg.steps}: the rate never peaks")
    dataset_path = cfg.dataset or bundled_dataset
    dtype = cfg.dtype or default_compute_dtype()
    devices = select_devices(cfg.devices)  # flags that need no model or data fail first
    per_device = check_batch(cfg.batch_size, len(devices), cfg.accumulate_gradients)
    mesh = make_mesh(devices)

    if mode == "fresh":
        model_config, params, tokenizer, description = build_fresh_model(cfg, dtype, dataset_path)
    else:
        model_dir = source_dir.parent
        model_config = native.read_model_json(model_dir)
        tokenizer, params, description = load_tokenizer(model_dir), None, f"{model_dir.name}, continued"
    # How the model computes (none of it changes the params): compute dtype, remat, layers unrolled per scan step.
    unroll = min(cfg.scan_unroll or default_scan_unroll(model_config), model_config.n_layer)
    model_config = model_config.replace(dtype=dtype, remat=cfg.remat, scan_unroll=unroll)
    seq_len = cfg.seq_len or model_config.n_ctx
    if seq_len > model_config.n_ctx:
        raise UsageError(f"--seq_len {seq_len} is longer than the model's context n_ctx={model_config.n_ctx}.")
    cfg = dataclasses.replace(cfg, seq_len=seq_len)
    dataset = _load_dataset_once(dataset_path, tokenizer, cfg.val_fraction, cfg.val_dataset, seq_len)

    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.learning_rate / 10
    hyper = (cfg.learning_rate, cfg.warmup_steps, cfg.steps, cfg.lr_schedule, min_lr, cfg.weight_decay,
             cfg.grad_clip, cfg.beta1, cfg.beta2)  # fmt: skip
    sharding, state_bytes = choose_sharding(cfg.sharding, model_config, hyper, mesh)
    shardings, init_state, train_step, eval_step = step_functions(
        model_config, hyper, mesh, cfg.accumulate_gradients, sharding
    )

    checkpoints = Checkpoints(run.checkpoints, keep=cfg.keep)
    meta = None
    if mode == "fresh":
        deleted = checkpoints.delete_after(None)  # only non-empty with --restore_from fresh --overwrite
        if deleted:
            note(f"--overwrite: deleted checkpoints {', '.join(map(str, deleted))} of {run.path}")
        run.clear_outputs()
        if jax.process_count() > 1:  # each process loaded its own copy: hand the step host arrays to place
            params = jax.device_get(params)
        state, start_step, records = init_state(params, cfg.seed), 0, []
        del params  # the state holds the only copy the run needs
    else:
        source = checkpoints if mode == "resume" else Checkpoints(source_dir, read_only=True)
        abstract = abstract_state(model_config, optimizer_and_schedule(hyper)[0])
        state, meta = restore_state(source, source_step, abstract, shardings)
        start_step = int(meta["step"])
        elsewhere = source_dir != run.checkpoints.absolute()
        # Newer checkpoints here would shadow the ones this run writes: they failed to read back (resume) or
        # --overwrite asked for them to go (rolling back, or continuing another run's checkpoint).
        deleted = checkpoints.delete_after(None if elsewhere else start_step)
        if deleted:
            note(f"deleted checkpoints {', '.join(map(str, deleted))} of {run.path}")
        if elsewhere:
            run.clear_outputs()
        records = [] if elsewhere else run.keep_metrics_until(start_step)
    run.write_model(model_config, tokenizer, cfg.to_json())

    peak, peak_source = _peak_flops(devices[0], dtype)
    if devices[0].platform != "cpu":  # CPU "devices" share one socket: the measured peak is already the total
        peak *= len(devices)
    session = Session(
        cfg, run, checkpoints, model_config, tokenizer, dataset, seq_len, mesh, sharding, state, train_step,
        eval_step, start_step, meta, records, peak, description,
    )  # fmt: skip
    _print_summary(session, mode, devices, per_device, min_lr, peak_source, state_bytes)
    return session


def _load_dataset_once(path: str, tokenizer: Any, val_fraction: float, val_path: str | None, seq_len: int):
    """The dataset, tokenized by process 0 alone in a multi-process run: the others wait, then read its token cache
    (or tokenize for themselves where the data folder is not shared)."""
    load = lambda: load_dataset(path, tokenizer, val_fraction=val_fraction, val_path=val_path, seq_len=seq_len)
    if jax.process_count() == 1:
        return load()
    if not is_primary():
        barrier("dataset tokenized")
        return load()
    try:
        return load()
    finally:  # also when it fails: the others then fail on the same data with the same sentence, not hang
        barrier("dataset tokenized")


def choose_sharding(requested: str, model_config: GPT2Config, hyper: tuple, mesh) -> tuple[str, dict[str, int]]:
    """('replicated' | 'fsdp', per-device bytes of the state under each), checked against the devices' memory
    before anything is allocated."""
    abstract = abstract_state(model_config, optimizer_and_schedule(hyper)[0])
    state_bytes = {k: bytes_per_device(abstract, tree_shardings(abstract, mesh, k)) for k in ("replicated", "fsdp")}
    device = mesh.devices.flat[0]
    return choose_strategy(requested, state_bytes, device, mesh.devices.size), state_bytes


@functools.lru_cache(maxsize=4)
def optimizer_and_schedule(hyper: tuple) -> tuple:
    """(optimizer, schedule) from the optimizer hyperparameters."""
    lr, warmup, steps, schedule_name, min_lr, weight_decay, grad_clip, b1, b2 = hyper
    schedule = learning_rate_schedule(lr, warmup_steps=warmup, total_steps=steps, schedule=schedule_name, min_lr=min_lr)
    return make_optimizer(schedule, weight_decay=weight_decay, grad_clip=grad_clip, b1=b1, b2=b2), schedule


@functools.lru_cache(maxsize=4)
def step_functions(model_config: GPT2Config, hyper: tuple, mesh, accumulate: int, sharding: str) -> tuple:
    """(state shardings, init_state, train_step, eval_step) per configuration: a process that trains twice (tests,
    a notebook) compiles once, since jit caches executables per function object."""
    optimizer, schedule = optimizer_and_schedule(hyper)
    shardings = tree_shardings(abstract_state(model_config, optimizer), mesh, sharding)
    init_state = jax.jit(lambda params, seed: create_state(params, optimizer, seed), out_shardings=shardings)
    return (
        shardings,
        init_state,
        build_train_step(model_config, optimizer, schedule, mesh, accumulate=accumulate, state_sharding=shardings),
        build_eval_step(model_config, mesh, shardings.params),
    )


@functools.cache
def _peak_flops(device: jax.Device, dtype: str) -> tuple[float, str]:
    return peak_flops(device, dtype)


def default_scan_unroll(config: GPT2Config) -> int:
    """Layers per scan iteration when --scan_unroll is not given: all of them on GPU/TPU, where the scan's slicing
    and stacking copies cost ~25% of a 124M step (H200), one on a CPU, where unrolling only lengthens the compile."""
    return 1 if _on_cpu() else config.n_layer


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _print_summary(
    s: Session, mode: str, devices: list, per_device: int, min_lr: float, peak_source: str, state_bytes: dict
) -> None:
    cfg, mc = s.cfg, s.model_config
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    layout = "replicated" if s.sharding == "replicated" else f"sharded {len(devices)} ways (fsdp)"
    other = "fsdp" if s.sharding == "replicated" else "replicated"
    state = f"state: params + AdamW {gib(state_bytes[s.sharding])} per device, {layout}"
    if len(devices) > 1:
        state += f"; {other}: {gib(state_bytes[other])}"
    start = {"fresh": "new run", "resume": f"resuming at step {s.start_step}", "path": f"from step {s.start_step}"}
    lines = [
        f"run: {s.run.path} ({start[mode]}), {cfg.steps} steps",
        f"model: {s.description}: {mc.n_layer} layers x {mc.n_embd} ({mc.n_head} heads), vocab {mc.n_vocab}, "
        f"{count_params(mc):,} params; {mc.dtype} compute, float32 params{', remat' if mc.remat else ''}",
        f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}){processes}",
        state,
        f"batch: global {cfg.batch_size} sequences = {per_device} per device x {len(devices)} devices x "
        f"{cfg.accumulate_gradients} micro-batches; seq_len {s.seq_len}; {cfg.batch_size * s.seq_len:,} tokens/step",
        f"optimizer: AdamW lr {cfg.learning_rate:g} ({cfg.lr_schedule}, {cfg.warmup_steps} warmup steps"
        + (f", to {min_lr:g})" if cfg.lr_schedule == "cosine" else ")")
        + f", weight decay {cfg.weight_decay:g}, grad clip {cfg.grad_clip:g}",
        f"MFU against {s.peak_flops / 1e12:.3g} TFLOP/s ({peak_source})",
    ]
    print("\n".join(lines), flush=True)
