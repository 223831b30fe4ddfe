"""Imports the official FlowAR code (a checkout of OliverRen/FlowAR; LTH14/mar alike) on a
CPU-only machine and loads arjax parameters into it through the converters, for the parity and
sampling benchmarks. Two shims, both confined to this process: timm imports torchvision at
import time (stubbed with empty modules; no torchvision code runs on these paths), and both
repositories call `.cuda()` (made a no-op). Needs `pip install --no-deps timm einops`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _Dummy(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def getattr_(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Dummy(attr, (), {})
        module.__getattr__ = getattr_
        return module

    def exec_module(self, module):
        pass


def import_official(path: str, names=("models.flowar", "models.vae")):
    """-> the modules `names` of the checkout at `path` (FlowAR's, or MAR's: the same
    layout)."""
    import torch

    if "torchvision" not in sys.modules:
        sys.meta_path.insert(0, _TorchvisionStub())
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, path)
    return tuple(importlib.import_module(name) for name in names)


def load_into(module, state: dict) -> None:
    """Strict load of a converter export (numpy) into an official module."""
    import torch

    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()},
                           strict=True)


def official_flowar(path: str, size: str, params, cfg):
    """The official FlowAR-{S,L,H} (eval mode, dropout 0) holding arjax `params`."""
    from arjax.convert.flowar import flowar_to_torch

    flowar, _ = import_official(path)
    build = {"S": flowar.flowar_small, "L": flowar.flowar_large, "H": flowar.flowar_huge}[size]
    kwargs = dict(diffloss_d=cfg.head_depth, diffloss_w=cfg.head_width, attn_dropout=0.0,
                  proj_dropout=0.0)
    model = build(**kwargs)
    load_into(model, flowar_to_torch(params, cfg))
    return model.eval()


def official_kl16(path: str, params):
    from arjax.convert.flowar import kl_to_torch

    _, vae = import_official(path)
    model = vae.AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))
    load_into(model, kl_to_torch(params))
    return model.eval()
