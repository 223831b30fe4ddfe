"""One process of the multi-process tests (tests/test_multiprocess.py): trains a tiny GPT
stage with the experiments' own `train_stage` on digits-like codes and writes its losses and
(gathered) final parameters to <out>/process-<i>.npz.

    python tests/multiprocess_worker.py OUT WORKDIR STEPS [--sleep S] [--die-at N]
    python tests/multiprocess_worker.py OUT CACHE 0 --extract   # a code cache instead

The process layout comes from the environment (`arjax.distributed.initialize`):
ARJAX_DISTRIBUTED=explicit with ARJAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID and
JAX_NUM_CPU_DEVICES devices per process, or one process when unset.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arjax import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from arjax import sharding  # noqa: E402
from arjax.data.sources import ArraySource  # noqa: E402
from arjax.experiment import pipeline  # noqa: E402
from arjax.models.raster_ar import RasterAR, RasterARConfig  # noqa: E402
from arjax.optim import OptimConfig  # noqa: E402


class Codes(ArraySource):
    def get(self, idx, views):
        return {"codes": self.images[idx], "label": self.labels[idx]}


def loss(model, batch, key):
    logits = model(batch["codes"], batch["label"], key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["codes"]).mean(), {}


def extract(path):
    """Every view of 37 digits-like images (x and its mirror), encoded over all devices."""
    import jax.numpy as jnp

    from arjax.data import cache

    rng = np.random.default_rng(2)
    source = ArraySource(rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8),
                         np.arange(37) % 5, 5, views="center_flip")
    encode = lambda x: x.astype(jnp.int32).reshape(x.shape[0], -1, 3).sum(1)
    cache.extract(encode, source, path, "fp", 8, sharding.make_mesh((("data", -1),)),
                  np.uint16, shard_rows=6, progress=False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("workdir")
    parser.add_argument("steps", type=int)
    parser.add_argument("--sleep", type=float, default=0.0)  # per step, to be signalled
    parser.add_argument("--die-at", type=int, default=0)  # hard kill every process here
    parser.add_argument("--extract", action="store_true")
    args = parser.parse_args()
    if args.extract:
        return extract(args.workdir)
    cfg = RasterARConfig(vocab_size=16, grid=3, num_classes=4, dim=32, depth=2, heads=2,
                         multiple_of=8, dropout=0.1, label_drop=0.2)
    data = Codes(np.random.default_rng(0).integers(0, 16, (96, 9)),
                 np.random.default_rng(1).integers(0, 4, 96), 4)
    mesh = sharding.make_mesh((("data", -1), ("fsdp", 2)))
    stage = pipeline.StageConfig(steps=args.steps, batch_size=16, log_every=1, ckpt_every=3,
                        optim=OptimConfig(lr=3e-3, warmup_steps=2), ema_decay=0.9)
    rules = ((r".*", sharding.fsdp(min_size_mb=0.0)),)  # weights really split across hosts

    def on_step(step, metrics):
        with open(os.path.join(args.out, f"step-{jax.process_index()}"), "w") as f:
            f.write(str(step))
        if step == args.die_at:
            os._exit(9)  # a crash: no save, no goodbye
        time.sleep(args.sleep)

    fit = pipeline.fit  # the stage's own loop, with a hook after every logged step
    pipeline.fit = lambda **kw: fit(**kw, on_log=on_step)
    _, weights, history = pipeline.train_stage(
        "gpt", lambda: RasterAR(cfg, rngs=nnx.Rngs(0)), loss, stage, data, 7, mesh,
        args.workdir, progress=False, rules=rules)
    leaves = {f"arr_{i}": distributed.gather(x) for i, x in enumerate(jax.tree.leaves(weights))}
    np.savez(os.path.join(args.out, f"process-{jax.process_index()}.npz"),
             losses=[h["train/loss"] for h in history if "train/loss" in h],
             sampled=sample_labels(mesh), **leaves)


def sample_labels(mesh):
    """The generator contract across processes: labels in, per-sample arrays gathered out."""
    import jax.numpy as jnp

    from arjax.sampling.generator import Samples, make_generator

    fn = lambda p, f, key, labels: Samples(
        images=jnp.zeros((labels.shape[0], 2, 2, 3)) + labels[:, None, None, None] / 10,
        aux={"label": labels}, stats={"n": jnp.float32(labels.shape[0])})
    out = make_generator(fn, mesh)(None, np.arange(16, dtype=np.int32) % 5, jax.random.key(0))
    assert out.stats["n"] == 16 and out.images.shape == (16, 2, 2, 3)
    return out.aux["label"]


if __name__ == "__main__":
    main()
