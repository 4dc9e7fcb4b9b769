"""Named benchmark sweeps (`toy`, `quick`, `full`, `scaling`) and the runner that measures every point of them.

A sweep is one job over a grid: presets x batch sizes x attention x remat x scan unroll x device counts. Training
points come from `benchmarks/train.py`, prefill and decode points from `benchmarks/decode.py`; this file adds what
the suite promises on top of them: several timed runs per point (median and min/max), MFU against the device's peak
(a datasheet for known accelerators, a matmul measured in this run on a CPU), model FLOP/s, device memory, the
memory-bandwidth bound for decoding, the PyTorch comparison (eager and under torch.compile, benchmarks/compare.py;
on the GPU too, in the compute dtype) and the scaling over device counts. A point that fails is kept with its
`error` and the rest still run.

Fields of a point:
    job                 'train', 'prefill' or 'decode'
    preset n_layer n_embd dtype attention remat devices
    scan_unroll         train: layers per scan step, as the model ran (default: train.py's, 1 on a CPU, all on GPU/TPU)
    batch               global batch in sequences
    seq                 train: tokens per sequence; prefill and decode: prompt tokens
    new_tokens          decode: tokens generated per sequence (top-k sampling, no early stop)
    sampling            decode: 'top-k K' or 'greedy' (a sweep's temperature 0); with any other field that
                        decode.time_ours returns beside its timings
    tokens_per_s        median over `repeats` timed runs after warm-up; tokens_per_s_min / tokens_per_s_max
                        train: batch x seq per optimizer step; prefill: prompt tokens; decode: new tokens per
                        whole generation, prefill included (what a user waits for)
    per_token_ms        decode: one step of the decode loop
    compile_s           first call minus a steady-state call
    model_flops_per_s   tokens/s x FLOPs per token (gpt2_jax.model.flops: 6N + 12LHQT to train, a third of it forward)
    mfu, peak_flops, peak_source   train: model FLOP/s over the peak of the devices used
    memory_bytes_in_use, memory_peak_bytes   where the backend reports them (peak since the process started)
    bandwidth_fraction, bound_ms_per_step, bytes_per_step   decode: see benchmarks/bandwidth.py
    kernels_per_step, kernels_by_kind   decode: launches per decode step counted from the compiled decode loop, and
                        by fusion kind / custom-call target / opcode (benchmarks/kernels.py: kernels on a GPU, thunks
                        of XLA's CPU runtime on a CPU)
    first_loss, first_grad_norm   train: the loss and gradient norm of the first step (before any update)
    pytorch_tokens_per_s, pytorch_tokens_per_s_min/_max, ratio   with --compare pytorch
    pytorch_compiled_tokens_per_s (_min/_max), ratio_compiled, pytorch_compiled_backend   the same under
                        torch.compile (the sweep's backend); {pytorch,pytorch_compiled}_error where a column could
                        not run (benchmarks/compare.py)
    speedup, scaling_efficiency   train points measured on several device counts at the same global batch and
                        configuration (the `scaling` suite): tokens/s over the 1-device point's, and that speed-up over
                        the ideal one, which is the ratio of the peaks (N on N accelerators; 1 on a CPU, whose host
                        devices share the same cores, so there it is the cost of data parallelism, not a speed-up)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import bandwidth, compare, decode
from benchmarks import train as train_bench
from gpt2_jax.config import get_config
from gpt2_jax.errors import UsageError
from gpt2_jax.model.decode import decode_weights
from gpt2_jax.model.flops import flops_per_token, peak_flops
from gpt2_jax.model.ops import attention_implementation
from gpt2_jax.model.transformer import init_params
from gpt2_jax.sampling.processors import SamplingConfig

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
    temperature: float = 1.0  # decode only: 0 is greedy (top_k then changes nothing)
    compare_batches: tuple[int, ...] | None = None  # where --compare pytorch applies; None: every batch
    batch_per_device: bool = False  # train: `batches` are per device (weak scaling), else global
    scan_unroll: tuple[int | None, ...] = (None,)  # train only: layers per scan step; None: train.py's default
    torch_compile: str | None = "inductor"  # backend of the torch.compile column (with --compare); None: none
    kernels: str = "xla"  # decode only: DecodeWeights.kernels; "pallas" (model/fused_decode.py) marks its points

    def grid(self) -> Iterator[dict[str, Any]]:
        for preset, remat, attention, scan_unroll, devices, batch in itertools.product(
            self.presets, self.remat, self.attention, self.scan_unroll, self.devices, self.batches
        ):
            yield dict(
                preset=preset, batch=batch, attention=attention, remat=remat, scan_unroll=scan_unroll, devices=devices
            )


_GPU_TRAIN = dict(presets=("124M",), seq=1024, dtype="bfloat16")
SUITES: dict[str, tuple[Sweep, ...]] = {
    # Seconds, for the test suite: every code path at the smallest shapes (torch.compile's graph capture without
    # inductor's minute of code generation).
    "toy": (
        Sweep("train", ("tiny",), (2,), seq=32, torch_compile="eager"),
        Sweep("decode", ("tiny",), (2,), seq=8, new_tokens=8, torch_compile="eager"),
    ),
    # About 3 minutes on an idle 2-core CPU, plus torch.compile's compiles: the goals of the training and sampling
    # issues, against PyTorch.
    "quick": (
        Sweep("train", ("mini",), (8,), seq=256),
        Sweep("decode", ("124M",), (1, 8), seq=16, new_tokens=128),
    ),
    # Accelerators: GPT-2 124M at full context in bf16, the fused attention ('auto': cuDNN on a GPU) against XLA's,
    # the layer scan against train.py's unrolled layers, remat, a batch sweep, 16 sequences per device on every local
    # device, decode from batch 1 (bound by reading the weights) to 64 (by the KV cache too).
    "full": (
        Sweep("train", **_GPU_TRAIN, batches=(8, 16, 32), compare_batches=(16,)),
        Sweep("train", **_GPU_TRAIN, batches=(16,), attention=("xla",)),
        Sweep("train", **_GPU_TRAIN, batches=(16,), scan_unroll=(1,)),
        Sweep("train", **_GPU_TRAIN, batches=(32, 64), remat=(True,)),
        Sweep("train", **_GPU_TRAIN, batches=(16,), devices=("all",), batch_per_device=True),
        Sweep("decode", ("124M",), (1, 8, 64), seq=16, new_tokens=128, dtype="bfloat16"),
        Sweep("decode", ("124M",), (64,), seq=16, new_tokens=1000, dtype="bfloat16"),
    ),
}


SUITE_NAMES = (*SUITES, "scaling")
SCALING_HOST_DEVICES = 8  # CPU devices the scaling suite asks for on a machine without accelerators


def named_suite(name: str) -> tuple[Sweep, ...]:
    return scaling_suite() if name == "scaling" else SUITES[name]


def scaling_suite(n_devices: int | None = None, platform: str | None = None) -> tuple[Sweep, ...]:
    """Training at one global batch on 1, 2, 4, ... devices up to every local one (the last count is all of them).

    A CPU: GPT-2 `mini` (6 x 384), fp32, 8 x 256 (as the training goal), over the host devices that `python -m
    benchmarks --suite scaling` makes; accelerators: 124M, bf16, 32 x 1024. The batch is rounded up to a multiple
    of every device count, so it always splits evenly. n_devices, platform: this machine's unless given.
    """
    n = n_devices or len(jax.local_devices())
    counts = sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})
    on_cpu = (platform or jax.default_backend()) == "cpu"
    preset, seq, dtype, target = ("mini", 256, "float32", 8) if on_cpu else ("124M", 1024, "bfloat16", 32)
    multiple = math.lcm(*counts)
    batch = multiple * -(-target // multiple)
    return (Sweep("train", (preset,), (batch,), seq=seq, dtype=dtype, devices=tuple(map(str, counts))),)


def resolve_devices(spec: str) -> int:
    available = len(jax.local_devices())
    if spec == "all":
        return available
    n = int(spec)
    if not 1 <= n <= available:
        raise UsageError(f"A benchmark asks for {n} devices but this machine has {available}.")
    return n


def _resolve(sweep: Sweep, spec: dict[str, Any]) -> dict[str, Any]:
    """Device count, global batch, attention and scan unroll as they will run (left as given where they cannot
    resolve)."""
    spec = dict(spec)
    if spec["devices"] == "all" or spec["devices"].isdigit():
        spec["devices"] = str(len(jax.local_devices())) if spec["devices"] == "all" else spec["devices"]
        if sweep.batch_per_device:
            spec["batch"] *= int(spec["devices"])
    if sweep.job != "train":
        spec["attention"] = "-"  # not a choice when decoding: decode.py attends over its cache itself
        spec["scan_unroll"] = None
        return spec
    config = train_bench.model_config(spec["preset"], dtype=sweep.dtype, scan_unroll=spec["scan_unroll"])
    spec["scan_unroll"] = config.scan_unroll
    if spec["attention"] == "auto":
        spec["attention"] = attention_implementation(config)
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
            self._peaks[dtype] = peak_flops(self.device, dtype, measure_unknown=True)
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
            # PyTorch decodes on CUDA in the compute dtype, on a CPU in float32 (its fast path there).
            device = train_bench.pytorch_device(dtype) or "cpu"
            torch_dtype = dtype if device == "cuda" else "float32"
            model = decode.hf_model(self._model["params"], config, device=device, dtype=torch_dtype)
            self._model["torch"], self._model["torch_device"] = model, device
        return config, self._model[kind]

    # --- points ------------------------------------------------------------------------------------------------
    def run(self, sweeps: Sequence[Sweep], on_point: Callable[[list[dict]], None] | None = None) -> list[dict]:
        """Every point of `sweeps`; `on_point(points so far)` after each one (to save partial results)."""
        points: list[dict] = []
        seen: set[tuple] = set()
        for sweep in sweeps:
            for spec in sweep.grid():
                spec = _resolve(sweep, spec)
                key = (sweep.job, sweep.seq, sweep.dtype, sweep.new_tokens, sweep.top_k, sweep.temperature)
                key += (sweep.kernels,)
                key += tuple(spec.values())
                if key in seen:  # e.g. 'all' devices on a one-device machine, 'auto' attention where it means xla
                    continue
                seen.add(key)
                at = sweep.compare_batches
                with_pytorch = self.compare and (at is None or spec["batch"] in at)
                points += self._measure(sweep, spec, with_pytorch)
                add_scaling(points)
                if on_point:
                    on_point(points)
        return points

    def _measure(self, sweep: Sweep, spec: dict[str, Any], with_pytorch: bool) -> list[dict]:
        config = get_config(spec["preset"])
        base = dict(
            job=sweep.job, preset=spec["preset"], n_layer=config.n_layer, n_embd=config.n_embd, batch=spec["batch"],
            seq=sweep.seq, dtype=sweep.dtype, attention=spec["attention"], remat=spec["remat"], devices=1,
        )  # fmt: skip
        if sweep.job == "train":
            base["scan_unroll"] = spec["scan_unroll"]
        if sweep.job == "decode" and sweep.kernels != "xla":  # so an A/B's points differ (and its failures say so)
            base["kernels"] = sweep.kernels
        try:
            base["devices"] = resolve_devices(spec["devices"])
            if sweep.job == "train":
                points = [self._train_point(sweep, base, with_pytorch)]
            else:
                points = self._decode_points(sweep, base, with_pytorch)
        except Exception as e:  # one failed point (out of memory, an unsupported kernel) must not end the run
            self.log(f"FAILED {sweep.job} {spec}: {type(e).__name__}: {e}")
            self.log(traceback.format_exc(limit=-3).rstrip())
            return [dict(base, error=compare.one_line(e))]
        for p in points:
            p.update(bandwidth.memory_in_use(self.device))
        return points

    def _train_point(self, sweep: Sweep, base: dict[str, Any], with_pytorch: bool) -> dict:
        repeats = self.repeats or 5
        point = train_bench.measure_point(
            base["preset"], base["batch"], sweep.seq, dtype=sweep.dtype, devices=base["devices"],
            attention=base["attention"], remat=base["remat"], scan_unroll=base["scan_unroll"], repeats=repeats,
            pytorch=False, peak=self.peak(sweep.dtype),
        )  # fmt: skip
        point["repeats"] = repeats
        if with_pytorch and base["devices"] == 1:
            config = get_config(base["preset"], dtype=sweep.dtype)
            params = init_params(config, 0)  # the weights measure_point trained (seed 0), for PyTorch
            batch_BT1 = train_bench.random_batch(config, base["batch"], sweep.seq)

            def seconds(backend: str | None) -> list[float] | None:
                device = train_bench.pytorch_device(sweep.dtype)
                if device is None:  # no like-for-like PyTorch run (a 16-bit dtype on a CPU)
                    return None
                return train_bench.time_pytorch(
                    config, params, batch_BT1, device=device, dtype=sweep.dtype, repeats=repeats,
                    torch_compile=backend,
                )  # fmt: skip

            self._compare(point, base["batch"] * sweep.seq, seconds, sweep.torch_compile)
        self.log(
            f"train   {base['preset']} batch {base['batch']:>3} x {sweep.seq} {sweep.dtype} {base['attention']}"
            f"{' remat' if base['remat'] else ''} unroll {base['scan_unroll']} on {base['devices']} device(s): "
            f"{point['tokens_per_s']:,.0f} tok/s, MFU {100 * point['mfu']:.1f}%, compile {point['compile_s']:.1f} s"
            + compare.ratio_text(point)
        )
        return point

    def _decode_points(self, sweep: Sweep, base: dict[str, Any], with_pytorch: bool) -> list[dict]:
        config, weights = self.model(base["preset"], sweep.dtype)
        weights = dataclasses.replace(weights, kernels=sweep.kernels)  # the same arrays; jit keys on the choice
        batch, new_tokens = base["batch"], sweep.new_tokens
        prompt_BT = np.random.default_rng(0).integers(0, config.n_vocab, (batch, sweep.seq)).astype(np.int32)
        repeats = self.repeats or 3
        greedy = {"sampling": SamplingConfig(temperature=0.0)} if sweep.temperature == 0 else {}
        ours = decode.time_ours(weights, config, prompt_BT, new_tokens, sweep.top_k, repeats, **greedy)
        prefill_s, decode_s = np.array(ours["prefill_s"]), np.array(ours["decode_s"])
        compile_s = ours["compile_s"]
        prefill = dict(base, job="prefill", **_rates(batch * sweep.seq / prefill_s), compile_s=compile_s)
        prefill["prefill_ms"] = 1e3 * float(np.median(prefill_s))
        prefill["model_flops_per_s"] = prefill["tokens_per_s"] * flops_per_token(config, sweep.seq, training=False)
        point = dict(base, new_tokens=new_tokens, **_rates(batch * new_tokens / (prefill_s + decode_s)))
        point["sampling"] = "greedy" if greedy else f"top-k {sweep.top_k}"
        # Whatever else decode.time_ours measured beyond its timings goes on the point; its kernel counts below, spread
        # out (the point's "kernels" is the sweep's choice of layers, where not XLA's).
        point.update({k: v for k, v in ours.items() if k not in ("compile_s", "prefill_s", "decode_s", "kernels")})
        step_s = float(np.median(decode_s)) / max(new_tokens - 1, 1)
        context = round(sweep.seq + new_tokens / 2)
        point.update(
            compile_s=compile_s,
            per_token_ms=1e3 * step_s,
            **ours["kernels"],
            model_flops_per_s=point["tokens_per_s"] * flops_per_token(config, context, training=False),
            **bandwidth.decode_bound(
                config, batch=batch, prompt_len=sweep.seq, new_tokens=new_tokens, dtype=sweep.dtype,
                seconds_per_step=step_s, bandwidth=self.bandwidth(),
            ),
        )  # fmt: skip
        if with_pytorch:

            def seconds(backend: str | None) -> list[float]:
                model = self.model(base["preset"], sweep.dtype, "torch")[1]
                device = self._model["torch_device"]
                return decode.time_pytorch(
                    model, prompt_BT, new_tokens, sweep.top_k, repeats, device=device, torch_compile=backend
                )

            self._compare(point, batch * new_tokens, seconds, sweep.torch_compile)
        self.log(
            f"decode  {base['preset']} batch {batch:>3} {sweep.seq}+{new_tokens}"
            + ("" if sweep.kernels == "xla" else f" ({sweep.kernels} layers)")
            + f": {point['tokens_per_s']:,.1f} tok/s, "
            f"{point['per_token_ms']:.2f} ms/step, {point['kernels_per_step']:.0f} kernels/step, "
            f"{100 * point['bandwidth_fraction']:.0f}% of the bandwidth bound, "
            f"compile {compile_s:.1f} s" + compare.ratio_text(point)
        )
        return [prefill, point]

    def _compare(
        self, point: dict, tokens: int, seconds: Callable[[str | None], list | None], backend: str | None
    ) -> None:
        """Add the PyTorch columns (eager; compiled with `backend` where given) to `point`: `seconds(backend)`
        times one; a PyTorch failure is noted in the point, ours is kept."""
        for column, column_backend in compare.columns(backend):
            timed = functools.partial(seconds, column_backend)
            compare.add_column(point, column, tokens, timed, self.log, column_backend)


def add_scaling(points: Sequence[dict]) -> None:
    """`speedup` and `scaling_efficiency` (see the module doc) on every train point that has a 1-device point of the
    same configuration and global batch, where that configuration ran on more than one device count."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        if p["job"] == "train" and not p.get("error"):
            key = tuple(p.get(k) for k in ("preset", "batch", "seq", "dtype", "attention", "remat", "scan_unroll"))
            groups.setdefault(key, []).append(p)
    for group in groups.values():
        one = [p for p in group if p["devices"] == 1]
        if not one or len({p["devices"] for p in group}) < 2:
            continue
        for p in group:
            p["speedup"] = p["tokens_per_s"] / one[0]["tokens_per_s"]
            p["scaling_efficiency"] = p["speedup"] / (p["peak_flops"] / one[0]["peak_flops"])


def _rates(tokens_per_s: np.ndarray) -> dict[str, float]:
    return {
        "tokens_per_s": float(np.median(tokens_per_s)),
        "tokens_per_s_min": float(np.min(tokens_per_s)),
        "tokens_per_s_max": float(np.max(tokens_per_s)),
        "repeats": len(tokens_per_s),
    }
