"""Multi-process runs on this CPU: 2 processes x 4 simulated devices (jax.distributed on
localhost, gloo collectives) against 1 process x 8 devices; a crash and resume; SIGTERM to
one process only; an unreachable coordinator. Workers have short timeouts and are killed by
process group on failure, so nothing hangs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(processes: int, out, workdir, steps: int, *extra: str) -> list[subprocess.Popen]:
    os.makedirs(out, exist_ok=True)
    port, procs = free_port(), []
    for i in range(processes):
        env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
        env.update(JAX_NUM_CPU_DEVICES=str(8 // processes), JAX_PLATFORMS="cpu",
                   ARJAX_INIT_TIMEOUT="60")
        if processes > 1:
            env.update(ARJAX_DISTRIBUTED="explicit", ARJAX_COORDINATOR=f"localhost:{port}",
                       ARJAX_NUM_PROCESSES=str(processes), ARJAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, str(out), str(workdir), str(steps), *extra], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def finish(procs, timeout: float = 240) -> list[int]:
    deadline, codes = time.time() + timeout, []
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return codes


def run(processes, out, workdir, steps, *extra, expect=0):
    procs = start(processes, out, workdir, steps, *extra)
    codes = finish(procs)
    logs = [p.stdout.read().decode()[-3000:] for p in procs]
    assert all(c == expect for c in codes), (codes, logs)
    return [dict(np.load(os.path.join(out, f"process-{i}.npz"))) for i in range(processes)
            ] if expect == 0 else logs


def same_run(a: dict, b: dict, rtol=1e-5):
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=rtol)
    for k in a:
        if k.startswith("arr_"):  # the trained weights
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_a_crash_exactly(tmp_path):
    (one,) = run(1, tmp_path / "one", tmp_path / "w1", 6)
    assert len(one["losses"]) == 6
    run(2, tmp_path / "two", tmp_path / "w2", 6, "--die-at", "5", expect=9)  # ckpt at 3
    assert sorted(os.listdir(tmp_path / "w2" / "gpt" / "ckpt")) == ["3"]
    two = run(2, tmp_path / "two", tmp_path / "w2", 6)  # resumes at step 3
    same_run(one, two[0])  # losses 1-3 from the first run's log, 4-6 resumed
    same_run(two[0], two[1], rtol=0)  # every process holds the same gathered weights
    for run_ in (one, *two):  # samples of the whole batch, gathered onto every process
        np.testing.assert_array_equal(run_["sampled"], np.arange(16) % 5)
    # Process 0 alone wrote the logs (rows 4 and 5 of the crashed run replaced); both
    # processes wrote their checkpoint shards.
    logs = open(tmp_path / "w2" / "gpt" / "tb" / "metrics.jsonl").readlines()
    assert [json.loads(r)["step"] for r in logs] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(tmp_path / "w2" / "gpt" / "ckpt")) == ["3", "6"]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
    out = tmp_path / "out"
    procs = start(2, out, tmp_path / "w", 60, "--sleep", "0.3")
    marker = out / "step-1"
    deadline = time.time() + 180
    while not (marker.exists() and marker.read_text() not in ("", "1")):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only
    codes = finish(procs)
    assert codes == [143, 143], [p.stdout.read().decode()[-3000:] for p in procs]
    saved = sorted(int(s) for s in os.listdir(tmp_path / "w" / "gpt" / "ckpt"))
    stopped = saved[-1]
    assert stopped % 10 == 0 and stopped < 60  # the agreed step (every STOP_CHECK_EVERY)
    assert (out / "step-0").read_text() == (out / "step-1").read_text() == str(stopped)


@pytest.mark.slow
def test_two_processes_extract_the_same_cache_as_one(tmp_path):
    for n in (1, 2):
        codes = finish(start(n, tmp_path / f"out{n}", tmp_path / f"cache{n}", 0, "--extract"))
        assert codes == [0] * n
    files = sorted(os.listdir(tmp_path / "cache1"))
    assert "manifest.json" in files and sorted(os.listdir(tmp_path / "cache2")) == files
    for f in files:
        if f.endswith(".npy"):  # shard k written by process k % 2, same bytes
            assert (tmp_path / "cache1" / f).read_bytes() == (tmp_path / "cache2" / f).read_bytes()


def test_unreachable_coordinator_is_one_clear_error():
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
    env.update(ARJAX_DISTRIBUTED="explicit", ARJAX_COORDINATOR=f"localhost:{free_port()}",
               ARJAX_NUM_PROCESSES="2", ARJAX_PROCESS_ID="1", ARJAX_INIT_TIMEOUT="3")
    out = subprocess.run(
        [sys.executable, "-m", "experiments.llamagen_imagenet", "--config", "digits",
         "--workdir", "/nonexistent/never-created"], env=env, capture_output=True,
        text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("error: could not reach the coordinator localhost:")
    assert "Traceback" not in out.stderr


def test_initialize_modes_and_their_errors(monkeypatch):
    from arjax import distributed

    for var in (*distributed.CLUSTER_MARKERS, "ARJAX_COORDINATOR", "ARJAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "WARNING: could not determine")  # libtpu's
    assert not distributed.cluster_detected()
    distributed.initialize("auto")  # a plain single process: nothing to join
    distributed.initialize("off")
    assert not __import__("jax").distributed.is_initialized()
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-4]")
    assert distributed.cluster_detected()
    with pytest.raises(distributed.DistributedError, match="must be one of"):
        distributed.initialize("sometimes")
    with pytest.raises(distributed.DistributedError, match="ARJAX_COORDINATOR"):
        distributed.initialize("explicit")
