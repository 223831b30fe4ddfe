"""The one training loop every experiment uses.

An experiment supplies pure functions: `init() -> TrainState` and
`train_step(state, batch) -> (state, metrics)`. `fit` owns the rest: the state built
abstractly and then either restored from the latest checkpoint (step, params, EMA, optimizer,
RNG and data position) or initialised, directly in its sharded layout (startup peak = one
state); jit with donation and explicit shardings, periodic checkpoints, SIGTERM save,
TensorBoard scalars, a NaN guard and a progress bar.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.struct
import jax
import numpy as np
from tqdm.auto import tqdm

from arjax import distributed, sharding
from arjax.checkpoint import Checkpointer, StopSignal
from arjax.writer import MetricWriter


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    key: jax.Array  # raw uint32 key data; per-step keys are fold_in(key, step)
    ema: Any = None  # float32 moving average of params (None: no EMA)

    def step_key(self) -> jax.Array:
        """The PRNG key of the current step: derived, never carried, so resume is exact."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.key), self.step)


class NonFiniteError(FloatingPointError):
    pass


STOP_CHECK_EVERY = 10  # steps between the processes' stop agreements (one tiny all-gather)


def stop_agreed(requested: bool, done: int) -> bool:
    """Whether every process stops after step `done`: the local SIGTERM flag on one process;
    on several, the OR over processes, polled every `STOP_CHECK_EVERY` steps."""
    if jax.process_count() == 1:
        return requested
    return done % STOP_CHECK_EVERY == 0 and distributed.any_process(requested)


def restore_or_init(init_fn: Callable[[], TrainState], mesh, rules: Sequence[sharding.Rule],
                    ckpt: Checkpointer | None) -> tuple[TrainState, Any]:
    """The newest intact checkpoint of `ckpt`, else `init_fn()`, created straight into the
    shardings the `rules` give (scalars replicated): the shapes come from `jax.eval_shape`,
    so a resumed run never materialises (or compiles) a random init. Returns (state,
    shardings)."""
    target, shardings = sharding.abstract_sharded(init_fn, mesh, rules)
    if ckpt is not None and ckpt.latest_step() is not None:
        return ckpt.restore_newest_intact(target), shardings
    return jax.jit(init_fn, out_shardings=shardings)(), shardings


def fit(*, name: str, init_fn: Callable[[], TrainState],
        train_step: Callable[[TrainState, Any], tuple[TrainState, dict]],
        make_batches: Callable[[int], Iterator[Any]], steps: int, mesh,
        workdir: str | None, rules: Sequence[sharding.Rule] = sharding.DEFAULT_RULES,
        log_every: int = 50, ckpt_every: int = 500, keep: int = 2,
        on_log: Callable[[int, dict], None] | None = None,
        evaluate: Callable[[TrainState], dict] | None = None, eval_every: int = 0,
        progress: bool = True, frozen: Any = None) -> tuple[TrainState, list[dict]]:
    """Trains `steps` steps (resuming if `workdir/name/ckpt` has a checkpoint).

    Args:
      make_batches: start_step -> iterator of global batches from that step on.
      evaluate: state -> {name: value}, run every `eval_every` steps and at the end; values
        are logged as `eval/<name>` (TensorBoard, jsonl) and kept in the history.
      frozen: device arrays every step reads but does not train (a distillation teacher):
        `train_step(state, batch, frozen)`, passed as jit arguments, never baked in.
    Returns:
      the final state and the logged metrics (one dict per log step, earlier runs' included).
    """
    ckpt = writer = None
    history: list[dict] = []
    if workdir is not None:
        ckpt = Checkpointer(f"{workdir}/{name}/ckpt", keep=keep)
    state, shardings = restore_or_init(init_fn, mesh, rules, ckpt)
    if workdir is not None:
        writer = MetricWriter(f"{workdir}/{name}/tb", resume_step=int(state.step))
        history = list(writer.history)  # an earlier run's rows: summaries survive a rerun
    start = int(state.step)
    step_fn = jax.jit(train_step, donate_argnums=0,
                      out_shardings=(shardings, sharding.replicated(mesh)))
    batches = make_batches(start)
    extra = () if frozen is None else (frozen,)
    bar = tqdm(total=steps, initial=start, desc=name, dynamic_ncols=True,
               disable=not progress or not distributed.is_main())
    say = bar.write if distributed.is_main() else (lambda message: None)
    t0, last_step, stopping = time.perf_counter(), start, False
    closing = contextlib.closing if hasattr(batches, "close") else contextlib.nullcontext
    with StopSignal() as stop, closing(batches):  # closing stops the loader's workers
        for step in range(start, steps):
            with jax.set_mesh(mesh):  # the models' activation constraints see the mesh
                state, metrics = step_fn(state, next(batches), *extra)
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
                say(f"{name} step {done}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in results.items()))
            bar.update(1)
            stopping = stop_agreed(stop.requested, done)
            if ckpt and (done % ckpt_every == 0 or done == steps or stopping):
                ckpt.save(done, state, force=True)
            if stopping:
                say(f"{name}: SIGTERM received, saved step {done}; exiting")
                break
    bar.close()
    if ckpt:
        ckpt.wait()
        ckpt.close()
    if writer:
        writer.close()
    if stopping:
        raise SystemExit(143)
    return state, history


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay used after optimizer step `step` (0-based): constant (FlowAR, MAR,
    LlamaGen's optional EMA), or with `warmup` min(decay, (1 + t) / (10 + t)), so an early
    average is not dominated by the random init."""
    import jax.numpy as jnp

    if not warmup:
        return jnp.float32(decay)
    t = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1 + t) / (10 + t))


def ema_update(ema, params, decay: jax.Array):
    """ema <- decay * ema + (1 - decay) * params, in the average's dtype (float32)."""
    return jax.tree.map(lambda e, p: e + (1 - decay) * (p.astype(e.dtype) - e), ema, params)


def make_train_step(graphdef, loss_fn: Callable, tx, ema_decay: float = 0.0,
                    ema_warmup: bool = False) -> Callable:
    """Builds a pure `train_step(state, batch)` from `loss_fn(model, batch, key) -> (loss, aux)`.

    Reports the loss, the scalars in `aux`, and the l2 norms of grads, params and updates.
    A step given `frozen` weights (`fit(frozen=...)`) calls `loss_fn(model, batch, key,
    frozen)`.
    With an EMA in the state it is updated after every optimizer step,
    ema <- d * ema + (1 - d) * params in float32 (`ema_decay_at`).
    """
    import optax

    from arjax.models import bind

    def train_step(state: TrainState, batch, frozen=None) -> tuple[TrainState, dict]:
        key = state.step_key()
        extra = () if frozen is None else (frozen,)

        def objective(params):
            return loss_fn(bind(graphdef, params), batch, key, *extra)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = ema_update(ema, params, ema_decay_at(state.step, ema_decay, ema_warmup))
        metrics = {"train/loss": loss, **{f"train/{k}": v for k, v in aux.items()},
                   "train/l2_grads": optax.global_norm(grads),
                   "train/l2_params": optax.global_norm(params),
                   "train/l2_updates": optax.global_norm(updates)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             ema=ema), metrics

    return train_step


def init_state(params, tx, seed: int, ema: bool | str = False) -> TrainState:
    """Step 0 state (call it inside `fit`'s `init_fn`, so it is built sharded). With `ema`
    the average starts as a float32 copy of the weights (as FlowAR/MAR/LlamaGen do).

    Networks trained together with their own optimizers (DD2's generator and guide): `params`
    and `tx` are dicts of the same names, each optimizer's state is kept under its name, and
    `ema` may name the one network that is averaged."""
    import jax.numpy as jnp

    opt_state = ({name: t.init(params[name]) for name, t in tx.items()}
                 if isinstance(tx, dict) else tx.init(params))
    averaged = params[ema] if isinstance(ema, str) else params
    average = jax.tree.map(lambda p: p.astype(jnp.float32), averaged) if ema else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      key=jax.random.key_data(jax.random.key(seed)), ema=average)
