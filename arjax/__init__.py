"""arjax: autoregressive image generation in JAX/Flax."""

from arjax import xla_defaults as _xla_defaults

__version__ = "0.1.0"

_xla_defaults.apply()
