"""Kernels per decode step (benchmarks/kernels.py): the HLO count against hand-counted programs and against what a
profiler trace of the same calls shows, and the trace parser on a real CPU trace and on one shaped as a GPU's.

- the HLO rule on a hand-written GPU-style module (fusions, cuBLAS and TopK custom calls, an async op, a loop of
  known trip count inside the decode loop, a conditional), where every number is counted by hand, and on a step of
  Pallas calls (model/fused_decode.py): each Triton or Mosaic GPU custom call is one kernel;
- the tiny model's compiled decode chunk on this CPU: one more layer adds the same number of kernels as the one
  before it, top-k adds its custom call to greedy's step, and the count equals the thunks a `jax.profiler` trace of
  the benchmark's own decode calls shows (XLA:CPU runs one thunk per launch the rule counts);
- a synthetic trace in the format jax.profiler writes on a GPU: only the stream events inside the annotation count.
"""

from __future__ import annotations

import gzip
import json

import jax
import numpy as np
import pytest

from benchmarks import decode as decode_bench
from benchmarks import kernels
from gpt2_jax.config import GPT2Config
from gpt2_jax.model.decode import decode_weights
from gpt2_jax.model.transformer import init_params
from gpt2_jax.sampling.processors import SamplingConfig

# A decode loop as a GPU compiles it, cut down: the entry's while loop (data-dependent: no known trip count) runs a
# block of 8 steps per iteration as an inner loop of known trip count, whose body launches a fused layer norm, a
# cuBLAS matmul, an async copy, a TopK and a conditional whose larger branch launches 2 fusions.
GPU_STYLE_HLO = """HloModule jit_decode_chunk, is_scheduled=true, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_norm (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%p)
}

%small (p.1: f32[8]) -> f32[8] {
  %p.1 = f32[8]{0} parameter(0)
  ROOT %f.1 = f32[8]{0} fusion(%p.1), kind=kLoop, calls=%fused_norm
}

%big (p.2: f32[8]) -> f32[8] {
  %p.2 = f32[8]{0} parameter(0)
  %f.2 = f32[8]{0} fusion(%p.2), kind=kLoop, calls=%fused_norm
  ROOT %f.3 = f32[8]{0} fusion(%f.2), kind=kInput, calls=%fused_norm
}

%step (s: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %x = f32[8]{0} get-tuple-element(%s), index=1
  %norm = f32[8]{0} fusion(%x), kind=kInput, calls=%fused_norm
  %gemm = (f32[8]{0}, s8[64]{0}) custom-call(%norm), custom_call_target="__cublas$gemm"
  %y = f32[8]{0} get-tuple-element(%gemm), index=0
  %start = ((f32[8]{0}), f32[8]{0}, u32[]) copy-start(%y)
  %done = f32[8]{0} copy-done(%start)
  %top = (f32[8]{0}, s32[8]{0}) custom-call(%done), custom_call_target="TopK", called_computations={%fused_norm}
  %pred = pred[] constant(true)
  %branch = f32[8]{0} conditional(%pred, %done, %done), true_computation=%small, false_computation=%big
  %b = f32[8]{0} bitcast(%branch)
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %b)
}

%cond (c: (s32[], f32[8])) -> pred[] {
  %c = (s32[], f32[8]{0}) parameter(0)
  ROOT %yes = pred[] constant(true)
}

%block (s.1: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s.1 = (s32[], f32[8]{0}) parameter(0)
  %inner = (s32[], f32[8]{0}) while(%s.1), condition=%cond, body=%step, backend_config={"known_trip_count":{"n":"8"}}
  %x.1 = f32[8]{0} get-tuple-element(%inner), index=1
  %i.1 = s32[] get-tuple-element(%inner), index=0
  %next = s32[] fusion(%i.1), kind=kLoop, calls=%fused_norm
  ROOT %t.1 = (s32[], f32[8]{0}) tuple(%next, %x.1)
}

%running (c.1: (s32[], f32[8])) -> pred[] {
  %c.1 = (s32[], f32[8]{0}) parameter(0)
  ROOT %go = pred[] fusion(%c.1), kind=kLoop, calls=%fused_norm
}

ENTRY %main (x.2: f32[8]) -> f32[8] {
  %x.2 = f32[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = f32[8]{0} fusion(%x.2), kind=kLoop, calls=%fused_norm
  %t.2 = (s32[], f32[8]{0}) tuple(%zero, %init)
  %loop = (s32[], f32[8]{0}) while(%t.2), condition=%running, body=%block
  ROOT %out = f32[8]{0} get-tuple-element(%loop), index=1
}
"""


def test_the_hlo_rule_on_a_gpu_style_module_counted_by_hand():
    # A step: norm + gemm + copy-start + TopK + the larger branch's 2 fusions = 6. A block: 8 steps and the
    # counter's fusion (the inner loop's condition never runs: its trip count is known) = 49 per iteration, and
    # the entry's condition, 1 per iteration and once more at the end.
    counted = kernels.decode_step_kernels(GPU_STYLE_HLO, steps=20, steps_per_iteration=8)
    iterations = 3  # 20 steps in blocks of 8: the last block's 4 extra steps are masked, but they launch
    assert counted["launches"] == iterations * 49 + (iterations + 1) * 1 + 1  # + the entry's fusion, once
    assert counted["kernels_per_step_in_loop"] == (49 + 1) / 8
    assert counted["kernels_outside_loop"] == 1
    assert counted["breakdown"] == {
        "copy-start": 1.0, "custom-call:TopK": 1.0, "custom-call:__cublas$gemm": 1.0,
        "fusion:kInput": (8 + 8) / 8, "fusion:kLoop": (8 + 1 + 1) / 8,
    }  # fmt: skip
    # One run of the entry (its loop once) counting only the launches whose text matches: the 2 kInput fusions a step.
    assert kernels.launches(*kernels.parse_hlo(GPU_STYLE_HLO), matching="kind=kInput") == {"fusion:kInput": 16}


# A step of fused Pallas layers as a GPU compiles it: each pallas_call is one custom call (Triton's, or Mosaic GPU's
# where a kernel lowers there), its kernel serialized into the backend config (stand-ins here, with the braces, quotes
# and escapes such configs hold: the count reads the opcode and target only); the cache write stays a fusion.
TRITON = 'custom_call_target="__gpu$xla.gpu.triton", backend_config={name = "%s", ir = "ML\\EFR{}=(x)", num_warps = 4}'
MOSAIC = 'custom_call_target="mosaic_gpu_v2", backend_config="{\\22module\\22: \\22...\\22}"'
FOUR_TRIPS = 'backend_config={"known_trip_count":{"n":"4"}}'
PALLAS_STEP_HLO = f"""HloModule jit_decode_chunk, entry_computation_layout={{(bf16[96,1]{{1,0}})->bf16[96,1]{{1,0}}}}

%step (s: (s32[], bf16[96,1])) -> (s32[], bf16[96,1]) {{
  %s = (s32[], bf16[96,1]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %x = bf16[96,1]{{1,0}} get-tuple-element(%s), index=1
  %qkv = bf16[96,1]{{1,0}} custom-call(%x), {TRITON % "ln_linear"}
  %a = bf16[96,1]{{1,0}} custom-call(%qkv), {TRITON % "cached_attention"}
  %m = bf16[96,1]{{1,0}} custom-call(%a), {MOSAIC}
  %w = bf16[96,1]{{1,0}} fusion(%m), kind=kLoop, calls=%write
  ROOT %t = (s32[], bf16[96,1]{{1,0}}) tuple(%i, %w)
}}

%write (p: bf16[96,1]) -> bf16[96,1] {{
  ROOT %p = bf16[96,1]{{1,0}} parameter(0)
}}

%cond (c: (s32[], bf16[96,1])) -> pred[] {{
  %c = (s32[], bf16[96,1]{{1,0}}) parameter(0)
  ROOT %yes = pred[] constant(true)
}}

ENTRY %main (x.1: bf16[96,1]) -> bf16[96,1] {{
  %x.1 = bf16[96,1]{{1,0}} parameter(0)
  %zero = s32[] constant(0)
  %t.1 = (s32[], bf16[96,1]{{1,0}}) tuple(%zero, %x.1)
  %loop = (s32[], bf16[96,1]{{1,0}}) while(%t.1), condition=%cond, body=%step, {FOUR_TRIPS}
  ROOT %out = bf16[96,1]{{1,0}} get-tuple-element(%loop), index=1
}}
"""


def test_each_pallas_call_counts_as_one_kernel():
    """The fused decode layers (model/fused_decode.py) launch one kernel per pallas_call, Triton's or Mosaic GPU's."""
    counted = kernels.decode_step_kernels(PALLAS_STEP_HLO, steps=4)
    assert counted["breakdown"] == {
        "custom-call:__gpu$xla.gpu.triton": 2.0, "custom-call:mosaic_gpu_v2": 1.0, "fusion:kLoop": 1.0
    }  # fmt: skip
    assert counted["kernels_per_step"] == 4.0


def tiny(n_layer: int) -> GPT2Config:
    return GPT2Config(n_vocab=97, n_ctx=64, n_embd=32, n_head=2, n_layer=n_layer)


def timed(config: GPT2Config, sampling: SamplingConfig, repeats: int = 1) -> dict:
    weights = decode_weights(init_params(config, 0), config)
    prompt_BT = np.arange(16, dtype=np.int32).reshape(2, 8)
    return decode_bench.time_ours(weights, config, prompt_BT, 6, 50, repeats, sampling=sampling)


TOP_K = SamplingConfig(top_k=50)


def test_each_layer_adds_the_same_kernels_and_top_k_adds_its_own():
    # From the second layer on (the first shares fusions with the embedding): the same count per layer.
    per_step = {n: timed(tiny(n), TOP_K)["kernels"] for n in (2, 3, 4)}
    two, three, four = (per_step[n]["kernels_per_step"] for n in (2, 3, 4))
    assert four - three == three - two > 5  # a layer's norms, matmuls, attention, ...
    kinds = [per_step[n]["kernels_by_kind"] for n in (2, 3, 4)]
    assert {k: kinds[2][k] - kinds[1][k] for k in kinds[2]} == {k: kinds[1][k] - kinds[0][k] for k in kinds[2]}
    greedy = timed(tiny(2), SamplingConfig(temperature=0))["kernels"]
    # Top-k sampling: one TopK and the draw's random bits; greedy: one TopK of 1 (argmax_ids on a CPU) and no draw.
    assert per_step[2]["kernels_by_kind"]["custom-call:TopK"] == greedy["kernels_by_kind"]["custom-call:TopK"] == 1
    assert greedy["kernels_per_step"] < two - 10


def test_the_hlo_count_is_what_a_cpu_trace_of_the_decode_calls_shows(tmp_path):
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True, profiler_options=kernels.profiler_options()):
        ours = timed(tiny(2), TOP_K, repeats=2)
    events = kernels.load_trace(str(tmp_path))
    traced = kernels.trace_kernels_per_step(events, steps=(2 + 1) * (6 - 1))  # warm-up and 2 runs of 5 steps
    assert traced["kernels_per_step"] == ours["kernels"]["kernels_per_step"]
    assert traced["busy_ms_per_step"] > 0 and "custom-call" in traced["by_name"]


def gpu_trace_events() -> list[dict]:
    """A trace as jax.profiler writes it on a GPU: a host process with the annotation, a device process whose
    streams hold the kernels and memcpys, and a derived 'XLA Ops' line repeating them."""
    host, device = 1, 2
    meta = [
        {"ph": "M", "pid": host, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": device, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": host, "tid": 1, "name": "thread_name", "args": {"name": "python"}},
        {"ph": "M", "pid": device, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": device, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]
    window = [{"ph": "X", "pid": host, "tid": 1, "ts": 100.0, "dur": 100.0, "name": kernels.DECODE_ANNOTATION}]
    kernel = lambda name, ts, tid=7: {"ph": "X", "pid": device, "tid": tid, "ts": ts, "dur": 2.0, "name": name}
    inside = [kernel("input_reduce_fusion", 110 + 10 * i) for i in range(6)] + [kernel("MemcpyD2H", 180)]
    outside = [kernel("prefill_fusion", 50), kernel("prefill_fusion", 201)]  # before and after the window
    derived = [kernel("fusion.1", 110, tid=9)]
    return meta + window + inside + outside + derived


def test_a_gpu_trace_counts_the_stream_launches_inside_the_annotation(tmp_path):
    path = tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump({"traceEvents": gpu_trace_events(), "displayTimeUnit": "ns"}, f)
    traced = kernels.trace_kernels_per_step(kernels.load_trace(str(tmp_path)), steps=7)
    assert traced["kernels_per_step"] == 1.0  # 6 kernels and a memcpy over 7 steps
    assert traced["by_name"] == {"input_reduce_fusion": 6, "MemcpyD2H": 1}
    assert traced["busy_ms_per_step"] == pytest.approx(7 * 2.0 / 1000 / 7)
    with pytest.raises(ValueError, match="no 'elsewhere' annotation"):
        kernels.trace_kernels_per_step(gpu_trace_events(), steps=1, annotation="elsewhere")
