"""A user's network for a backbone: ``"package.module:factory"`` built, its state dict read.

``model.backbone = "package.module:factory"`` with ``model.weights`` in a config comes here (from
:func:`metafilm.assemble.build_learner`): the factory, called with no arguments, returns the
``nn.Module``; the weights file is read with ``torch.load(weights_only=True)``, so it cannot run
code. The network is then wrapped as a :class:`metafilm.any_backbone.ModuleBackbone`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from metafilm.any_backbone import ModuleBackbone


def load_module_backbone(
    spec: str,
    weights: str | Path | None = None,
    *,
    in_channels: int,
    image_size: int,
    normalize: bool = False,
) -> ModuleBackbone:
    """The :class:`ModuleBackbone` of the network ``factory()`` returns, for ``spec``
    ``"package.module:factory"``, with the state dict in ``weights`` (loaded with
    ``weights_only=True``: a file cannot run code) if given.

    Every problem (no such module or attribute, a factory returning no ``nn.Module``, an
    unreadable weights file, keys or shapes that do not fit) is a one-line ``ValueError`` naming
    the spec or the file.
    """
    module = build_module(spec)
    if weights is not None:
        load_weights(module, Path(weights), spec)
    return ModuleBackbone(
        module, in_channels=in_channels, image_size=image_size, normalize=normalize
    )


def build_module(spec: str) -> nn.Module:
    """``factory()`` of ``spec`` ``"package.module:factory"``, checked to be an ``nn.Module``."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute or ":" in attribute:
        raise ValueError(
            f"backbone {spec!r} must name a factory as 'package.module:factory' (a callable that "
            "takes no arguments and returns the nn.Module)"
        )
    try:
        python_module = importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None)
        if missing is not None and (module_name + ".").startswith(missing + "."):
            raise ValueError(
                f"backbone {spec!r}: there is no Python module {missing!r} (is it installed, or "
                "its folder on PYTHONPATH?)"
            ) from None
        raise ValueError(f"backbone {spec!r}: importing {module_name!r} failed: {error}") from None
    factory = getattr(python_module, attribute, None)
    if factory is None:
        raise ValueError(f"backbone {spec!r}: module {module_name!r} has no {attribute!r}")
    if not callable(factory):
        raise ValueError(
            f"backbone {spec!r}: {attribute!r} is a {type(factory).__name__}, not a callable "
            "factory"
        )
    try:
        signature = inspect.signature(factory)
    except ValueError:  # no signature to read (some builtins): just call it
        signature = None
    if signature is not None:
        try:
            signature.bind()
        except TypeError:
            names = ", ".join(signature.parameters)
            raise ValueError(
                f"backbone {spec!r}: {attribute} takes arguments ({names}) and metafilm calls it "
                "with none: name a function that builds the network alone"
            ) from None
    module = factory()
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"backbone {spec!r}: {attribute}() returned a {type(module).__name__}, not a "
            "torch.nn.Module"
        )
    return module


def load_weights(module: nn.Module, path: Path, spec: str) -> None:
    """Load the state dict saved in ``path`` into ``module`` (built from ``spec``), refusing keys
    or shapes that do not match exactly, each with a one-line ``ValueError``."""
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling raises many types; all mean the same here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"weights file {path} cannot be read as tensors (weights_only=True): {reason}. "
            "Save the network's state dict: torch.save(module.state_dict(), path)"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        held = list(state)[:5] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"weights file {path} holds no state dict of tensors (found {held}): save "
            "module.state_dict() alone, e.g. a checkpoint's model entry"
        )
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise ValueError(
            f"weights file {path} does not fit {spec!r}: missing keys {_few(missing)}, "
            f"unexpected keys {_few(unexpected)}. Save the state_dict() of the network that "
            f"{spec!r} builds"
        )
    wrong = [
        f"{key} {tuple(state[key].shape)} for {tuple(value.shape)}"
        for key, value in expected.items()
        if state[key].shape != value.shape
    ]
    if wrong:
        raise ValueError(
            f"weights file {path} does not fit {spec!r}: shapes differ at {_few(wrong)}. Save the "
            f"state_dict() of the network that {spec!r} builds"
        )
    module.load_state_dict(state)


def _few(names: Sequence[str], shown: int = 3) -> str:
    """Up to ``shown`` names and how many more, on one line."""
    listed = ", ".join(names[:shown]) or "none"
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")
