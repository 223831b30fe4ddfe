"""The one training loop every experiment uses.

An experiment supplies pure functions: `init() -> TrainState` and
`train_step(state, batch) -> (state, metrics)`. `fit` owns the rest: sharded creation,
jit with donation and explicit shardings, resume from the latest checkpoint (step, params,
optimizer, RNG and data position), periodic checkpoints, SIGTERM save, TensorBoard scalars,
a NaN guard and a progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.struct
import jax
import numpy as np
from tqdm.auto import tqdm

from arjax import sharding
from arjax.checkpoint import Checkpointer, StopSignal, abstract_like
from arjax.writer import MetricWriter


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    key: jax.Array  # raw uint32 key data; per-step keys are fold_in(key, step)

    def step_key(self) -> jax.Array:
        """The PRNG key of the current step: derived, never carried, so resume is exact."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.key), self.step)


class NonFiniteError(FloatingPointError):
    pass


def create_state(init_fn: Callable[[], TrainState], mesh, rules: Sequence[sharding.Rule]
                 ) -> tuple[TrainState, Any]:
    """Materialises the state sharded; the step and key are replicated."""
    return sharding.init_sharded(init_fn, mesh, rules)


def fit(*, name: str, init_fn: Callable[[], TrainState],
        train_step: Callable[[TrainState, Any], tuple[TrainState, dict]],
        make_batches: Callable[[int], Iterator[Any]], steps: int, mesh,
        workdir: str | None, rules: Sequence[sharding.Rule] = sharding.DEFAULT_RULES,
        log_every: int = 50, ckpt_every: int = 500, keep: int = 2,
        on_log: Callable[[int, dict], None] | None = None,
        evaluate: Callable[[TrainState], dict] | None = None, eval_every: int = 0,
        progress: bool = True) -> tuple[TrainState, list[dict]]:
    """Trains `steps` steps (resuming if `workdir/name/ckpt` has a checkpoint).

    Args:
      make_batches: start_step -> iterator of global batches from that step on.
      evaluate: state -> {name: value}, run every `eval_every` steps and at the end; values
        are logged as `eval/<name>` (TensorBoard, jsonl) and kept in the history.
    Returns:
      the final state and the logged metrics (one dict per log step, earlier runs' included).
    """
    state, shardings = create_state(init_fn, mesh, rules)
    ckpt = writer = None
    history: list[dict] = []
    if workdir is not None:
        ckpt = Checkpointer(f"{workdir}/{name}/ckpt", keep=keep)
        if ckpt.latest_step() is not None:
            state = ckpt.restore_newest_intact(abstract_like(state))
        writer = MetricWriter(f"{workdir}/{name}/tb", resume_step=int(state.step))
        history = list(writer.history)  # an earlier run's rows: summaries survive a rerun
    start = int(state.step)
    step_fn = jax.jit(train_step, donate_argnums=0,
                      out_shardings=(shardings, sharding.replicated(mesh)))
    batches = make_batches(start)
    bar = tqdm(total=steps, initial=start, desc=name, disable=not progress, dynamic_ncols=True)
    t0, last_step = time.perf_counter(), start
    with StopSignal() as stop:
        for step in range(start, steps):
            state, metrics = step_fn(state, next(batches))
            done = step + 1
            if done % log_every == 0 or done == steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(np.isfinite(v) for v in metrics.values()):
                    raise NonFiniteError(f"{name}: non-finite metrics at step {done}: {metrics}")
                dt = time.perf_counter() - t0
                metrics["time/steps_per_s"] = (done - last_step) / max(dt, 1e-9)
                t0, last_step = time.perf_counter(), done
                history.append({"step": done, **metrics})
                if writer:
                    writer.scalars(done, metrics)
                if on_log:
                    on_log(done, metrics)
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()
                                 if k.startswith("train/")})
            if evaluate and (done == steps or (eval_every and done % eval_every == 0)):
                results = {f"eval/{k}": float(v) for k, v in evaluate(state).items()}
                history.append({"step": done, **results})
                if writer:
                    writer.scalars(done, results)
                bar.write(f"{name} step {done}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in results.items()))
            bar.update(1)
            if ckpt and (done % ckpt_every == 0 or done == steps or stop.requested):
                ckpt.save(done, state, force=True)
            if stop.requested:
                bar.write(f"{name}: SIGTERM received, saved step {done}; exiting")
                break
    bar.close()
    if ckpt:
        ckpt.wait()
        ckpt.close()
    if writer:
        writer.close()
    if stop.requested:
        raise SystemExit(143)
    return state, history


def make_train_step(graphdef, loss_fn: Callable, tx) -> Callable:
    """Builds a pure `train_step(state, batch)` from `loss_fn(model, batch, key) -> (loss, aux)`.

    Reports the loss, the scalars in `aux`, and the l2 norms of grads, params and updates.
    """
    import optax

    from arjax.models import bind

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        key = state.step_key()

        def objective(params):
            return loss_fn(bind(graphdef, params), batch, key)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"train/loss": loss, **{f"train/{k}": v for k, v in aux.items()},
                   "train/l2_grads": optax.global_norm(grads),
                   "train/l2_params": optax.global_norm(params),
                   "train/l2_updates": optax.global_norm(updates)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def init_state(params, tx, seed: int) -> TrainState:
    """Step 0 state (call inside `create_state`'s init function so it is built sharded)."""
    import jax.numpy as jnp

    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      key=jax.random.key_data(jax.random.key(seed)))
