"""XLA settings arjax applies when imported, because they make its CPU runs faster.

XLA reads `XLA_FLAGS` once, when the first computation creates a backend, so importing arjax
before that adds the flags below (a flag already in `XLA_FLAGS` is left as the user set it;
`ARJAX_XLA_DEFAULTS=0` adds none). They only change XLA:CPU's kernel choice, not results
beyond float rounding, and no other backend reads them.

- `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions; XLA:CPU then emits its own
  and Eigen's kernels). On a 2-core Xeon, XLA's YNNPACK path ran the VAE decoders' 3x3
  convolutions at about half the rate of its Eigen path (`benchmarks/conv_rates.py`), and
  VAR-d16's decoder, GPT-B's sampling and train step were all faster without it
  (docs/benchmarks.md, issue 14).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
    """Adds each default flag the user's `XLA_FLAGS` does not set (unless opted out)."""
    if environ.get("ARJAX_XLA_DEFAULTS", "1") == "0":
        return
    flags = environ.get("XLA_FLAGS", "")
    extra = [f"--{name}={value}" for name, value in DEFAULTS.items()
             if f"--{name}=" not in flags]
    if extra:
        environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
