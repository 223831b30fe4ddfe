"""Fixed-grid ODE solvers for flow matching (t = 1 noise -> t = 0 data), as one `lax.scan`.

`time_grid` gives FlowAR's grids; `integrate` runs Euler (1 velocity call a step, order 1) or
Heun (2 calls, order 2) over a static grid, so a sampler with several scales compiles one scan
per scale. The grid is built in float64 on the host and the state is integrated in float32
(the official sampler integrates in float64; see docs/benchmarks.md for the difference).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SOLVERS = ("euler", "heun")
GRIDS = ("official", "uniform")


def time_grid(num_steps: int, kind: str = "official") -> np.ndarray:
    """float64 times from 1 to 0. `uniform`: num_steps equal steps. `official` (FlowAR's
    euler_sampler): uniform for exactly 50 steps, otherwise linspace(1, 0.3, n // 2) followed
    by linspace(0.25, 0, n // 2 + 1) -- coarse in the noise half, fine near the data, and one
    step fewer than asked for odd n (25 -> 24 steps)."""
    if kind == "uniform" or num_steps == 50:
        return np.linspace(1.0, 0.0, num_steps + 1)
    if kind != "official":
        raise ValueError(f"time grid must be one of {GRIDS}, got {kind!r}")
    return np.concatenate([np.linspace(1.0, 0.3, num_steps // 2),
                           np.linspace(0.25, 0.0, num_steps // 2 + 1)])


def integrate(velocity: Callable, x: jax.Array, grid: np.ndarray, solver: str = "euler",
              flags: np.ndarray | None = None) -> tuple[jax.Array, jax.Array]:
    """x at grid[0] -> (x at grid[-1], velocity calls made: int32, counted in the scan).
    `velocity(x, t, flag) -> dx/dt` with t a float32 scalar and `flag` a bool scalar per step
    (FlowAR's guidance interval), default all False."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    grid = np.asarray(grid, np.float64)
    steps = len(grid) - 1
    flags = np.zeros(steps, bool) if flags is None else np.asarray(flags, bool)
    xs = (jnp.asarray(grid[:-1], jnp.float32), jnp.asarray(grid[1:], jnp.float32),
          jnp.asarray(np.diff(grid), jnp.float32), jnp.asarray(flags))

    def step(carry, inputs):
        x, calls = carry
        t, t_next, dt, flag = inputs
        d = velocity(x, t, flag)
        calls += 1
        if solver == "heun":
            d = 0.5 * (d + velocity(x + dt * d, t_next, flag))
            calls += 1
        return ((x + dt * d).astype(x.dtype), calls), None

    return jax.lax.scan(step, (x, jnp.zeros((), jnp.int32)), xs)[0]
