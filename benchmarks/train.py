"""Training benchmark: tokens/s and MFU of our jitted train step, against Hugging Face PyTorch + torch AdamW.

    python -m benchmarks.train                                  # the CPU goal: mini (6 x 384), fp32, batch 8 x 256
    python -m benchmarks.train --presets tiny,mini --batches 4,8 --seq 128 --no-pytorch --json out.json

Ours is exactly what train.py runs (`gpt2_jax.training.step.build_train_step`: forward, backward, global-norm clip,
AdamW with the decay mask, state donated; layers unrolled per scan step as train.py's `--scan_unroll` default) on a
random model and random tokens; the compile is timed apart and the steady state is the median of `--repeats` steps.
PyTorch runs the same step in the same process: `GPT2LMHeadModel` (SDPA attention) holding the same weights,
float32 cross-entropy over the same targets, `clip_grad_norm_`, `torch.optim.AdamW` with the same decay groups and
hyperparameters; on a CPU in float32, on CUDA with fp32 weights and autocast to the compute dtype (our precision
recipe). With `--torch_compile BACKEND` (default inductor) the same step runs once more with its forward and loss
under `torch.compile`, a second PyTorch column (benchmarks/compare.py). The steps are timed in turns, so load from
other programs slows all alike. Each point also keeps the first step's loss and gradient norm (before any update),
which the GPU call (benchmarks/gpu/train.py) checks against a plain-loss step. MFU is model FLOPs
(6N + 12LHQT per token, gpt2_jax.model.flops) over the device's peak: a datasheet figure on known accelerators,
on a CPU a large matmul measured in this run (machines shared with other work give noisy numbers: report the
load beside them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import compare
from gpt2_jax.config import GPT2Config, get_config
from gpt2_jax.model.flops import flops_per_token, peak_flops
from gpt2_jax.model.transformer import init_params
from gpt2_jax.training.mesh import make_mesh, replicated, select_devices, shard_batch
from gpt2_jax.training.optim import learning_rate_schedule, make_optimizer
from gpt2_jax.training.setup import default_scan_unroll
from gpt2_jax.training.step import build_train_step, create_state

HYPER = dict(learning_rate=1e-4, weight_decay=0.1, grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-8)


def random_batch(config: GPT2Config, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.n_vocab, (batch, seq + 1)).astype(np.int32)


def model_config(
    preset: str, *, dtype: str = "float32", attention: str = "auto", remat: bool = False, scan_unroll: int | None = None
) -> GPT2Config:
    """The config train.py would build for these flags; scan_unroll None: train.py's default (all layers unrolled on
    GPU/TPU, a plain scan on a CPU), clamped to the depth as train.py does."""
    config = get_config(preset, dtype=dtype, attention=attention, remat=remat)
    return config.replace(scan_unroll=min(scan_unroll or default_scan_unroll(config), config.n_layer))


def our_step(
    config: GPT2Config, params: Any, batch_BT1: np.ndarray, *, devices: int | str = 1, accumulate: int = 1,
    more_batches: Sequence[np.ndarray] = (),
) -> tuple[Callable[[], dict[str, float]], float, dict[str, float]]:  # fmt: skip
    """(one timed training step, compile seconds, the first step's metrics) for our train step on `devices` local
    devices, `config` as given (build it with `model_config` to time what train.py runs). A step returns its
    metrics: `loss` (before the update) and `grad_norm` (before clipping), as floats. The first step trains on
    `batch_BT1`; with `more_batches` (the same shape, already on the device when timing starts) the steps cycle
    through all of them, as training on real data does."""
    mesh = make_mesh(select_devices(devices))
    schedule = learning_rate_schedule(HYPER["learning_rate"], warmup_steps=0, total_steps=10**6, schedule="constant")
    optimizer = make_optimizer(
        schedule, weight_decay=HYPER["weight_decay"], grad_clip=HYPER["grad_clip"], b1=HYPER["b1"], b2=HYPER["b2"]
    )
    params = jax.tree.map(np.array, params)  # a private copy: the donated state may reuse its memory
    holder = {"state": jax.jit(lambda p: create_state(p, optimizer, 0), out_shardings=replicated(mesh))(params)}
    train_step = build_train_step(config, optimizer, schedule, mesh, accumulate=accumulate)
    batches = [shard_batch(b, mesh) for b in (batch_BT1, *more_batches)]
    turn = itertools.count()

    def step() -> dict[str, float]:
        holder["state"], metrics = train_step(holder["state"], batches[next(turn) % len(batches)])
        metrics = jax.device_get(metrics)  # the host syncs every step here; train.py does not
        return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}

    start = time.perf_counter()
    first = step()
    first_s = time.perf_counter() - start
    step()  # the second call still allocates for the first time; not part of steady state
    return step, first_s, first


def time_ours(
    config: GPT2Config, params: Any, batch_BT1: np.ndarray, *, devices: int | str = 1, accumulate: int = 1,
    repeats: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """{'compile_s', 'step_s': [seconds per step]} of our train step alone."""
    step, first_s, _ = our_step(config, params, batch_BT1, devices=devices, accumulate=accumulate)
    times = alternate({"ours": step}, repeats)["ours"]
    return {"compile_s": max(first_s - float(np.median(times)), 0.0), "step_s": times}


def pytorch_device(dtype: str) -> str | None:
    """Where the PyTorch reference runs for a compute `dtype`: 'cuda' where torch sees a GPU (autocast to `dtype`,
    fp32 weights, like ours), else 'cpu' in float32 only; None where there is no like-for-like run."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if dtype == "float32" else None


def torch_model(config: GPT2Config, params: Any, device: str = "cpu", *, attention: str = "sdpa") -> Any:
    """A float32 Hugging Face GPT2LMHeadModel holding exactly `params` (head tied to wte) on `device`, in train mode.

    attention: Hugging Face's attn_implementation ('sdpa': PyTorch's fused attention, 'eager': its plain one).
    """
    import torch
    import transformers

    from gpt2_jax.weights.huggingface import params_to_hf_state_dict

    hf_config = transformers.GPT2Config(**config.to_hf_config(), attn_implementation=attention)
    with torch.device("meta"):  # no random init: every weight is replaced below
        model = transformers.GPT2LMHeadModel(hf_config)
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params_to_hf_state_dict(params).items()}
    model.transformer.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight
    return model.to(device).train()


def pytorch_step(
    config: GPT2Config, params: Any, batch_BT1: np.ndarray, *, device: str = "cpu", dtype: str = "float32",
    torch_compile: str | None = None,
) -> Callable[[], float]:  # fmt: skip
    """One training step of Hugging Face GPT2LMHeadModel + torch.optim.AdamW on `device` ('cpu' or 'cuda'), warmed
    up; it returns the loss once the step has finished on the device.

    The same step as ours: float32 weights and optimizer state, compute in `dtype` (autocast where it is not
    float32), float32 cross-entropy, global-norm clipping, AdamW with decay on 2-D weights only. AdamW runs as
    `foreach` on a CPU and `fused` on CUDA (each device's fastest). torch_compile: a torch.compile backend
    ('inductor') for the forward and the loss, as nanoGPT compiles its model (the backward follows through
    AOTAutograd; the warm-up step compiles); None: eager.
    """
    import torch
    import torch.nn.functional as F

    model = torch_model(config, params, device)
    named = list(model.named_parameters())  # the tied head appears once, as transformer.wte.weight
    decay = [p for n, p in named if n.endswith(".weight") and p.ndim == 2]  # HF's Conv1D and embeddings
    no_decay = [p for n, p in named if not (n.endswith(".weight") and p.ndim == 2)]
    fastest = {"fused": True} if device == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": HYPER["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=HYPER["learning_rate"], betas=(HYPER["b1"], HYPER["b2"]), eps=HYPER["eps"], **fastest,
    )  # fmt: skip
    tokens = torch.from_numpy(batch_BT1.astype(np.int64)).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    compute_dtype = getattr(torch, dtype)

    def loss_of(inputs: Any, targets: Any) -> Any:
        with torch.autocast(device, dtype=compute_dtype, enabled=dtype != "float32"):
            logits = model(inputs).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    if torch_compile:
        loss_of = torch.compile(loss_of, backend=torch_compile)

    def step() -> float:
        loss = loss_of(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()  # the whole step, not only the loss, must be done when the timer stops
        return float(loss.detach())

    step()  # warm-up: allocations, optimizer state (autotuning on CUDA; the compile under torch_compile)
    return step


def alternate(steps: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each step, taken in turns (A B A B ...) so that a busy machine slows both alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def time_pytorch(
    config: GPT2Config, params: Any, batch_BT1: np.ndarray, *, device: str = "cpu", dtype: str = "float32",
    repeats: int = 5, torch_compile: str | None = None,
) -> list[float]:  # fmt: skip
    """Seconds per PyTorch training step alone (`pytorch_step` on `device` in `dtype`, under `torch_compile`)."""
    step = pytorch_step(config, params, batch_BT1, device=device, dtype=dtype, torch_compile=torch_compile)
    return alternate({"pytorch": step}, repeats)["pytorch"]


def measure_point(
    preset: str, batch: int, seq: int, *, dtype: str = "float32", devices: int | str = 1, accumulate: int = 1,
    attention: str = "auto", remat: bool = False, scan_unroll: int | None = None, repeats: int = 5,
    pytorch: bool = True, torch_compile: str | None = None, peak: tuple[float, str] | None = None,
    data: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One benchmark point: the fields listed in benchmarks/suite.py for job 'train'.

    scan_unroll None: train.py's default for this device (see `model_config`). pytorch: also time the PyTorch
    reference, in turns with ours, on one device where `pytorch_device` finds a like-for-like run; torch_compile:
    and the same step under torch.compile with this backend (benchmarks/compare.py's fields). data: batches of
    [batch, seq + 1] tokens that our steps cycle through (the first one PyTorch's too); None: one random batch.
    """
    config = model_config(preset, dtype=dtype, attention=attention, remat=remat, scan_unroll=scan_unroll)
    params = init_params(config, 0)
    batch_BT1, *more = data if data else [random_batch(config, batch, seq)]
    n_devices = len(select_devices(devices))
    ours, first_s, first = our_step(config, params, batch_BT1, devices=devices, accumulate=accumulate,
                                    more_batches=more)  # fmt: skip
    steps, errors = {"ours": ours}, {}
    torch_device = pytorch_device(dtype) if pytorch and n_devices == 1 else None
    for column, backend in compare.columns(torch_compile) if torch_device else []:
        try:
            steps[column] = pytorch_step(
                config, params, batch_BT1, device=torch_device, dtype=dtype, torch_compile=backend
            )
        except Exception as e:  # e.g. inductor without a C++ compiler: the column says why, the point stays
            errors[f"{column}_error"] = compare.one_line(e)
    times = alternate(steps, repeats)
    step_s = float(np.median(times["ours"]))
    tokens_per_s = batch * seq / step_s
    device = jax.local_devices()[0]
    peak_per_device, peak_source = peak or peak_flops(device, dtype, measure_unknown=True)
    peak_total = peak_per_device * (n_devices if device.platform != "cpu" else 1)  # CPU devices share the cores
    model_flops_per_s = tokens_per_s * flops_per_token(config, seq)
    point = dict(
        job="train", preset=preset, n_layer=config.n_layer, n_embd=config.n_embd, batch=batch, seq=seq,
        dtype=dtype, devices=n_devices, accumulate=accumulate, attention=attention, remat=remat,
        scan_unroll=config.scan_unroll, tokens_per_s=tokens_per_s,
        tokens_per_s_min=batch * seq / max(times["ours"]), tokens_per_s_max=batch * seq / min(times["ours"]),
        compile_s=max(first_s - step_s, 0.0),
        model_flops_per_s=model_flops_per_s, mfu=model_flops_per_s / peak_total, peak_flops=peak_total,
        peak_source=peak_source, first_loss=first["loss"], first_grad_norm=first["grad_norm"],
        pytorch_tokens_per_s=None, ratio=None, **errors,
    )  # fmt: skip
    for column in compare.COLUMNS:
        if column in times:
            point[f"{column}_tokens_per_s"] = batch * seq / float(np.median(times[column]))
            point[compare.RATIO[column]] = tokens_per_s / point[f"{column}_tokens_per_s"]
    if torch_device and torch_compile:
        point["pytorch_compiled_backend"] = torch_compile
    return point


def run(
    presets: Sequence[str] = ("mini",), batches: Sequence[int] = (8,), seq: int = 256, *, dtype: str = "float32",
    devices: Sequence[int | str] = (1,), scan_unroll: int | None = None, repeats: int = 5, pytorch: bool = True,
    torch_compile: str | None = None, log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:  # fmt: skip
    """Benchmark points for every (preset, batch, devices); a CPU peak is measured once, before the first point
    (the median of 7 matmuls)."""
    peak = peak_flops(jax.local_devices()[0], dtype, measure_unknown=True)
    points = []
    for preset in presets:
        for batch in batches:
            for n in devices:
                point = measure_point(preset, batch, seq, dtype=dtype, devices=n, scan_unroll=scan_unroll,
                                      repeats=repeats, pytorch=pytorch, torch_compile=torch_compile,
                                      peak=peak)  # fmt: skip
                points.append(point)
                log(format_point(point))
    log(f"peak: {peak[0] / 1e9:.1f} GFLOP/s ({peak[1]}); mfu of the points above: "
        + ", ".join(f"{100 * p['mfu']:.1f}%" for p in points))  # fmt: skip
    return points


def format_point(p: dict[str, Any]) -> str:
    line = (
        f"{p['preset']:>5} {p['dtype']:>8} {p['devices']} dev batch {p['batch']:>3} x {p['seq']:>4} "
        f"unroll {p['scan_unroll']}: "
        f"{p['tokens_per_s']:9.1f} tok/s  mfu {100 * p['mfu']:5.1f}%  {p['model_flops_per_s'] / 1e9:7.1f} GFLOP/s  "
        f"compile {p['compile_s']:6.2f} s"
    )
    if p.get("ratio"):
        line += f"  | PyTorch {p['pytorch_tokens_per_s']:9.1f} tok/s  ratio {p['ratio']:.2f}x"
    return line + compare.compiled_text(p)


def main(argv: Sequence[str] | None = None) -> None:
    ints = lambda s: [int(x) for x in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", type=lambda s: s.split(","), default=["mini"])
    p.add_argument("--batches", type=ints, default=[8])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--devices", type=lambda s: s.split(","), default=["1"], help="device counts or 'all'")
    p.add_argument("--scan_unroll", type=int, default=None, help="layers per scan step (default: train.py's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-pytorch", dest="pytorch", action="store_false")
    p.add_argument("--torch_compile", default="inductor", help="torch.compile backend of the second PyTorch column, "
                   "or 'off' (default: inductor)")  # fmt: skip
    p.add_argument("--json", default=None, help="write the points to this file")
    args = p.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, load {load:.2f}")
    points = run(
        args.presets, args.batches, args.seq, dtype=args.dtype, devices=args.devices, scan_unroll=args.scan_unroll,
        repeats=args.repeats, pytorch=args.pytorch, log=lambda s: print(s, flush=True),
        torch_compile=None if args.torch_compile == "off" else args.torch_compile,
    )  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(points, f, indent=1)


if __name__ == "__main__":
    main()
