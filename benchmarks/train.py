"""Training benchmark: tokens/s and MFU of our jitted train step, against Hugging Face PyTorch + torch AdamW.

    python -m benchmarks.train                                  # the CPU goal: mini (6 x 384), fp32, batch 8 x 256
    python -m benchmarks.train --presets tiny,mini --batches 4,8 --seq 128 --no-pytorch --json out.json

Ours is exactly what train.py runs (`gpt2_jax.train_step.build_train_step`: forward, backward, global-norm clip,
AdamW with the decay mask, state donated) on a random model and random tokens; the compile is timed apart and the
steady state is the median of `--repeats` steps. PyTorch runs the same step in the same process: `GPT2LMHeadModel`
(SDPA attention) holding the same weights, float32 cross-entropy over the same targets, `clip_grad_norm_`,
`torch.optim.AdamW` (foreach) with the same decay groups and hyperparameters; the two take their timed steps in
turns, so load from other programs slows both alike. MFU is model FLOPs (6N + 12LHQT per
token, gpt2_jax.flops) over the device's peak: a datasheet figure on known accelerators, on a CPU a large matmul
measured in this run (machines shared with other work give noisy numbers: report the load beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from gpt2_jax.config import GPT2Config, get_config
from gpt2_jax.flops import flops_per_token, peak_flops
from gpt2_jax.model import init_params
from gpt2_jax.optim import learning_rate_schedule, make_optimizer
from gpt2_jax.train_step import build_train_step, create_state, make_mesh, replicated, select_devices, shard_batch

HYPER = dict(learning_rate=1e-4, weight_decay=0.1, grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-8)


def random_batch(config: GPT2Config, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.n_vocab, (batch, seq + 1)).astype(np.int32)


def our_step(
    config: GPT2Config, params: Any, batch_BT1: np.ndarray, *, devices: int | str = 1, accumulate: int = 1
) -> tuple[Callable[[], None], float]:
    """(one timed training step, compile seconds) for our train step on `devices` local devices."""
    mesh = make_mesh(select_devices(devices))
    schedule = learning_rate_schedule(HYPER["learning_rate"], warmup_steps=0, total_steps=10**6, schedule="constant")
    optimizer = make_optimizer(
        schedule, weight_decay=HYPER["weight_decay"], grad_clip=HYPER["grad_clip"], b1=HYPER["b1"], b2=HYPER["b2"]
    )
    params = jax.tree.map(np.array, params)  # a private copy: the donated state may reuse its memory
    holder = {"state": jax.jit(lambda p: create_state(p, optimizer, 0), out_shardings=replicated(mesh))(params)}
    train_step = build_train_step(config, optimizer, schedule, mesh, accumulate=accumulate)
    batch = shard_batch(batch_BT1, mesh)

    def step() -> None:
        holder["state"], metrics = train_step(holder["state"], batch)
        jax.block_until_ready(metrics)  # the host syncs every step here; train.py does not

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    step()  # the second call still allocates for the first time; not part of steady state
    return step, first_s


def time_ours(
    config: GPT2Config, params: Any, batch_BT1: np.ndarray, *, devices: int | str = 1, accumulate: int = 1,
    repeats: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """{'compile_s', 'step_s': [seconds per step]} of our train step alone."""
    step, first_s = our_step(config, params, batch_BT1, devices=devices, accumulate=accumulate)
    times = alternate({"ours": step}, repeats)["ours"]
    return {"compile_s": max(first_s - float(np.median(times)), 0.0), "step_s": times}


def _torch_model(config: GPT2Config, params: Any):
    import torch
    import transformers

    from gpt2_jax.hf_format import params_to_hf_state_dict

    hf_config = transformers.GPT2Config(**config.to_hf_config(), attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(hf_config)
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params_to_hf_state_dict(params).items()}
    model.transformer.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.train()


def pytorch_step(config: GPT2Config, params: Any, batch_BT1: np.ndarray) -> Callable[[], float]:
    """One training step of Hugging Face GPT2LMHeadModel + torch.optim.AdamW (float32), warmed up."""
    import torch
    import torch.nn.functional as F

    model = _torch_model(config, params)
    named = list(model.named_parameters())  # the tied head appears once, as transformer.wte.weight
    decay = [p for n, p in named if n.endswith((".weight",)) and p.ndim == 2]  # HF's Conv1D and embeddings
    no_decay = [p for n, p in named if not (n.endswith(".weight") and p.ndim == 2)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": HYPER["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=HYPER["learning_rate"], betas=(HYPER["b1"], HYPER["b2"]), eps=HYPER["eps"], foreach=True,
    )  # fmt: skip
    tokens = torch.from_numpy(batch_BT1.astype(np.int64))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        logits = model(inputs).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up: allocations, optimizer state
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


def time_pytorch(config: GPT2Config, params: Any, batch_BT1: np.ndarray, *, repeats: int = 5) -> list[float]:
    """Seconds per PyTorch training step alone (float32)."""
    return alternate({"pytorch": pytorch_step(config, params, batch_BT1)}, repeats)["pytorch"]


def measure_point(
    preset: str, batch: int, seq: int, *, dtype: str = "float32", devices: int | str = 1, accumulate: int = 1,
    attention: str = "auto", remat: bool = False, repeats: int = 5, pytorch: bool = True,
    peak: tuple[float, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One benchmark point: the fields listed in benchmarks/suite.py for job 'train'."""
    config = get_config(preset, dtype=dtype, attention=attention, remat=remat)
    params = init_params(config, 0)
    batch_BT1 = random_batch(config, batch, seq)
    n_devices = len(select_devices(devices))
    ours, first_s = our_step(config, params, batch_BT1, devices=devices, accumulate=accumulate)
    steps = {"ours": ours}
    compare = pytorch and n_devices == 1 and jax.local_devices()[0].platform == "cpu" and dtype == "float32"
    if compare:
        steps["pytorch"] = pytorch_step(config, params, batch_BT1)
    times = alternate(steps, repeats)
    step_s = float(np.median(times["ours"]))
    tokens_per_s = batch * seq / step_s
    device = jax.local_devices()[0]
    peak_per_device, peak_source = peak or peak_flops(device, dtype)
    peak_total = peak_per_device * (n_devices if device.platform != "cpu" else 1)  # CPU devices share the cores
    model_flops_per_s = tokens_per_s * flops_per_token(config, seq)
    point = dict(
        job="train", preset=preset, n_layer=config.n_layer, n_embd=config.n_embd, batch=batch, seq=seq,
        dtype=dtype, devices=n_devices, accumulate=accumulate, attention=attention, remat=remat,
        tokens_per_s=tokens_per_s, tokens_per_s_min=batch * seq / max(times["ours"]),
        tokens_per_s_max=batch * seq / min(times["ours"]), compile_s=max(first_s - step_s, 0.0),
        model_flops_per_s=model_flops_per_s, mfu=model_flops_per_s / peak_total, peak_flops=peak_total,
        peak_source=peak_source, pytorch_tokens_per_s=None, ratio=None,
    )  # fmt: skip
    if compare:
        point["pytorch_tokens_per_s"] = batch * seq / float(np.median(times["pytorch"]))
        point["ratio"] = tokens_per_s / point["pytorch_tokens_per_s"]
    return point


def run(
    presets: Sequence[str] = ("mini",), batches: Sequence[int] = (8,), seq: int = 256, *, dtype: str = "float32",
    devices: Sequence[int | str] = (1,), repeats: int = 5, pytorch: bool = True, log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:  # fmt: skip
    """Benchmark points for every (preset, batch, devices); a CPU peak is measured before and after, the best kept."""
    peak = peak_flops(jax.local_devices()[0], dtype)
    points = []
    for preset in presets:
        for batch in batches:
            for n in devices:
                point = measure_point(preset, batch, seq, dtype=dtype, devices=n, repeats=repeats, pytorch=pytorch,
                                      peak=peak)  # fmt: skip
                points.append(point)
                log(format_point(point))
    after = peak_flops(jax.local_devices()[0], dtype)
    if after[0] > peak[0]:  # another program held the cores during the first measurement
        for p in points:
            p["peak_flops"] *= after[0] / peak[0]
            p["mfu"] = p["model_flops_per_s"] / p["peak_flops"]
        peak = after
    log(f"peak: {peak[0] / 1e9:.1f} GFLOP/s ({peak[1]}); mfu of the points above: "
        + ", ".join(f"{100 * p['mfu']:.1f}%" for p in points))  # fmt: skip
    return points


def format_point(p: dict[str, Any]) -> str:
    line = (
        f"{p['preset']:>5} {p['dtype']:>8} {p['devices']} dev batch {p['batch']:>3} x {p['seq']:>4}: "
        f"{p['tokens_per_s']:9.1f} tok/s  mfu {100 * p['mfu']:5.1f}%  {p['model_flops_per_s'] / 1e9:7.1f} GFLOP/s  "
        f"compile {p['compile_s']:6.2f} s"
    )
    if p.get("ratio"):
        line += f"  | PyTorch {p['pytorch_tokens_per_s']:9.1f} tok/s  ratio {p['ratio']:.2f}x"
    return line


def main(argv: Sequence[str] | None = None) -> None:
    ints = lambda s: [int(x) for x in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", type=lambda s: s.split(","), default=["mini"])
    p.add_argument("--batches", type=ints, default=[8])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--devices", type=lambda s: s.split(","), default=["1"], help="device counts or 'all'")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-pytorch", dest="pytorch", action="store_false")
    p.add_argument("--json", default=None, help="write the points to this file")
    args = p.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, load {load:.2f}")
    points = run(
        args.presets, args.batches, args.seq, dtype=args.dtype, devices=args.devices, repeats=args.repeats,
        pytorch=args.pytorch, log=lambda s: print(s, flush=True),
    )  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(points, f, indent=1)


if __name__ == "__main__":
    main()
