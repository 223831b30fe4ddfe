"""Where arjax's train step (GPT-B or VAR-d16) spends its time on this CPU: XLA's own per-op
trace of the compiled step (the one `train_step_official` times), summed by kind of op.

    python -m benchmarks.train_step_profile [--model gpt_B|var_d16] [--batch 4] [--steps 3]
                                            [--top 12]

Times `--steps` steps (median wall time, and the process's CPU time over them: how many cores
the step keeps busy), then runs them under `jax.profiler.trace` (a Perfetto trace) and prints
per step the seconds each kind of op occupies the thread that runs it (layout copies and
transposes: `copy*` / `transpose*` / `bitcast*` fusions; matmuls: the YNNPACK fusions and dots
XLA:CPU emits for them; the rest) and the `--top` ops. An op is traced on the one thread that
runs it (XLA's client thread or an Eigen thread); the helpers a multi-threaded kernel (a
YNNPACK matmul) wakes leave no event, so op seconds are not core-seconds: the CPU-time line
says how busy the cores were, and its system time and minor page faults per step how much
memory each step touches afresh (the kernel zero-fills every new page).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import tempfile
import time

import jax

from benchmarks import harness

KINDS = (("copies / transposes", re.compile(r"^(copy|transpose|bitcast)")),
         ("matmuls (YNNPACK / dot)", re.compile(r"^(ynn|xnn|dot|gemm|__onednn)")),
         ("other", re.compile(r"")))


def kind_of(name: str) -> str:
    return next(k for k, pattern in KINDS if pattern.search(name))


def op_times(trace_dir: str) -> dict[str, float]:
    """Seconds per XLA op name summed over the trace: the complete events of the threads that
    run ops (XLA's client thread `XLAPjRtCpuClient` and its `XLAEigen` pool); the runtime's own
    scopes (`ThunkExecutor::Execute`, pool waits: C++ names) enclose ops and are left out."""
    [path] = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    runners = ("tf_XLAEigen", "tf_XLAPjRtCpuClient")
    compute = {e["tid"] for e in events if e.get("ph") == "M" and e.get("name") ==
               "thread_name" and e["args"]["name"].startswith(runners)}
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("tid") in compute and "::" not in e["name"] \
                and not e["name"].startswith("end: "):
            totals[e["name"]] += e.get("dur", 0) * 1e-6
    return totals


def main(argv=None) -> None:
    from benchmarks.train_step_official import MODELS, arjax_step

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt_B", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    run, stage, compile_s, _ = arjax_step(args.model, args.batch)
    cpu_before, wall_before = os.times(), time.perf_counter()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall = harness.median_s(run, args.steps)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    cpu_after, wall_total = os.times(), time.perf_counter() - wall_before
    cpu = sum(cpu_after[i] - cpu_before[i] for i in (0, 1))
    system, calls = cpu_after[1] - cpu_before[1], args.steps + 1  # median_s warms up once
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                run()
        totals = op_times(trace_dir)
    per_step = {name: t / args.steps for name, t in totals.items()}
    kinds: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for name, t in per_step.items():
        kinds[kind_of(name)] += t
        counts[kind_of(name)] += 1
    print(f"{args.model} train step, batch {args.batch} x {stage.model_cfg.seq_len}, "
          f"{os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}, compile {compile_s:.0f} s: {wall:.2f} s per step "
          f"(median of {args.steps}); process CPU time {cpu / wall_total:.2f} cores busy "
          f"(system {system / calls:.2f} s and {faults / calls:,.0f} minor page "
          f"faults per step); "
          f"{sum(per_step.values()):.2f} s of ops per step")
    for kind, _ in KINDS:
        print(f"  {kind:<24} {kinds[kind]:6.2f} s  ({counts[kind]} ops)")
    print("  top ops:")
    for name, t in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"    {t:6.3f} s  {name}")


if __name__ == "__main__":
    main()
