"""Module-tree helpers shared by patching, pooling installation and BatchNorm folding."""

from typing import Callable, Dict, Optional

import torch.nn as nn


def check_module(model, fn: str) -> None:
    """TypeError naming the public function `fn` unless `model` is an nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastvit_kernels.{fn} expects a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}")


def replace_children(model: nn.Module, convert: Callable[[nn.Module], Optional[nn.Module]]) -> None:
    """Replace, recursively, every submodule for which convert(module) returns a new module.
    A module reachable under several names is converted once and the result used everywhere;
    the children of a new module are visited too (except the module it replaced, if it wraps it)."""
    done: Dict[int, nn.Module] = {}
    visited = set()

    def visit(parent: nn.Module) -> None:
        if id(parent) in visited:
            return
        visited.add(id(parent))
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) in done:
                if done[id(child)] is not parent:  # a replacement may wrap the module it replaces
                    parent._modules[name] = done[id(child)]
                continue
            new = convert(child)
            if new is not None:
                done[id(child)] = new
                parent._modules[name] = new
                visit(new)
            else:
                visit(child)

    visit(model)
