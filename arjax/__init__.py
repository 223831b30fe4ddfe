"""arjax: autoregressive image generation in JAX/Flax."""

__version__ = "0.1.0"
