"""Multi-process runs: one `initialize()` before any JAX call, and the few cross-process
helpers the rest of arjax uses (who writes files, gathering batch-sharded outputs, agreeing
on a stop).

Every process runs the same program on process-spanning arrays; only files and progress bars
are process 0's (`is_main`). On one process every helper is a no-op or a plain copy, so the
same code runs on a laptop, 8 simulated CPU devices and a pod.

`initialize(mode)` (or env `ARJAX_DISTRIBUTED`):
  - `auto` (default): `jax.distributed.initialize()` with JAX's own cluster detection when a
    cluster environment is present (Cloud TPU VM / GKE, SLURM `srun`, Open MPI, or
    `JAX_COORDINATOR_ADDRESS`); a no-op for a plain single process.
  - `explicit`: coordinator `host:port`, process count and id (and optionally local device
    ids) from `ARJAX_COORDINATOR`, `ARJAX_NUM_PROCESSES`, `ARJAX_PROCESS_ID`,
    `ARJAX_LOCAL_DEVICE_IDS` (GPU nodes without SLURM, and the CPU multi-process tests).
  - `off`: never initialise (one process).
"""

from __future__ import annotations

import os
import socket
import sys
import time

import jax
import numpy as np

from arjax.errors import UserError

MODES = ("auto", "explicit", "off")
# TPU hosts are recognised by their devices, not by TPU_WORKER_HOSTNAMES (libtpu itself sets
# that to a warning text off a TPU VM).
CLUSTER_MARKERS = ("SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE",
                   "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


class DistributedError(UserError, RuntimeError):
    """The processes of a run could not find each other; the message says what to set."""


def _on_tpu_vm() -> bool:
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def cluster_detected() -> bool:
    """Whether the environment is one jax.distributed auto-detects (a multi-process launch)."""
    return any(os.environ.get(k) for k in CLUSTER_MARKERS) or (
        _on_tpu_vm() and not os.environ.get("TPU_SKIP_MDS_QUERY"))


def initialize(mode: str | None = None, timeout_s: int | None = None) -> None:
    """Joins the run's processes (see module doc); call before anything touches a device.
    Safe to call twice. An unreachable coordinator is a `DistributedError`, not a hang:
    `timeout_s` (env `ARJAX_INIT_TIMEOUT`, default 300) bounds the wait."""
    mode = mode or os.environ.get("ARJAX_DISTRIBUTED", "auto")
    if mode not in MODES:
        raise DistributedError(f"ARJAX_DISTRIBUTED / --distributed must be one of {MODES}, "
                               f"got {mode!r}")
    if mode == "off" or jax.distributed.is_initialized():
        return
    timeout_s = int(timeout_s or os.environ.get("ARJAX_INIT_TIMEOUT", 300))
    if mode == "auto":
        if not cluster_detected():
            return
        kwargs = {}
    else:
        missing = [k for k in ("ARJAX_COORDINATOR", "ARJAX_NUM_PROCESSES", "ARJAX_PROCESS_ID")
                   if not os.environ.get(k)]
        if missing:
            raise DistributedError(
                f"--distributed explicit needs {missing} in the environment, e.g. "
                "ARJAX_COORDINATOR=10.0.0.1:61440 ARJAX_NUM_PROCESSES=4 ARJAX_PROCESS_ID=<0..3>")
        ids = os.environ.get("ARJAX_LOCAL_DEVICE_IDS")
        kwargs = dict(coordinator_address=os.environ["ARJAX_COORDINATOR"],
                      num_processes=int(os.environ["ARJAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["ARJAX_PROCESS_ID"]),
                      local_device_ids=[int(i) for i in ids.split(",")] if ids else None,
                      cluster_detection_method="deactivate")
    if kwargs.get("process_id"):
        _wait_for_coordinator(kwargs["coordinator_address"], timeout_s)
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    except Exception as e:  # the coordination service raises XlaRuntimeError / RuntimeError
        where = kwargs.get("coordinator_address", "the auto-detected coordinator")
        raise DistributedError(
            f"could not join the run at {where} within {timeout_s} s ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); start every process with the same "
            "coordinator address and process count, check that process 0 is running and the "
            "port is reachable") from None
    print(f"process {jax.process_index()}/{jax.process_count()}: "
          f"{jax.local_device_count()} of {jax.device_count()} {jax.default_backend()} devices",
          file=sys.stderr)


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Waits until process 0's coordination service accepts connections: XLA aborts the
    process (no Python exception) when it cannot register within the timeout."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"could not reach the coordinator {address} within {timeout_s} s ({e}); "
                    "start process 0 first (or together), check ARJAX_COORDINATOR and that "
                    "the port is open between the hosts") from None
            time.sleep(0.5)


def is_main() -> bool:
    """Whether this process writes the run's shared files (TensorBoard, PNG, JSON)."""
    return jax.process_index() == 0


def gather(x) -> np.ndarray:
    """The whole of a (batch-sharded) array on every process; call it on all processes."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_tree(tree):
    """`gather` of every leaf of a pytree (e.g. parameters sharded across processes)."""
    return jax.tree.map(gather, tree)


def local_rows_of(x) -> np.ndarray:
    """This process's rows of a batch-sharded array, in the order its devices hold them (the
    inverse of `jax.make_array_from_process_local_data`); no communication."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    pieces = {}
    for shard in x.addressable_shards:
        pieces.setdefault(shard.index[0].start or 0, shard.data)  # replicas: keep one
    return np.concatenate([np.asarray(pieces[k]) for k in sorted(pieces)])


def _every_process(value: np.ndarray) -> np.ndarray:
    """[processes] of one scalar per process (a tiny collective; call on all processes)."""
    if jax.process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any."""
    return bool(_every_process(np.int32(flag)).any())


def min_over_processes(value: int) -> int:
    """The smallest of every process's `value` (e.g. the step all processes have finished)."""
    return int(_every_process(np.int64(value)).min())


def barrier(name: str) -> None:
    """Waits until every process reached `name` (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
