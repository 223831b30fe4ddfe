"""Official MAR checkpoints (`mar_{base,large,huge}/checkpoint-last.pth`) <-> arjax.

The files are training checkpoints: a dict with `model`, `model_ema` (the EMA weights as a
state_dict: what the official evaluation samples with, taken here first), `optimizer`,
`epoch`, `scaler` and `args` (an argparse.Namespace, allow-listed by the safe loader: no other
object is unpickled). arjax module paths mirror the state_dict except: the diffusion MLP is
`diffloss.net.*` upstream, its `nn.Sequential`s are `mlp.{0,2}` (`mlp_0`, `mlp_2` here) and
`adaLN_modulation.1` (SiLU first). There are no buffers (the diffusion tables are NumPy).
"""

from __future__ import annotations

import re

from arjax.convert import torch_io
from arjax.models.mar import MAR, MARConfig

_RENAMES = ((r"^diffloss\.", "diffloss.net."),
            (r"\.mlp_(\d)\.", r".mlp.\1."),
            (r"adaLN_modulation\.", "adaLN_modulation.1."))


def mar_torch_name(path: str, shape: tuple[int, ...]) -> tuple[str, torch_io.Transform]:
    key, transform = torch_io.default_torch_name(path, shape)
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key, transform


MAR_FORMAT = torch_io.Format(MAR, mar_torch_name, subkeys=("model_ema", "ema", "model"))


def mar_params_from_torch(state_dict, cfg: MARConfig):
    return MAR_FORMAT.from_torch(state_dict, cfg)


def load_mar(path: str, cfg: MARConfig):
    """An official checkpoint-last.pth (its `model_ema`) or a plain state_dict -> params."""
    return MAR_FORMAT.load(path, cfg)


def mar_to_torch(params, cfg: MARConfig | None = None) -> dict:
    return MAR_FORMAT.to_torch(params, cfg)
