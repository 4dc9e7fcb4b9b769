"""Training options: one frozen dataclass, its command line, and where each value comes from.

Every field of `TrainConfig` is a `train.py` flag of the same name, documented with its default in `--help`.
A value is taken, first match wins, from: the command line; the run being resumed (its `gpt2_jax.json` keeps the
options it was started with, so `--restore_from latest` continues with the same settings and only the flags given
again change); the demo defaults (below); the field default. The field defaults fit GPT-2 124M on one 24 GB GPU.

The demo: `python train.py` with no `--init` on a machine without `models/124M` trains the small `scratch:mini`
GPT-2 (6 layers x 384) from scratch on the bundled corpus for a few minutes instead of failing, with the defaults
in `DEMO_CPU` / `DEMO_ACCELERATOR` for every flag not given.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from gpt2_jax.cli import ArgumentParser
from gpt2_jax.config import is_scratch
from gpt2_jax.console import warn
from gpt2_jax.errors import UsageError
from gpt2_jax.hints import command_for
from gpt2_jax.model.lora import DEFAULT_TARGETS, TARGETS, LoraConfig, parse_targets
from gpt2_jax.precision import DEFAULT_DTYPE_HELP
from gpt2_jax.training.tracking import check_trackers
from gpt2_jax.unicode import repair_decoded


def _opt(default: Any, help: str, *, type: Any = None, choices: tuple[str, ...] | None = None, shown: str = ""):
    return dataclasses.field(
        default=default, metadata={"help": help, "type": type, "choices": choices, "shown": shown or repr(default)}
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # --- data
    dataset: str | None = _opt(None, "text file, folder or glob to train on", type=str, shown="the bundled corpus")
    val_dataset: str | None = _opt(
        None, "separate validation dataset", type=str, shown="hold out --val_fraction of --dataset"
    )
    val_fraction: float = _opt(0.05, "fraction of the dataset's tokens held out for validation", type=float)
    text_column: str | None = _opt(
        None, "field or column that holds the text in .jsonl, .csv and .parquet files", type=str, shown="text"
    )
    # --- where
    run_name: str = _opt("run1", "run directory name under runs/", type=str)
    out: str | None = _opt(None, "run directory path", type=str, shown="runs/RUN_NAME")
    # --- model
    init: str | None = _opt(
        None,
        "weights to start from: any model sample.py accepts (a path, gpt2/124M/..., a Hub id), or "
        "scratch:NAME (tiny, mini, 124M, ...) to train from random weights",
        type=str,
        shown="models/124M when present, else the demo (scratch:mini)",
    )
    tokenizer: str = _opt("gpt2", "vocabulary for scratch:PRESET", type=str, choices=("gpt2", "sentencepiece"))
    vocab_size: int = _opt(8192, "SentencePiece vocabulary size (with --tokenizer sentencepiece)", type=int)
    dtype: str | None = _opt(
        None, "compute dtype; params and optimizer state stay float32", type=str,
        choices=("float32", "bfloat16", "float16"), shown=DEFAULT_DTYPE_HELP + "; float16 trains with loss scaling",
    )  # fmt: skip
    remat: bool = _opt(False, "recompute activations in the backward pass (less memory, ~30% more compute)", type=bool)
    scan_unroll: int | None = _opt(
        None, "transformer layers per scan iteration (more: faster steps, longer compile)", type=int,
        shown="all layers on GPU/TPU (124M on an H200: 335k -> 452k tok/s), 1 on CPU",
    )  # fmt: skip
    # --- fine-tuning: LoRA and dropout (README: LoRA)
    lora_rank: int = _opt(
        0, "train LoRA adapters of this rank on a frozen --init model instead of every weight", type=int,
        shown="0: full fine-tuning",
    )  # fmt: skip
    lora_alpha: float | None = _opt(None, "LoRA scale numerator: adapters add alpha/rank * x A B", type=float,
                                    shown="the rank (scale 1, as PEFT's r=8, alpha=8)")  # fmt: skip
    lora_targets: str = _opt(
        DEFAULT_TARGETS, f"layers that get adapters, comma-separated among {', '.join(TARGETS)}, or all", type=str
    )
    lora_dropout: float = _opt(0.0, "dropout on the LoRA adapters' input, in training", type=float)
    dropout: float = _opt(
        0.0,
        "GPT-2's embedding, attention and residual dropout in training (0.1 in its pretraining; 0: none)",
        type=float,
    )
    # --- batch
    devices: str = _opt("all", "'all' local devices or a number of them (data parallel)", type=str)
    sharding: str = _opt(
        "auto", "the params and AdamW state: replicated on every device, or split across them (fsdp)", type=str,
        choices=("auto", "replicated", "fsdp"), shown="auto: replicated when it fits the devices' memory",
    )  # fmt: skip
    batch_size: int = _opt(8, "global batch in sequences, over all devices and accumulation steps", type=int)
    accumulate_gradients: int = _opt(1, "micro-batches per optimizer step (divides --batch_size)", type=int)
    seq_len: int | None = _opt(None, "tokens per sequence", type=int, shown="the model's n_ctx")
    # --- optimizer
    learning_rate: float | None = _opt(
        None, "peak learning rate", type=float, shown="1e-4 to fine-tune, 6e-4 from scratch, 1e-3 for the demo"
    )
    warmup_steps: int = _opt(100, "linear warmup steps", type=int)
    lr_schedule: str = _opt("cosine", "after warmup", type=str, choices=("cosine", "constant"))
    min_lr: float | None = _opt(None, "final rate of the cosine schedule", type=float, shown="learning_rate / 10")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices and embeddings only)", type=float)
    beta1: float = _opt(0.9, "AdamW beta1", type=float)
    beta2: float = _opt(0.95, "AdamW beta2", type=float)
    grad_clip: float = _opt(1.0, "clip gradients to this global norm (0 = off)", type=float)
    seed: int = _opt(0, "seed for the batches and for scratch weights", type=int)
    # --- schedule of the run
    steps: int = _opt(1000, "total optimizer steps", type=int)
    log_every: int = _opt(10, "print a log line every N steps", type=int)
    val_every: int = _opt(100, "validation loss every N steps (0 = only at the end)", type=int)
    val_batches: int = _opt(20, "validation batches per evaluation (0 = the whole held-out split)", type=int)
    sample_every: int = _opt(500, "print and save samples every N steps (0 = only at the end)", type=int)
    sample_length: int = _opt(200, "tokens per sample", type=int)
    sample_num: int = _opt(1, "samples each time (0 = none)", type=int)
    sample_prompt: str = _opt("", "prompt for the samples (empty = unconditional)", type=str)
    save_every: int = _opt(500, "checkpoint every N steps (also on Ctrl-C/SIGTERM and at the end)", type=int)
    keep: int = _opt(3, "newest checkpoints kept", type=int)
    tracker: str = _opt(
        "none", "also log metrics and samples to tensorboard (event files in the run's tensorboard/), wandb, or both "
        "(tensorboard,wandb)", type=str,
    )  # fmt: skip
    # --- this invocation only (never inherited from a resumed run)
    restore_from: str | None = _opt(
        None,
        "latest (continue this run), fresh (start over) or PATH (a run or checkpoint to continue from)",
        type=str,
        shown="fresh in an empty run directory; one that holds checkpoints needs latest, or fresh --overwrite",
    )
    overwrite: bool = _opt(False, "allow --restore_from fresh|PATH to delete this run's checkpoints", type=bool)
    debug: bool = _opt(False, "show Python tracebacks", type=bool)
    no_compile_cache: bool = _opt(
        False, "compile everything anew instead of reusing the persistent JAX compilation cache", type=bool,
        shown="the cache is on, in $GPT2_JAX_CACHE/jax_cache or ~/.cache/gpt2_jax/jax_cache",
    )  # fmt: skip
    # --- several processes (see README: Several machines)
    distributed: bool = _opt(
        False, "join the other processes of a multi-host run (settings auto-detected on TPU pods, SLURM, Open MPI)",
        type=bool,
    )  # fmt: skip
    coordinator: str | None = _opt(None, "HOST:PORT of process 0, with --distributed", type=str, shown="auto-detected")
    num_processes: int | None = _opt(None, "how many processes, with --distributed", type=int, shown="auto-detected")
    process_id: int | None = _opt(None, "this process's index, with --distributed", type=int, shown="auto-detected")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in PER_INVOCATION}

    def lora(self) -> LoraConfig | None:
        """The LoRA settings, None for full fine-tuning."""
        if not self.lora_rank:
            return None
        alpha = self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)
        return LoraConfig(self.lora_rank, alpha, parse_targets(self.lora_targets), self.lora_dropout)


PER_INVOCATION = frozenset(
    {"run_name", "out", "devices", "sharding", "restore_from", "overwrite", "debug", "no_compile_cache", "distributed",
     "coordinator", "num_processes", "process_id"}
)  # fmt: skip

# The demo: a small GPT-2 from scratch, nanoGPT's Shakespeare settings for this shape (lr 1e-3 to 1e-4). Its own
# 4096-piece vocabulary (trained on the corpus in a second) makes a step 2.3x cheaper than GPT-2's 50257-token head.
DEMO_COMMON = dict(
    init="scratch:mini", tokenizer="sentencepiece", vocab_size=4096, learning_rate=1e-3, min_lr=1e-4, warmup_steps=20,
    sample_every=0, sample_length=200,
)  # fmt: skip
# 200 steps of 8 x 128 tokens: 7 CPU-minutes on a 2-core CPU (about 4 minutes of wall time when the machine is idle),
# enough for Shakespeare-shaped samples. A GPU takes longer windows, a larger batch and more steps in less time.
DEMO_CPU = dict(DEMO_COMMON, seq_len=128, batch_size=8, steps=200, log_every=10, val_every=50, val_batches=8,
                save_every=50)  # fmt: skip
DEMO_ACCELERATOR = dict(DEMO_COMMON, seq_len=256, batch_size=16, steps=1000, log_every=50, val_every=250,
                        save_every=500)  # fmt: skip


def default_learning_rate(init: str | None, lora_rank: int = 0) -> float:
    """6e-4 from scratch, 1e-4 to fine-tune every weight, 2e-4 for LoRA (the LoRA paper's GPT-2 rate)."""
    return 6e-4 if is_scratch(init) else 2e-4 if lora_rank else 1e-4


def build_parser(
    description: str = "Fine-tune GPT-2 (or train one from scratch) on your text.",
) -> argparse.ArgumentParser:
    """One flag per TrainConfig field; every default is None so `explicit_flags` can tell what was given."""
    parser = ArgumentParser(
        prog=command_for("train"),
        description=description,
        epilog=EPILOG.format(download=command_for("download")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        help_text = f"{meta['help']} (default: {meta['shown']})".replace("%", "%%")
        flag = f"--{field.name}"
        if meta["type"] is bool:
            action = argparse.BooleanOptionalAction if field.name == "remat" else "store_const"
            kwargs = {"const": True} if action == "store_const" else {}
            parser.add_argument(flag, action=action, default=None, help=help_text, **kwargs)
        else:
            parser.add_argument(flag, type=meta["type"], choices=meta["choices"], default=None, help=help_text)
    return parser


EPILOG = """\
With no --init and no models/124M here (get it with `{download} 124M`), train runs the demo:
it trains scratch:mini (a 6-layer, 384-wide GPT-2) from scratch on the bundled corpus, with a 4096-piece
SentencePiece vocabulary trained on that corpus first, learning_rate 1e-3 and, on a CPU, 200 steps of batch_size 8 x
seq_len 128 (a few minutes; 1000 steps of 16 x 256 on a GPU/TPU), then prints samples. Any flag you give overrides
these.

Run directories: a new run writes runs/RUN_NAME/ (config, tokenizer, checkpoints, metrics.jsonl, loss.png,
samples/). A directory that already holds checkpoints is never overwritten silently: continue it with
--restore_from latest (the same options as before, except the flags you give again), or start over with
--restore_from fresh --overwrite.
"""


def explicit_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user actually gave (argparse defaults are all None)."""
    return {k: v for k, v in vars(args).items() if v is not None}


def resolve(
    explicit: dict[str, Any], *, saved: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None
) -> TrainConfig:
    """TrainConfig from, first match wins: `explicit` flags, a resumed run's `saved` options, `defaults` (the demo's,
    or the pretrained model found), the field defaults."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    if defaults:
        values.update(defaults)
    if saved:
        values.update({k: v for k, v in saved.items() if k in known and k not in PER_INVOCATION})
    values.update({k: v for k, v in explicit.items() if k in known})
    if values.get("learning_rate") is None:
        values["learning_rate"] = default_learning_rate(values.get("init"), values.get("lora_rank") or 0)
    config = TrainConfig(**values)
    validate(config)
    return config


POSITIVE = (
    "batch_size",
    "accumulate_gradients",
    "steps",
    "log_every",
    "keep",
    "sample_length",
    "vocab_size",
    "seq_len",
    "scan_unroll",
)
NON_NEGATIVE = ("warmup_steps", "val_every", "val_batches", "sample_every", "sample_num", "save_every", "seed",
                "weight_decay", "grad_clip", "lora_rank")  # fmt: skip


def repair_text_flags(values: dict[str, Any]) -> None:
    """--sample_prompt with each byte that was not UTF-8 (argv keeps them as lone surrogates) as U+FFFD, counted:
    the prompt is written into sample files and trackers, whose encoders would refuse the surrogates."""
    if values.get("sample_prompt"):
        values["sample_prompt"], bad = repair_decoded(values["sample_prompt"])
        if bad:
            warn(f"{bad} invalid UTF-8 byte(s) in --sample_prompt were replaced by U+FFFD.")


def check_ranges(values: dict[str, Any]) -> None:
    """Each given flag within its range, as one sentence (exit code 2); cheap, so train.py checks before any work."""
    if values.get("tracker") is not None:
        check_trackers(values["tracker"])
    for name in POSITIVE:
        if values.get(name) is not None and values[name] < 1:
            raise UsageError(f"--{name} must be at least 1, got {values[name]}.")
    for name in NON_NEGATIVE:
        if values.get(name) is not None and values[name] < 0:
            raise UsageError(f"--{name} must be 0 or more, got {values[name]}.")
    if values.get("learning_rate") is not None and not values["learning_rate"] > 0:
        raise UsageError(f"--learning_rate must be positive, got {values['learning_rate']}.")
    if values.get("val_fraction") is not None and not 0 <= values["val_fraction"] < 1:
        raise UsageError(f"--val_fraction must be at least 0 and below 1, got {values['val_fraction']}.")
    for name in ("beta1", "beta2", "dropout", "lora_dropout"):
        if values.get(name) is not None and not 0 <= values[name] < 1:
            raise UsageError(f"--{name} must be at least 0 and below 1, got {values[name]}.")
    if values.get("lora_alpha") is not None and not values["lora_alpha"] > 0:
        raise UsageError(f"--lora_alpha must be positive, got {values['lora_alpha']}.")
    if values.get("lora_targets") is not None:
        parse_targets(values["lora_targets"])
    if values.get("num_processes") is not None and values["num_processes"] < 1:
        raise UsageError(f"--num_processes must be at least 1, got {values['num_processes']}.")
    cluster_flags = [f"--{k}" for k in ("coordinator", "num_processes", "process_id") if values.get(k) is not None]
    if cluster_flags and not values.get("distributed"):
        verb = "means" if len(cluster_flags) == 1 else "mean"
        raise UsageError(f"{' '.join(cluster_flags)} only {verb} something with --distributed; add it.")
    if values.get("overwrite") and values.get("restore_from") == "latest":
        raise UsageError("--overwrite deletes checkpoints, which --restore_from latest continues from; drop one.")


def validate(config: TrainConfig) -> None:
    """Every field in range, and the combinations that make sense."""
    check_ranges(dataclasses.asdict(config))
    if config.min_lr is not None and not 0 <= config.min_lr <= config.learning_rate:
        raise UsageError(
            f"--min_lr must lie between 0 and --learning_rate ({config.learning_rate}), got {config.min_lr}."
        )
    if config.lora_rank == 0:
        given = [f"--{k}" for k in ("lora_alpha", "lora_dropout") if getattr(config, k)]
        given += ["--lora_targets"] if config.lora_targets != DEFAULT_TARGETS else []
        if given:
            raise UsageError(f"{' '.join(given)} only apply to LoRA; add --lora_rank (8 is a common choice).")
    elif is_scratch(config.init):
        raise UsageError(
            "--lora_rank adapts a trained model, and scratch:PRESET starts from nothing; drop one of them."
        )
    if config.tokenizer == "sentencepiece" and not is_scratch(config.init):
        raise UsageError("--tokenizer sentencepiece trains a new vocabulary, so it needs --init scratch:PRESET.")
