"""Named benchmark sweeps (`toy`, `quick`, `full`) and the runner that measures every point of them.

A sweep is one job over a grid: presets x batch sizes x attention x remat x device counts. Training points come from
`benchmarks/train.py`, prefill and decode points from `benchmarks/decode.py`; this file adds what the suite promises
on top of them: several timed runs per point (median and min/max), MFU against the device's peak (a datasheet for
known accelerators, a matmul measured in this run on a CPU), model FLOP/s, device memory, the memory-bandwidth
bound for decoding, and the PyTorch comparison (on the GPU too, in the compute dtype). A point that fails is kept
with its `error` and the rest still run.

Fields of a point:
    job                 'train', 'prefill' or 'decode'
    preset n_layer n_embd dtype attention remat devices
    batch               global batch in sequences
    seq                 train: tokens per sequence; prefill and decode: prompt tokens
    new_tokens          decode: tokens generated per sequence (top-k sampling, no early stop)
    tokens_per_s        median over `repeats` timed runs after warm-up; tokens_per_s_min / tokens_per_s_max
                        train: batch x seq per optimizer step; prefill: prompt tokens; decode: new tokens per
                        whole generation, prefill included (what a user waits for)
    per_token_ms        decode: one step of the decode loop
    compile_s           first call minus a steady-state call
    model_flops_per_s   tokens/s x FLOPs per token (gpt2_jax.flops: 6N + 12LHQT to train, a third of it forward)
    mfu, peak_flops, peak_source   train: model FLOP/s over the peak of the devices used
    memory_bytes_in_use, memory_peak_bytes   where the backend reports them (peak since the process started)
    bandwidth_fraction, bound_ms_per_step, bytes_per_step   decode: see benchmarks/bandwidth.py
    pytorch_tokens_per_s, pytorch_tokens_per_s_min/_max, ratio   with --compare pytorch
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import bandwidth, decode
from gpt2_jax.config import get_config
from gpt2_jax.decoder import decode_weights
from gpt2_jax.errors import UsageError
from gpt2_jax.flops import flops_per_token, peak_flops
from gpt2_jax.model import attention_implementation, init_params

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Sweep:
    job: str  # 'train' or 'decode' (a decode sweep also yields each batch's prefill point)
    presets: tuple[str, ...]
    batches: tuple[int, ...]
    seq: int  # train: tokens per sequence; decode: prompt tokens
    dtype: str = "float32"
    attention: tuple[str, ...] = ("auto",)  # train only: decoding picks its own
    remat: tuple[bool, ...] = (False,)  # train only
    devices: tuple[str, ...] = ("1",)  # train only: counts or 'all'
    new_tokens: int = 128  # decode only
    top_k: int = 40  # decode only
    compare_batches: tuple[int, ...] | None = None  # where --compare pytorch applies; None: every batch
    batch_per_device: bool = False  # train: `batches` are per device (scaling runs), else global

    def grid(self) -> Iterator[dict[str, Any]]:
        for preset, remat, attention, devices, batch in itertools.product(
            self.presets, self.remat, self.attention, self.devices, self.batches
        ):
            yield dict(preset=preset, batch=batch, attention=attention, remat=remat, devices=devices)


_GPU_TRAIN = dict(presets=("124M",), seq=1024, dtype="bfloat16")
SUITES: dict[str, tuple[Sweep, ...]] = {
    # Seconds, for the test suite: every code path at the smallest shapes.
    "toy": (
        Sweep("train", ("tiny",), (2,), seq=32),
        Sweep("decode", ("tiny",), (2,), seq=8, new_tokens=8),
    ),
    # About 3 minutes on an idle 2-core CPU: the goals of the training and sampling issues, against PyTorch.
    "quick": (
        Sweep("train", ("mini",), (8,), seq=256),
        Sweep("decode", ("124M",), (1, 8), seq=16, new_tokens=128),
    ),
    # Accelerators: GPT-2 124M at full context in bf16, the fused attention ('auto': cuDNN on a GPU) against XLA's,
    # remat, a batch sweep, 16 sequences per device on every local device, decode from batch 1 (bound by reading
    # the weights) to 64 (by the KV cache too).
    "full": (
        Sweep("train", **_GPU_TRAIN, batches=(8, 16, 32), compare_batches=(16,)),
        Sweep("train", **_GPU_TRAIN, batches=(16,), attention=("xla",)),
        Sweep("train", **_GPU_TRAIN, batches=(32, 64), remat=(True,)),
        Sweep("train", **_GPU_TRAIN, batches=(16,), devices=("all",), batch_per_device=True),
        Sweep("decode", ("124M",), (1, 8, 64), seq=16, new_tokens=128, dtype="bfloat16"),
        Sweep("decode", ("124M",), (64,), seq=16, new_tokens=1000, dtype="bfloat16"),
    ),
}


def resolve_devices(spec: str) -> int:
    available = len(jax.local_devices())
    if spec == "all":
        return available
    n = int(spec)
    if not 1 <= n <= available:
        raise UsageError(f"A benchmark asks for {n} devices but this machine has {available}.")
    return n


def _resolve(sweep: Sweep, spec: dict[str, Any]) -> dict[str, Any]:
    """Device count, global batch and attention as they will run (left as given where they cannot resolve)."""
    spec = dict(spec)
    if spec["devices"] == "all" or spec["devices"].isdigit():
        spec["devices"] = str(len(jax.local_devices())) if spec["devices"] == "all" else spec["devices"]
        if sweep.batch_per_device:
            spec["batch"] *= int(spec["devices"])
    if sweep.job != "train":
        spec["attention"] = "-"  # not a choice when decoding: model.py picks the path for a cache
    elif spec["attention"] == "auto":
        spec["attention"] = attention_implementation(get_config(spec["preset"], dtype=sweep.dtype))
    return spec


class Runner:
    """Runs sweeps point by point; caches what points share (params, PyTorch models, the peak, the bandwidth)."""

    def __init__(self, *, repeats: int | None = None, compare: bool = False, log: Log = print) -> None:
        """repeats: timed runs per point (None: 5 training steps, 3 generations)."""
        self.repeats, self.compare, self.log = repeats, compare, log
        self.device = jax.local_devices()[0]
        self._peaks: dict[str, tuple[float, str]] = {}
        self._bandwidth: float | None = None
        self._model: dict[str, Any] = {}  # the decode model of the latest point: one held at a time

    # --- shared measurements -----------------------------------------------------------------------------------
    def peak(self, dtype: str) -> tuple[float, str]:
        """Peak FLOP/s of one device (datasheet, or a matmul measured once per run and dtype) and its source."""
        if dtype not in self._peaks:
            self._peaks[dtype] = peak_flops(self.device, dtype)
            self.log(f"peak {dtype}: {self._peaks[dtype][0] / 1e12:.2f} TFLOP/s per device ({self._peaks[dtype][1]})")
        return self._peaks[dtype]

    def bandwidth(self) -> float:
        if self._bandwidth is None:
            self._bandwidth = bandwidth.measure_copy_bandwidth(device=self.device)
            self.log(f"copy bandwidth: {self._bandwidth / 1e9:.1f} GB/s (read + write, measured)")
        return self._bandwidth

    def model(self, preset: str, dtype: str, kind: str = "weights") -> tuple[Any, Any]:
        """(config, X) of a random model (seed 0); X the decoder's `weights`, or the same model in `torch`."""
        config = get_config(preset, dtype=dtype)
        if self._model.get("key") != (preset, dtype):
            params = init_params(config, 0)
            self._model = {"key": (preset, dtype), "params": params, "weights": decode_weights(params, config)}
        if kind == "torch" and "torch" not in self._model:
            model = decode.hf_model(self._model["params"], config)
            self._model["torch"] = _on_cuda(model, dtype) if _torch_cuda() else model
        return config, self._model[kind]

    # --- points ------------------------------------------------------------------------------------------------
    def run(self, sweeps: Sequence[Sweep], on_point: Callable[[list[dict]], None] | None = None) -> list[dict]:
        """Every point of `sweeps`; `on_point(points so far)` after each one (to save partial results)."""
        points: list[dict] = []
        seen: set[tuple] = set()
        for sweep in sweeps:
            for spec in sweep.grid():
                spec = _resolve(sweep, spec)
                key = (sweep.job, sweep.seq, sweep.dtype, sweep.new_tokens, *spec.values())
                if key in seen:  # e.g. 'all' devices on a one-device machine, 'auto' attention where it means xla
                    continue
                seen.add(key)
                compare = self.compare and (sweep.compare_batches is None or spec["batch"] in sweep.compare_batches)
                points += self._measure(sweep, spec, compare)
                if on_point:
                    on_point(points)
        return points

    def _measure(self, sweep: Sweep, spec: dict[str, Any], compare: bool) -> list[dict]:
        config = get_config(spec["preset"])
        base = dict(
            job=sweep.job, preset=spec["preset"], n_layer=config.n_layer, n_embd=config.n_embd, batch=spec["batch"],
            seq=sweep.seq, dtype=sweep.dtype, attention=spec["attention"], remat=spec["remat"], devices=1,
        )  # fmt: skip
        try:
            base["devices"] = resolve_devices(spec["devices"])
            if sweep.job == "train":
                points = [self._train_point(sweep, base, compare)]
            else:
                points = self._decode_points(sweep, base, compare)
        except Exception as e:  # one failed point (out of memory, an unsupported kernel) must not end the run
            self.log(f"FAILED {sweep.job} {spec}: {type(e).__name__}: {e}")
            self.log(traceback.format_exc(limit=-3).rstrip())
            return [dict(base, error=_one_line(e))]
        for p in points:
            p.update(bandwidth.memory_in_use(self.device))
        return points

    def _train_point(self, sweep: Sweep, base: dict[str, Any], compare: bool) -> dict:
        from benchmarks import train as train_bench

        repeats = self.repeats or 5
        point = train_bench.measure_point(
            base["preset"], base["batch"], sweep.seq, dtype=sweep.dtype, devices=base["devices"],
            attention=base["attention"], remat=base["remat"], repeats=repeats, pytorch=False,
            peak=self.peak(sweep.dtype),
        )  # fmt: skip
        point["repeats"] = repeats
        if compare and base["devices"] == 1:
            config = get_config(base["preset"], dtype=sweep.dtype)
            params = init_params(config, 0)  # the weights measure_point trained (seed 0), for PyTorch
            batch_BT1 = train_bench.random_batch(config, base["batch"], sweep.seq)
            seconds = lambda: _pytorch_train_seconds(config, params, batch_BT1, sweep.dtype, repeats)
            self._compare(point, base["batch"] * sweep.seq, seconds)
        self.log(
            f"train   {base['preset']} batch {base['batch']:>3} x {sweep.seq} {sweep.dtype} {base['attention']}"
            f"{' remat' if base['remat'] else ''} on {base['devices']} device(s): {point['tokens_per_s']:,.0f} tok/s, "
            f"MFU {100 * point['mfu']:.1f}%, compile {point['compile_s']:.1f} s" + _ratio_text(point)
        )
        return point

    def _decode_points(self, sweep: Sweep, base: dict[str, Any], compare: bool) -> list[dict]:
        config, weights = self.model(base["preset"], sweep.dtype)
        batch, new_tokens = base["batch"], sweep.new_tokens
        prompt_BT = np.random.default_rng(0).integers(0, config.n_vocab, (batch, sweep.seq)).astype(np.int32)
        # decode.time_ours reports medians only: call it once per timed run for the spread (each call re-warms).
        repeats = self.repeats or 3
        runs = [decode.time_ours(weights, config, prompt_BT, new_tokens, sweep.top_k, 1) for _ in range(repeats)]
        prefill_s = np.array([r["prefill_s"] for r in runs])
        decode_s = np.array([r["decode_s"] for r in runs])
        compile_s = runs[0]["compile_s"]
        prefill = dict(base, job="prefill", **_rates(batch * sweep.seq / prefill_s), compile_s=compile_s)
        prefill["prefill_ms"] = 1e3 * float(np.median(prefill_s))
        prefill["model_flops_per_s"] = prefill["tokens_per_s"] * flops_per_token(config, sweep.seq, training=False)
        point = dict(base, new_tokens=new_tokens, **_rates(batch * new_tokens / (prefill_s + decode_s)))
        step_s = float(np.median(decode_s)) / max(new_tokens - 1, 1)
        context = round(sweep.seq + new_tokens / 2)
        point.update(
            compile_s=compile_s,
            per_token_ms=1e3 * step_s,
            model_flops_per_s=point["tokens_per_s"] * flops_per_token(config, context, training=False),
            **bandwidth.decode_bound(
                config, batch=batch, prompt_len=sweep.seq, new_tokens=new_tokens, dtype=sweep.dtype,
                seconds_per_step=step_s, bandwidth=self.bandwidth(),
            ),
        )  # fmt: skip
        if compare:
            model = lambda: self.model(base["preset"], sweep.dtype, "torch")[1]
            seconds = lambda: _pytorch_generate_seconds(model(), prompt_BT, new_tokens, sweep.top_k, repeats)
            self._compare(point, batch * new_tokens, seconds)
        self.log(
            f"decode  {base['preset']} batch {batch:>3} {sweep.seq}+{new_tokens}: {point['tokens_per_s']:,.1f} tok/s, "
            f"{point['per_token_ms']:.2f} ms/step, {100 * point['bandwidth_fraction']:.0f}% of the bandwidth bound, "
            f"compile {compile_s:.1f} s" + _ratio_text(point)
        )
        return [prefill, point]

    def _compare(self, point: dict, tokens: int, seconds: Callable[[], list | None]) -> None:
        """Add PyTorch's rate and the ratio to `point`; a PyTorch failure is noted there, ours is kept."""
        try:
            times = seconds()
        except Exception as e:
            self.log(f"PyTorch comparison failed: {_one_line(e)}")
            point["pytorch_error"] = _one_line(e)
            return
        finally:
            if _torch_cuda():
                sys.modules["torch"].cuda.empty_cache()  # hand PyTorch's cached blocks back for the JAX points
        if times is not None:
            _add_pytorch(point, tokens / np.array(times))


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}".rstrip(": ")[:300]


def _rates(tokens_per_s: np.ndarray) -> dict[str, float]:
    return {
        "tokens_per_s": float(np.median(tokens_per_s)),
        "tokens_per_s_min": float(np.min(tokens_per_s)),
        "tokens_per_s_max": float(np.max(tokens_per_s)),
        "repeats": len(tokens_per_s),
    }


def _add_pytorch(point: dict, torch_tokens_per_s: np.ndarray) -> None:
    rates = _rates(torch_tokens_per_s)
    point.update({f"pytorch_{k}": rates[k] for k in ("tokens_per_s", "tokens_per_s_min", "tokens_per_s_max")})
    point["ratio"] = point["tokens_per_s"] / rates["tokens_per_s"]


def _ratio_text(point: dict) -> str:
    if point.get("ratio") is None:
        return ""
    return f" | PyTorch {point['pytorch_tokens_per_s']:,.1f} tok/s, ratio {point['ratio']:.2f}x"


# --- PyTorch on whatever device it has ---------------------------------------------------------------------------
def _on_cuda(model: Any, dtype: str | None = None) -> Any:
    """The reference moved to the GPU (weights cast to `dtype` if given) with SDPA: PyTorch's fused attention."""
    import torch

    model = model.to(device="cuda", dtype=getattr(torch, dtype) if dtype else None)
    try:
        model.set_attn_implementation("sdpa")
    except (AttributeError, ValueError):  # an older transformers: keep what it has
        pass
    return model


def _torch_cuda() -> bool:
    torch = sys.modules.get("torch")  # imported by a comparison already, or not needed
    return torch is not None and torch.cuda.is_available()


def _pytorch_generate_seconds(model: Any, prompt_BT: np.ndarray, new_tokens: int, top_k: int, repeats: int) -> list:
    """Seconds per `generate` call (decode.time_pytorch's settings: sampling, top-k, KV cache, no early stop)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.from_numpy(prompt_BT.astype(np.int64)).to(device)
    kwargs = dict(do_sample=True, top_k=top_k, use_cache=True, pad_token_id=0, eos_token_id=None)

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt_BT.shape[1] + n
        return time.perf_counter() - start

    generate(2)  # warm-up
    return [generate(new_tokens) for _ in range(repeats)]


def _pytorch_train_seconds(config: Any, params: Any, batch_BT1: np.ndarray, dtype: str, repeats: int) -> list | None:
    """Seconds per PyTorch training step: train.time_pytorch on a CPU (float32 only), on CUDA the same step in
    autocast to `dtype` with fp32 weights (our precision recipe) and fused AdamW; None where there is no match."""
    import torch

    from benchmarks import train as train_bench

    if not _torch_cuda():
        return train_bench.time_pytorch(config, params, batch_BT1, repeats=repeats) if dtype == "float32" else None
    import torch.nn.functional as F

    hyper = train_bench.HYPER
    model = _on_cuda(train_bench._torch_model(config, params))  # fp32 weights, bf16 compute in autocast: like ours
    named = list(model.named_parameters())  # the tied head appears once
    decay = [p for n, p in named if n.endswith(".weight") and p.ndim == 2]
    rest = [p for n, p in named if not (n.endswith(".weight") and p.ndim == 2)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hyper["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=hyper["learning_rate"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"], fused=True,
    )  # fmt: skip
    tokens = torch.from_numpy(batch_BT1.astype(np.int64)).to("cuda")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            logits = model(inputs).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hyper["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # warm-up: allocations, optimizer state, autotuning
    return [step() for _ in range(repeats)]
