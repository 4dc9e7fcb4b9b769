"""Kernels per decode step: the number every change to the decode step is judged by, beside its ms per step.

A GPU decode step of a small model is bound by how many kernels it launches (~2 us each on an H200, whatever their
size), not by the bytes they read, so the step's kernel count is the figure to cut. Two ways to count it:

`decode_step_kernels` reads the compiled (optimized) HLO of the decode loop (`compiled.as_text()`), on any backend,
deterministically. The rule: every instruction at the top level of a computation that runs (the entry, and the
bodies and conditions of while loops, the branches of conditionals and the callees of calls it reaches) is one
launch if it does work: a fusion, a custom call (cuBLAS, cuDNN, TopK...), or an op left unfused (a dot on a CPU, a
copy, a sort, a dynamic-update-slice). Parameters, constants, tuples, get-tuple-element, bitcasts and the control
flow instructions themselves are free (XLA runs them on the host or as aliases), and a fusion's or custom call's
inner computation is part of that one launch. A while loop's body counts once per iteration, its condition too
unless XLA knows the trip count (`known_trip_count`: then it never runs the condition; checked against a CPU trace).
The decode loop's own while loop runs `steps_per_iteration` steps per iteration (the sampler's block of steps), so a
step's count is the loop's per iteration over that, plus what the call runs outside the loop once, spread over the
call's steps. On a CPU, a call XLA marks small (`xla_cpu_small_call`) is compiled into one function: one launch.
On a GPU each launch is about one kernel: a memcpy for a copy; a few launch more than one (a sort, a reduction split
in two passes), and the trace count tells. On a CPU each is one thunk of XLA's CPU runtime, a function call on the
host, cheaper per unit; its fusions are smaller than a GPU's (a dot stays a library call, a reduction is split), so
the CPU and GPU counts of one program differ.

`trace_kernels_per_step` counts what really ran from a `jax.profiler` trace (the `.trace.json.gz` it writes): the
events of the device's streams on a GPU (kernels and memcpys), the thunks of XLA's CPU client threads on a CPU,
inside the host-side `TraceAnnotation` windows (`DECODE_ANNOTATION`, around each timed decode call in
benchmarks/decode.py), over the steps those windows ran. Trace with `profiler_options()`. Note that XLA turns off
CUDA graphs while profiling.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
from typing import Any

import jax

DECODE_ANNOTATION = "decode_steps"
FREE_OPS = frozenset(
    "parameter constant get-tuple-element tuple bitcast after-all add-dependency opt-barrier partition-id "
    "replica-id domain async-done async-update copy-done while call conditional".split()
)
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.*)$")


def parse_hlo(text: str) -> tuple[dict[str, list[tuple[str, str, str]]], str]:
    """({computation: [(instruction name, opcode, its text)]}, the entry's name) of an HLO module's text."""
    computations: dict[str, list[tuple[str, str, str]]] = {}
    current, entry = None, None
    for line in text.splitlines():
        if header := _HEADER.match(line):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (instruction := _INSTRUCTION.match(line)):
            computations[current].append((instruction.group(1), _opcode(instruction.group(2)), line))
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return computations, entry


def _opcode(rhs: str) -> str:
    """The opcode of an instruction's right-hand side `TYPE opcode(operands), attributes`."""
    if rhs.startswith("("):  # a tuple type, possibly nested: skip to its closing parenthesis
        depth, end = 0, 0
        while end == 0 or depth:
            depth += {"(": 1, ")": -1}.get(rhs[end], 0)
            end += 1
        rest = rhs[end:].lstrip()
    else:
        rest = rhs.split(" ", 1)[1]
    return re.match(r"([\w-]+)\(", rest).group(1)


def _kind(opcode: str, line: str) -> str:
    """The breakdown's key of one launch: the fusion kind, the custom call's target, else the opcode."""
    if opcode == "fusion":
        return "fusion:" + re.search(r"kind=(\w+)", line).group(1)
    if opcode == "custom-call":
        return "custom-call:" + re.search(r'custom_call_target="([^"]+)"', line).group(1)
    return opcode


def _trip_count(line: str) -> int | None:
    found = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
    return int(found.group(1)) if found else None


def _called(line: str, *attributes: str) -> list[str]:
    names = []
    for attribute in attributes:
        if found := re.search(rf"{attribute}=\{{([^}}]*)\}}", line):
            names += [n.strip().lstrip("%") for n in found.group(1).split(",")]
        elif found := re.search(rf"{attribute}=%([\w.-]+)", line):
            names.append(found.group(1))
    return names


def launches(computations: dict, name: str, skip: str | None = None, matching: str = "") -> collections.Counter:
    """Launches (by kind) of one run of computation `name`, loops multiplied out; instruction `skip` left out, and
    only those whose text contains `matching` (e.g. '= f32[8,64]', what they produce) counted."""
    counts: collections.Counter = collections.Counter()
    for instruction, opcode, line in computations[name]:
        if instruction == skip:
            continue
        if opcode == "while":  # with a known trip count XLA runs the body that often and never the condition
            trips = _trip_count(line)
            counts += _times(launches(computations, *_called(line, "body"), matching=matching), trips or 1)
            if trips is None:
                counts += launches(computations, *_called(line, "condition"), matching=matching)
        elif opcode == "call" and 'xla_cpu_small_call="true"' in line:  # XLA:CPU makes it one function, loops and all
            counts["call:small"] += matching in line
        elif opcode == "call":
            counts += launches(computations, *_called(line, "to_apply"), matching=matching)
        elif opcode == "conditional":  # one branch runs: count the largest
            branches = _called(line, "branch_computations", "true_computation", "false_computation")
            counts += max((launches(computations, b, matching=matching) for b in branches), key=lambda c: c.total())
        elif opcode not in FREE_OPS and matching in line:
            counts[_kind(opcode, line)] += 1
    return counts


def _times(counts: collections.Counter, n: int) -> collections.Counter:
    return collections.Counter({kind: count * n for kind, count in counts.items()})


def decode_step_kernels(hlo_text: str, steps: int, steps_per_iteration: int = 1) -> dict[str, Any]:
    """Kernels per step of one decode call of `steps` steps, from its compiled HLO (see the module doc).

    The decode loop is the entry's while loop with the most launches per iteration; it runs `steps_per_iteration`
    steps per iteration (the sampler's steps per block). Returns `launches` (the whole call's), `kernels_per_step`
    (loop and outside, per step), `kernels_per_step_in_loop`, `kernels_outside_loop` (once per call) and `breakdown`
    (launches per step in the loop by fusion kind, custom-call target or opcode).
    """
    computations, entry = parse_hlo(hlo_text)
    loops = [(name, line) for name, opcode, line in computations[entry] if opcode == "while"]
    if not loops:
        raise ValueError("the decode call's entry has no while loop")
    per_iteration = {}
    for name, line in loops:
        body = launches(computations, *_called(line, "body"))
        per_iteration[name] = (body, launches(computations, *_called(line, "condition")))
    loop = max(per_iteration, key=lambda n: per_iteration[n][0].total())
    body, condition = per_iteration[loop]
    outside = launches(computations, entry, skip=loop).total()
    iterations = math.ceil(steps / steps_per_iteration)
    total = iterations * body.total() + (iterations + 1) * condition.total() + outside
    in_loop = body + condition
    return {
        "launches": total,
        "kernels_per_step": round(total / steps, 2),
        "kernels_per_step_in_loop": round(in_loop.total() / steps_per_iteration, 2),
        "kernels_outside_loop": outside,
        "breakdown": {kind: round(n / steps_per_iteration, 2) for kind, n in sorted(in_loop.items())},
    }


# --- from a profiler trace -------------------------------------------------------------------------------------------
def profiler_options() -> jax.profiler.ProfileOptions:
    """`jax.profiler.trace`'s options for counting launches: no Python tracer. Its events (every Python call while
    JAX traces and compiles) fill the 1,000,000 events a `.trace.json.gz` keeps, and the launches are dropped."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return options


def load_trace(trace_dir: str) -> list[dict]:
    """The events of the newest `.trace.json.gz` under `trace_dir` (jax.profiler's Perfetto JSON); [] if none."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        return []
    with gzip.open(max(paths, key=os.path.getmtime), "rt", encoding="utf-8") as f:
        events = json.load(f)
    return events.get("traceEvents", []) if isinstance(events, dict) else events


_CPU_CONTROL = re.compile(r"^(while|conditional)(\.\d+)?$")  # control thunks, free in the HLO rule


def kernel_events(events: list[dict]) -> list[dict]:
    """The complete ('X') events that are launches: on a device's streams (a GPU's kernels and memcpys) where the
    trace has devices, else the thunks XLA's CPU client threads ran (each with its `hlo_op`), control flow left out."""
    metadata = [e for e in events if e.get("ph") == "M"]
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in metadata if e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"].get("name", "") for e in metadata if e.get("name") == "thread_name"}
    devices = {pid for pid, name in names.items() if name.startswith("/device:")}
    complete = [e for e in events if e.get("ph") == "X"]
    if devices:
        streams = {key for key, name in threads.items() if key[0] in devices and "stream" in name.lower()}
        on_device = [e for e in complete if e["pid"] in devices]
        # Derived lines (XLA Modules, XLA Ops, Steps) repeat the kernels' time; the streams alone are the launches.
        return [e for e in on_device if (e["pid"], e["tid"]) in streams] if streams else on_device
    return [
        e
        for e in complete
        if threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")
        and "hlo_op" in e.get("args", {})
        and not _CPU_CONTROL.match(e["name"])
    ]


def trace_kernels_per_step(events: list[dict], steps: int, annotation: str = DECODE_ANNOTATION) -> dict[str, Any]:
    """Launches and their busy time per step inside the `annotation` windows, which ran `steps` steps in all.

    A launch counts when it starts inside a window: with the host waiting on the results before it leaves the
    window (benchmarks/decode.py does), every launch of the decode calls starts there, and none of the prefills'.
    """
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e["name"] == annotation)
    if not windows:
        raise ValueError(f"no {annotation!r} annotation in the trace")
    inside = [e for e in kernel_events(events) if any(start <= e["ts"] <= end for start, end in windows)]
    return {
        "kernels_per_step": round(len(inside) / steps, 2),
        "busy_ms_per_step": sum(e.get("dur", 0) for e in inside) / 1000 / steps,
        "by_name": collections.Counter(e["name"] for e in inside),
    }
