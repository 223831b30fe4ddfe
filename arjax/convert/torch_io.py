"""Safe loading of official PyTorch checkpoints and strict key/shape matching.

`torch.load(weights_only=True)` with argparse.Namespace allow-listed: LlamaGen/MAR training
files embed their argparse args, which the default safe unpickler refuses. safetensors files
are read without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickletools
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from arjax.errors import UserError
from arjax.sharding import path_str


class CheckpointMismatch(UserError, ValueError):
    """The file does not fit the model: names the missing/unexpected keys and wrong shapes."""


WRAPPERS = ("ema", "model", "module", "state_dict")  # DDP/EMA, DeepSpeed, Lightning dicts


def load_state_dict(path: str, subkeys: Sequence[str] = WRAPPERS) -> dict[str, np.ndarray]:
    """Reads a .pt/.pth/.ckpt (safe unpickler) or .safetensors file into float32 numpy arrays.

    The first of `subkeys` present in a dict checkpoint is taken (e.g. LlamaGen's "model",
    DeepSpeed's "module"; a dotted key walks nested dicts: VAR-DD's "trainer.ema_parameters");
    a dict without one must hold the tensors itself.
    """
    if not os.path.isfile(path):
        raise CheckpointMismatch(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading PyTorch checkpoints needs torch: "
                          "pip install 'arjax[convert]'") from e
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's advice (weights_only=False) would run the file's code
        code = _code_globals(path)
        if code:
            raise CheckpointMismatch(
                f"{path!r} contains pickled Python code objects ({', '.join(code[:5])}), so "
                "it is not a weights file; arjax never executes code from checkpoints. Re-save "
                "its state_dict with torch.save(model.state_dict(), ...) where you trust the "
                "file.") from None
        raise CheckpointMismatch(f"{path!r} is not a readable PyTorch checkpoint "
                                 f"({type(e).__name__})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointMismatch(f"{path!r} holds a {type(obj).__name__}, not a state_dict")
    top = obj
    for key in subkeys:
        inner = obj
        for part in key.split("."):
            inner = inner.get(part) if isinstance(inner, Mapping) else None
        if isinstance(inner, Mapping):
            obj = inner
            break
    tensors = {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}
    if not tensors:
        raise CheckpointMismatch(
            f"{path!r} holds no tensors under any of {list(subkeys)}; its top-level keys are "
            f"{sorted(map(str, top))[:20]}")
    return tensors


SAFE_GLOBALS = ("torch.", "collections.OrderedDict", "argparse.Namespace", "_codecs.encode")


def _code_globals(path: str) -> list[str]:
    """The classes/functions a checkpoint's pickle would import, outside torch's tensors and
    plain containers (read with pickletools: nothing is executed). Empty for unreadable
    files."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                data = z.read(name)
        else:
            with open(path, "rb") as f:
                data = f.read()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(arg)
            elif op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # not a pickle (or a truncated one): nothing to report
        return []
    return sorted({g for g in found if not g.startswith(SAFE_GLOBALS)})


Transform = Callable[[np.ndarray], np.ndarray]


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> flax kernel (in, out); also the inverse."""
    return w.T


def conv(w: np.ndarray) -> np.ndarray:
    """torch OIHW -> flax HWIO."""
    return w.transpose(2, 3, 1, 0)


def conv_inverse(w: np.ndarray) -> np.ndarray:
    return w.transpose(3, 2, 0, 1)


def identity(w: np.ndarray) -> np.ndarray:
    return w


def default_torch_name(path: str, shape: tuple[int, ...]) -> tuple[str, Transform]:
    """arjax path -> torch key for modules that mirror the torch module tree: `/` -> `.`,
    Dense/Conv `kernel` -> `weight` (transposed), GroupNorm `scale` / Embed `embedding` ->
    `weight`."""
    parts = path.split("/")
    leaf, transform = parts[-1], identity
    if leaf == "kernel":
        leaf, transform = "weight", (conv if len(shape) == 4 else linear)
    elif leaf in ("scale", "embedding"):
        leaf = "weight"
    return ".".join(parts[:-1] + [leaf]), transform


INVERSE = {linear: linear, conv: conv_inverse, identity: identity}


def abstract_params(module_fn) -> Any:
    """The params pytree (shapes only, nothing allocated) of the module `module_fn` builds:
    the target `convert` fills."""
    import jax

    from arjax.models import split

    return jax.eval_shape(lambda: split(module_fn())[1])


def convert(state_dict: Mapping[str, np.ndarray], abstract_params: Any,
            name_of: Callable[[str, tuple[int, ...]], tuple[str, Transform]],
            ignore: Sequence[str] = ()) -> Any:
    """Fills `abstract_params` (a pytree of shapes) from `state_dict`, strictly.

    `name_of(flax_path, shape) -> (torch_key, transform)`. Every flax leaf must be found with
    the right shape, and every torch key must be used (except buffers listed in `ignore`);
    otherwise one `CheckpointMismatch` lists all problems.
    """
    import jax

    problems, used = [], set()

    def one(path, leaf):
        key, transform = name_of(path_str(path), tuple(leaf.shape))
        used.add(key)
        if key not in state_dict:
            problems.append(f"missing key {key!r} (for {path_str(path)}, shape {leaf.shape})")
            return np.zeros(leaf.shape, np.float32)
        value = transform(np.asarray(state_dict[key], np.float32))
        if value.shape != tuple(leaf.shape):
            problems.append(f"shape mismatch at {key!r}: file {state_dict[key].shape} "
                            f"-> {value.shape}, model expects {tuple(leaf.shape)}")
        return value

    params = jax.tree_util.tree_map_with_path(one, abstract_params)
    unexpected = sorted(k for k in state_dict if k not in used and k not in ignore)
    problems += [f"unexpected key {k!r} {state_dict[k].shape}" for k in unexpected]
    if problems:
        raise CheckpointMismatch(
            f"checkpoint does not match the model config ({len(problems)} problems; check the "
            "model size/preset):\n  " + "\n  ".join(problems[:40]))
    return params


@dataclasses.dataclass(frozen=True)
class Format:
    """One official checkpoint layout, the single record every family's load and export use.

    `module(cfg)` builds the arjax module (only abstractly); `name_of` maps its parameter paths
    to official keys (+ transform); `buffers(cfg)` names the official buffers arjax recomputes
    (ignored on load) -- as a dict of arrays they are also written on export, so the official
    module loads the export strictly; `subkeys` are the wrappers a file may hold its weights
    under; `prepare` edits a loaded state_dict first (drop training keys, pick EMA shadows)."""

    module: Callable[[Any], Any]
    name_of: Callable[[str, tuple[int, ...]], tuple[str, Transform]] = default_torch_name
    buffers: Callable[[Any], Sequence[str] | Mapping[str, np.ndarray]] = lambda cfg: ()
    subkeys: tuple[str, ...] = WRAPPERS
    prepare: Callable[[dict], dict] = lambda state_dict: state_dict

    def from_torch(self, state_dict: Mapping[str, np.ndarray], cfg) -> Any:
        """Official state_dict -> arjax params for `cfg`, strictly (`convert`)."""
        from flax import nnx

        abstract = abstract_params(lambda: self.module(cfg, rngs=nnx.Rngs(0)))
        return convert(self.prepare(dict(state_dict)), abstract, self.name_of,
                       ignore=tuple(self.buffers(cfg)))

    def load(self, path: str, cfg) -> Any:
        """An official file -> arjax params for `cfg`."""
        return self.from_torch(load_state_dict(path, self.subkeys), cfg)

    def to_torch(self, params: Any, cfg=None) -> dict[str, np.ndarray]:
        """arjax params -> the official numpy state_dict (with array buffers, given `cfg`)."""
        buffers = self.buffers(cfg) if cfg is not None else {}
        return {**export(params, self.name_of), **(buffers if isinstance(buffers, Mapping)
                                                   else {})}


def export(params: Any, name_of: Callable[[str, tuple[int, ...]], tuple[str, Transform]],
           inverse: Mapping[Transform, Transform] = INVERSE) -> dict[str, np.ndarray]:
    """The inverse of `convert`: arjax params -> torch-named numpy state_dict."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key, transform = name_of(path_str(path), tuple(leaf.shape))
        out[key] = np.ascontiguousarray(inverse[transform](np.asarray(leaf)))
    return out
