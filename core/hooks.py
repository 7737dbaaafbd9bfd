"""Context managers that borrow a model briefly and always give it back unchanged.

A worker process keeps one model alive for hours and explains thousands of images with it, so
every temporary change — a forward hook, the eval switch — is made inside a ``with`` block and
undone in ``finally``, also when the forward pass raises. A leaked hook would keep a reference
to the last batch's activations (memory) and run on every later forward pass (speed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from torch import Tensor, nn

from core.exceptions import UnsupportedModelError


def get_submodule(model: nn.Module, name: str, *, field: str = "layer") -> nn.Module:
    """``model``'s submodule called ``name`` (dotted path, as in ``named_modules``).

    A missing name is an :class:`UnsupportedModelError` naming ``field``, because it means the
    model does not have the architecture its metadata claims.
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UnsupportedModelError(f"the model has no submodule {name!r}", field=field) from None


class Captured:
    """The output of a hooked module, filled in by :func:`capture_output` during a forward pass."""

    def __init__(self) -> None:
        self._value: Tensor | None = None

    @property
    def value(self) -> Tensor:
        """The last output seen; an error when the hooked module has not run."""
        if self._value is None:
            raise UnsupportedModelError(
                "the hooked layer did not run during the forward pass", field="layer"
            )
        return self._value

    def clear(self) -> None:
        """Drop the reference, so the activations can be freed."""
        self._value = None


@contextmanager
def capture_output(module: nn.Module, *, as_leaf: bool = False) -> Iterator[Captured]:
    """Record ``module``'s output during forward passes run inside the block.

    With ``as_leaf`` the output is replaced by a detached alias that requires grad, and the rest
    of the network runs from it: gradients can then be taken with respect to this layer even when
    the model's parameters are frozen, and the graph of the layers *before* it is not kept
    (Grad-CAM only needs the part after it). Only a module returning one tensor can be hooked.
    When the module runs several times, the last output wins.
    """
    captured = Captured()

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Tensor | None:
        if not isinstance(output, Tensor):
            raise UnsupportedModelError(
                f"the hooked layer returns {type(output).__name__}, not a tensor", field="layer"
            )
        if as_leaf:
            output = output.detach().requires_grad_(True)
            captured._value = output
            return output
        captured._value = output
        return None

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def preserved_mode(model: nn.Module, *, train: bool | None = None) -> Iterator[nn.Module]:
    """Restore the ``training`` flag of ``model`` and of every submodule on exit.

    ``train=False`` switches the whole model to eval mode for the block (``True``: train mode);
    ``None`` only protects the flags. Flags are restored one by one, so a model left in train
    mode with, say, its BatchNorms frozen in eval mode comes back exactly so.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        if train is not None:
            model.train(train)
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def eval_mode(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Eval mode for the block (BatchNorm uses running statistics, dropout is off), then the
    previous per-module flags back — see :func:`preserved_mode`."""
    return preserved_mode(model, train=False)
