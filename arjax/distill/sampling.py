"""DD1 sampling: one or a few student passes from Gaussian noise, or a teacher in between.

Few-step (`few_step`, the released `sample.py` / `eval_fewstep.py`): the noise eps [B, L, C]
is drawn once; for each k in `steps` (units: tokens for LlamaGen, scales for VAR; [0] is one
step, [0, t2] two) the student reads X_k = (the current vectors before unit k, eps after: the
*same* noise again) and returns every position; data positions are passed through (their
tokens are the nearest codes), positions before unit `split` take the logits head's argmax
code and the rest the continuous head's vector, which the decoder consumes unsnapped.

Teacher-involved (`teacher_involved`): one student step, the teacher re-samples units s..t2-1
after the first s (categorically, with its own sampler and guidance: tokens for LlamaGen,
scales for VAR), then one student step at k = t2 finishes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from arjax.config import check
from arjax.models import bind
from arjax.nn.layers import nearest_code


def token_starts(student) -> np.ndarray:
    """Token index where unit k = 0..U begins (U units: the sequence's tokens or scales)."""
    return student.unit_starts - 1


def check_steps(units: int, steps: tuple[int, ...], split: int, prefix: str = "DD ") -> None:
    """Trajectory points start at 0 and increase below the `units`; the split lies in
    [0, units]. `prefix` names the fields in the message ("sample." in an experiment)."""
    check(len(steps) >= 1 and steps[0] == 0 and all(a < b for a, b in zip(steps, steps[1:]))
          and steps[-1] < units,
          f"{prefix}steps must start at 0 and increase below {units} units, got {steps}")
    check(0 <= split <= units, f"{prefix}split must be in [0, {units}], got {split}")


def units_of(student) -> int:
    return len(student.unit_starts) - 1


def student_step(student, labels, noise, vectors, tokens, k: int, split: int, codebook):
    """One pass at unit k: -> (vectors [B, L, C], tokens [B, L])."""
    starts, length = token_starts(student), noise.shape[1]
    data = jnp.arange(length) < starts[k]
    x = jnp.where(data[None, :, None], vectors, noise)
    cont, logits = student(x, labels, jnp.full(labels.shape, k, jnp.int32))
    tokens = jnp.where(data, nearest_code(x, codebook), jnp.argmax(logits, -1)).astype(
        jnp.int32)
    head = (jnp.arange(length) < starts[split])[None, :, None]
    vectors = jnp.where(head, codebook[tokens], jnp.where(data[None, :, None], x, cont))
    return vectors, tokens


def few_step(graphdef, params, labels: jax.Array, noise: jax.Array, codebook: jax.Array,
             steps: tuple[int, ...] = (0,), split: int = 0):
    """-> (vectors [B, L, C] for the decoder, tokens int32 [B, L], student passes)."""
    student = bind(graphdef, params)
    check_steps(units_of(student), steps, split)
    vectors, tokens = noise, jnp.zeros(noise.shape[:2], jnp.int32)
    for k in steps:
        vectors, tokens = student_step(student, labels, noise, vectors, tokens, k, split,
                                       codebook)
    return vectors, tokens, jnp.int32(len(steps))


def teacher_involved(graphdef, params, teacher, labels: jax.Array, noise: jax.Array,
                     codebook: jax.Array, t2: int, start: int, split: int):
    """DD1 with the teacher re-sampling units start..t2-1: `teacher(prefix, start, stop)`
    (prefix = the student's first `start` units of tokens, snapped, or None) -> (its token
    ids [B, L] with units < stop made, its counted passes). -> (vectors, tokens,
    {"student_passes", "teacher_passes"})."""
    student = bind(graphdef, params)
    check_steps(units_of(student), (0, t2), split)
    check(0 <= start < t2, f"teacher start must be in [0, t2={t2}), got {start}")
    prefix, student_passes = None, 1
    if start:
        first, _ = student_step(student, labels, noise, noise,
                                jnp.zeros(noise.shape[:2], jnp.int32), 0, split, codebook)
        prefix = nearest_code(first[:, :token_starts(student)[start]], codebook)  # snapped
        student_passes = 2
    sampled, teacher_passes = teacher(prefix, start, t2)
    vectors, tokens = student_step(student, labels, noise, codebook[sampled], sampled, t2,
                                   split, codebook)
    return vectors, tokens, {"student_passes": jnp.int32(student_passes),
                             "teacher_passes": teacher_passes}
