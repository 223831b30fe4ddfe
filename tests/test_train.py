"""Sharded training: 1 vs 8 devices, exact resume, SIGTERM save, corrupt checkpoints."""

import json
import os
import signal

import jax
import numpy as np
import optax
import pytest
from conftest import tiny_gpt_config
from flax import nnx

from arjax import sharding
from arjax.checkpoint import CheckpointError
from arjax.data import Batches
from arjax.data.sources import ArraySource
from arjax.models import split
from arjax.models.raster_ar import RasterAR
from arjax.optim import OptimConfig, make_optimizer
from arjax.train import fit, init_state, make_train_step


def gpt_loss(model, batch, key):
    logits = model(batch["codes"], batch["label"], key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["codes"]).mean(), {}


class Codes(ArraySource):
    def get(self, idx, views):
        return {"codes": self.images[idx], "label": self.labels[idx]}


CFG = tiny_gpt_config(dropout=0.1, label_drop=0.2, dim=64)
DATA = Codes(np.random.default_rng(0).integers(0, 16, (96, 9)),
             np.random.default_rng(1).integers(0, 4, 96), 4)


def run(mesh, steps, workdir=None, rules=sharding.DEFAULT_RULES, on_log=None):
    module_fn = lambda: RasterAR(CFG, rngs=nnx.Rngs(0))
    graphdef = split(nnx.eval_shape(module_fn))[0]
    tx = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=2))
    return fit(name="gpt", init_fn=lambda: init_state(split(module_fn())[1], tx, 0),
               train_step=make_train_step(graphdef, gpt_loss, tx),
               make_batches=lambda s: Batches(DATA, 16, 7, mesh, s), steps=steps, mesh=mesh,
               workdir=workdir, rules=rules, log_every=1, ckpt_every=2, progress=False,
               on_log=on_log)


@pytest.mark.slow  # over ~30 s on 2 cores: make test-all
def test_same_loss_trajectory_on_1_and_8_devices(devices):
    one = sharding.make_mesh((("data", 1), ("fsdp", 1)), devices[:1])
    eight = sharding.make_mesh((("data", 4), ("fsdp", 2)), devices)
    rules = ((r".*", sharding.fsdp(min_size_mb=0.0)),)  # force real parameter sharding
    state1, h1 = run(one, 4)
    state8, h8 = run(eight, 4, rules=rules)
    sharded = [x for x in jax.tree.leaves(state8.params) if len(x.sharding.device_set) == 8
               and not x.sharding.is_fully_replicated]
    assert sharded, "fsdp rule should have sharded some parameters"
    np.testing.assert_allclose([h["train/loss"] for h in h1], [h["train/loss"] for h in h8],
                               rtol=2e-5)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # exact resume is also checked by the corrupt-checkpoint test: make test-all
def test_resume_gives_identical_params(tmp_path, devices):
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 1)), devices[:2])
    straight, _ = run(mesh, 4)
    run(mesh, 2, workdir=str(tmp_path))
    resumed, hist = run(mesh, 4, workdir=str(tmp_path))
    assert [h["step"] for h in hist] == [1, 2, 3, 4]  # the earlier run's rows come first
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # > 30 s on 2 cores: make test-all
def test_sigterm_saves_and_exits(tmp_path, devices):
    mesh = sharding.make_mesh((("data", 1),), devices[:1])

    def preempt(step, metrics):
        if step == 3:  # raised in this (the main) thread: its handler runs before step 4;
            signal.raise_signal(signal.SIGTERM)  # os.kill may reach a JAX thread, later

    with pytest.raises(SystemExit):
        run(mesh, 10, workdir=str(tmp_path), on_log=preempt)
    assert sorted(os.listdir(tmp_path / "gpt" / "ckpt"))[-1] == "3"
    _, hist = run(mesh, 5, workdir=str(tmp_path))
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5]


def corrupt(step_dir):
    for root, _, files in os.walk(step_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")


@pytest.mark.slow  # > 20 s on 2 cores: make test-all
def test_corrupt_only_checkpoint_gives_one_clear_error(tmp_path, devices):
    mesh = sharding.make_mesh((("data", 1),), devices[:1])
    run(mesh, 2, workdir=str(tmp_path))
    corrupt(tmp_path / "gpt" / "ckpt" / "2")
    with pytest.raises(CheckpointError, match="corrupt") as error:
        run(mesh, 4, workdir=str(tmp_path))
    assert "\n" not in str(error.value) and error.value.__cause__ is None


@pytest.mark.slow  # 37 s on 2 cores: make test-all
def test_corrupt_latest_checkpoint_resumes_from_newest_intact(tmp_path, devices, capfd):
    """A crash in a save leaves the newest step unreadable: resume from the previous one
    (keep-N kept it), say so once, and log no step twice."""
    mesh = sharding.make_mesh((("data", 1),), devices[:1])
    run(mesh, 4, workdir=str(tmp_path))  # checkpoints 2 and 4, rows 1..4
    corrupt(tmp_path / "gpt" / "ckpt" / "4")
    capfd.readouterr()
    _, hist = run(mesh, 6, workdir=str(tmp_path))
    err = capfd.readouterr().err
    assert "resuming from step 2" in err and err.count("Traceback") == 0
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]
    logged = [json.loads(line)["step"] for line in open(tmp_path / "gpt/tb/metrics.jsonl")]
    assert logged == [1, 2, 3, 4, 5, 6]  # rows 3 and 4 of the lost steps were replaced
    assert sorted(os.listdir(tmp_path / "gpt" / "ckpt")) == ["4", "4.corrupt", "6"]


def test_batches_are_deterministic_resumable_and_mesh_independent(devices):
    one = sharding.make_mesh((("data", 1),), devices[:1])
    eight = sharding.make_mesh((("data", 8),), devices)
    a = Batches(DATA, 16, 3, one)
    seen = [np.asarray(next(a)["codes"]) for _ in range(8)]  # crosses an epoch (6 steps)
    b = Batches(DATA, 16, 3, eight, start_step=5)
    np.testing.assert_array_equal(np.asarray(next(b)["codes"]), seen[5])
    epoch = np.concatenate([Batches(DATA, 16, 3, one).indices(s) for s in range(6)])
    assert sorted(epoch) == list(range(96))


def test_batch_not_divisible_by_mesh_is_rejected(devices):
    from arjax.config import ConfigError

    with pytest.raises(ConfigError, match="multiple of the 8"):
        Batches(DATA, 12, 0, sharding.make_mesh((("data", 8),), devices))
