"""Gaussian diffusion over per-token vectors (MAR's Diffusion Loss; DiT/ADM/IDDPM maths).

Epsilon prediction with a learned-range variance: the network returns [eps ; v] and
log sigma^2 = f log beta_t + (1 - f) log beta~_t with f = (v + 1) / 2. Training is
MSE(eps) + the variational bound (bits) on a frozen mean, t uniform over the full process;
sampling is the ancestral chain of a respaced process whose network calls use the original
timestep indices, with temperature tau scaling the noise. Tables are computed in float64
NumPy as upstream and cast to float32 when indexed (they are constants of the jitted code).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Net = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [N, C], t [N] int) -> [N, 2C]


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM's cosine schedule: alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)."""
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta)
                     for i in range(steps)], np.float64)


def linear_betas(steps: int) -> np.ndarray:
    """DDPM's linear schedule, scaled to `steps` as upstream (1e-4 to 0.02 at 1000 steps)."""
    scale = 1000 / steps
    return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)


# Upstream's `get_named_beta_schedule`. MAR trains with "cosine"; "linear" ends at
# alpha_bar = 4e-5 instead of 2e-9, so the first sampling step multiplies the denoiser's eps
# error by ~150 instead of ~2e4 (what a briefly trained head can afford: the digits preset).
SCHEDULES = {"cosine": cosine_betas, "linear": linear_betas}


def space_timesteps(steps: int, count: int) -> list[int]:
    """The `count` kept timesteps of a `steps`-step process (one section: fractional stride,
    Python's round, as upstream's `space_timesteps(steps, [count])`)."""
    if count > steps:
        raise ValueError(f"cannot take {count} sampling steps from a {steps}-step process")
    stride = 1 if count <= 1 else (steps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """One (possibly respaced) process: `timesteps[i]` is the original index the network sees
    at step i of this process."""
    betas: tuple[float, ...]
    timesteps: tuple[int, ...]

    @classmethod
    def make(cls, schedule: str = "cosine", steps: int = 1000,
             sampling_steps: int | None = None) -> Diffusion:
        """The training process of a named schedule (`sampling_steps` None) or its
        respacing to that many steps."""
        betas = SCHEDULES[schedule](steps)
        if sampling_steps is None or sampling_steps == steps:
            return cls(tuple(betas), tuple(range(steps)))
        kept = space_timesteps(steps, sampling_steps)
        alpha_bar, last, new = np.cumprod(1.0 - betas), 1.0, []
        for i in kept:
            new.append(1 - alpha_bar[i] / last)
            last = alpha_bar[i]
        return cls(tuple(new), tuple(kept))

    @property
    def steps(self) -> int:
        return len(self.betas)

    @functools.cached_property
    def tables(self) -> dict[str, np.ndarray]:
        """Float64 per-step quantities (as upstream), cast to float32 on use."""
        betas = np.asarray(self.betas, np.float64)
        alpha_bar = np.cumprod(1.0 - betas)
        prev = np.append(1.0, alpha_bar[:-1])
        post_var = betas * (1.0 - prev) / (1.0 - alpha_bar)
        return {
            "sqrt_alpha_bar": np.sqrt(alpha_bar),
            "sqrt_one_minus_alpha_bar": np.sqrt(1.0 - alpha_bar),
            "sqrt_recip_alpha_bar": np.sqrt(1.0 / alpha_bar),
            "sqrt_recipm1_alpha_bar": np.sqrt(1.0 / alpha_bar - 1),
            "post_log_var": np.log(np.append(post_var[1], post_var[1:])),
            "post_coef1": betas * np.sqrt(prev) / (1.0 - alpha_bar),
            "post_coef2": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alpha_bar),
            "log_betas": np.log(betas),
            "timesteps": np.asarray(self.timesteps, np.int32),
        }

    def _at(self, name: str, i: jax.Array) -> jax.Array:
        """Table `name` at step indices i [N] -> [N, 1] float32."""
        table = self.tables[name]
        return jnp.asarray(table.astype(np.int32 if name == "timesteps" else np.float32))[i][
            :, None]

    def q_sample(self, x0, i, noise):
        return self._at("sqrt_alpha_bar", i) * x0 + self._at("sqrt_one_minus_alpha_bar", i) * noise

    def posterior_mean(self, x0, x_t, i):
        return self._at("post_coef1", i) * x0 + self._at("post_coef2", i) * x_t

    def mean_log_var(self, out, x_t, i):
        """Network output [eps ; v] at step i -> (mean, log variance) of p(x_{i-1} | x_i)."""
        eps, v = jnp.split(out.astype(jnp.float32), 2, axis=-1)
        frac = (v + 1) / 2
        log_var = frac * self._at("log_betas", i) + (1 - frac) * self._at("post_log_var", i)
        x0 = self._at("sqrt_recip_alpha_bar", i) * x_t - self._at("sqrt_recipm1_alpha_bar", i) * eps
        return self.posterior_mean(x0, x_t, i), log_var

    def loss(self, net: Net, x0: jax.Array, key: jax.Array) -> jax.Array:
        """Per-row MSE(eps) + VLB in bits on a frozen mean; x0 [N, C], t uniform per row."""
        k_t, k_eps = jax.random.split(key)
        i = jax.random.randint(k_t, (x0.shape[0],), 0, self.steps)
        return self.loss_at(net, x0, i, jax.random.normal(k_eps, x0.shape))

    def loss_at(self, net: Net, x0: jax.Array, i: jax.Array, noise: jax.Array) -> jax.Array:
        """`loss` at the given steps i [N] and noise [N, C] (upstream `training_losses`)."""
        x_t = self.q_sample(x0, i, noise)
        out = net(x_t, self._at("timesteps", i)[:, 0]).astype(jnp.float32)
        eps, v = jnp.split(out, 2, axis=-1)
        mean, log_var = self.mean_log_var(
            jnp.concatenate([jax.lax.stop_gradient(eps), v], -1), x_t, i)
        true_mean = self.posterior_mean(x0, x_t, i)
        kl = normal_kl(true_mean, self._at("post_log_var", i), mean, log_var)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        vb = jnp.where(i == 0, nll.mean(-1), kl.mean(-1)) / np.log(2.0)
        return jnp.mean((noise - eps) ** 2, axis=-1) + vb

    def sample(self, net: Net, x: jax.Array, noise: jax.Array,
               temperature: float | jax.Array = 1.0) -> jax.Array:
        """The ancestral chain from x (step T-1) to step 0; `noise` [T, N, C]: step i draws
        noise[i] (noise[0] is unused: the last step adds none, as upstream)."""
        return self.chain(net, x, noise, temperature)[0]

    def chain(self, net: Net, x: jax.Array, noise: jax.Array,
              temperature: float | jax.Array = 1.0, final_noise: bool = False,
              prepare: Callable | None = None, chunk: int = 1):
        """`sample`, and the last step's Gaussian: -> (x_0, mean, std (temperature
        included), sum over the earlier steps of log sigma (CSpD's trajectory term)), each
        [N, C]. `final_noise`: the last step draws noise[0] too, so x_0 ~ N(mean, std^2)
        given the earlier noises (what an exact speculative ratio needs). `prepare`: original
        timesteps [chunk] -> the network's per-step inputs [chunk, ...] that do not depend on
        x, computed for `chunk` steps at a time (`chunk` divides the steps); `net` is then
        called as net(x, that step's inputs)."""

        def step(carry, xs):
            (x, log_std_sum), (i, given) = carry, xs
            idx = jnp.full((x.shape[0],), i)
            out = net(x, self._at("timesteps", idx)[:, 0] if prepare is None else given)
            mean, log_var = self.mean_log_var(out, x, idx)
            std = jnp.exp(0.5 * log_var) * temperature
            last = i == 0
            scale = std if final_noise else jnp.where(last, 0.0, std)
            nxt = mean + scale * noise[i]
            return (nxt, log_std_sum + jnp.where(last, 0.0, 0.5 * log_var)), (mean, std)

        steps, init = jnp.arange(self.steps - 1, -1, -1), (x, jnp.zeros_like(x))
        if prepare is None:
            (x, log_std_sum), (means, stds) = jax.lax.scan(step, init, (steps, None))
            return x, means[-1], stds[-1], log_std_sum
        if self.steps % chunk:
            raise ValueError(f"chunk={chunk} must divide the {self.steps} steps")
        timesteps = jnp.asarray(self.tables["timesteps"])

        def run(carry, ids):
            return jax.lax.scan(step, carry, (ids, prepare(timesteps[ids])))

        (x, log_std_sum), (means, stds) = jax.lax.scan(run, init, steps.reshape(-1, chunk))
        return x, means[-1, -1], stds[-1, -1], log_std_sum


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """ADM's decoder likelihood (256 bins over [-1, 1]), kept as upstream for the t = 0 term."""
    centered, inv = x - means, jnp.exp(-log_scales)
    cdf_plus = _approx_cdf(inv * (centered + 1.0 / 255.0))
    cdf_min = _approx_cdf(inv * (centered - 1.0 / 255.0))
    log_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_plus, jnp.where(x > 0.999, log_one_minus, log_delta))
