"""Hooks: one way to read or patch module inputs and outputs, always cleaned up.

``hooked`` registers forward (pre-)hooks for the duration of a ``with`` block; ``capture_input``
reads what a module received; ``frozen_prefix`` runs a model from a decoder layer onwards, the
hidden state entering that layer being given (computed once, reused across optimisation steps);
``edited_outputs`` replaces module outputs (per batch row and position with ``put_rows`` /
``add_rows``, or reads them with ``record``), for activation patching.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from medit.core.arch import ArchSpec

PreHook = Callable[[nn.Module, tuple, dict], Any]
PostHook = Callable[[nn.Module, tuple, dict, Any], Any]


@contextlib.contextmanager
def hooked(
    hooks: list[tuple[nn.Module, PreHook | None, PostHook | None]],
) -> Iterator[None]:
    """Register (module, pre_hook, post_hook) triples (with kwargs); remove them on exit."""
    handles = []
    try:
        for module, pre, post in hooks:
            if pre is not None:
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            if post is not None:
                handles.append(module.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def first_tensor_arg(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor:
    """The hidden-state input of a decoder layer, whether passed by position or keyword."""
    return args[0] if args else kwargs[name]


def with_first_tensor_arg(
    args: tuple, kwargs: dict, tensor: torch.Tensor, name: str = "hidden_states"
) -> tuple[tuple, dict]:
    """(args, kwargs) with the first input (by position or keyword ``name``) replaced by
    ``tensor``: what a pre-hook returns to feed a module something else."""
    if args:
        return (tensor, *args[1:]), kwargs
    return args, {**kwargs, name: tensor}


class _Captured(Exception):
    """Raised inside a hook to stop a forward pass once the wanted input has been read."""


def capture_input(module: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """Run ``run()`` up to ``module`` and return the (detached) hidden-state input it received;
    the rest of the forward pass is skipped."""
    seen: list[torch.Tensor] = []

    def pre(_m, args, kwargs):
        seen.append(first_tensor_arg(args, kwargs).detach())
        raise _Captured

    with hooked([(module, pre, None)]):
        try:
            run()
        except _Captured:
            pass
    if not seen:
        raise RuntimeError(f"{type(module).__name__} was not called during the forward pass")
    return seen[-1]


def capture_inputs(modules: list[nn.Module], run: Callable[[], Any]) -> list[torch.Tensor]:
    """Run ``run()`` and return the (detached) first input of each module, in order; the forward
    pass stops once the last of them has been reached."""
    seen: dict[int, torch.Tensor] = {}
    last = len(modules) - 1

    def pre(i: int) -> PreHook:
        def hook(_m, args, kwargs):
            seen[i] = first_tensor_arg(args, kwargs, "input").detach()
            if len(seen) == len(modules) and i == last:
                raise _Captured

        return hook

    with hooked([(m, pre(i), None) for i, m in enumerate(modules)]), contextlib.suppress(_Captured):
        run()
    missing = [type(modules[i]).__name__ for i in range(len(modules)) if i not in seen]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not called during the forward pass")
    return [seen[i] for i in range(len(modules))]


@contextlib.contextmanager
def frozen_prefix(model: nn.Module, arch: ArchSpec, start: int, hidden: torch.Tensor):
    """Within the block, a forward pass skips decoder layers ``< start`` and feeds ``hidden``
    (the state entering layer ``start``, computed beforehand) into layer ``start``.

    Valid while nothing below layer ``start`` changes: the prefix is constant across
    optimisation steps of any method that trains only layers ``>= start``.
    """
    layers = arch.layer_list(model)

    def identity(hidden_states, *args, **kwargs):
        return hidden_states

    def feed(_m, args, kwargs):
        return with_first_tensor_arg(args, kwargs, hidden)

    # a dispatched model's layers (--device-map) carry accelerate's forward as an instance
    # attribute: it is put back afterwards, not deleted
    saved = [layer.__dict__.get("forward") for layer in layers[:start]]
    for layer in layers[:start]:
        layer.forward = identity  # instance attribute shadows the class method
    try:
        with hooked([(layers[start], feed, None)]):
            yield
    finally:
        for layer, forward in zip(layers[:start], saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@contextlib.contextmanager
def side_training(
    model: nn.Module, arch: ArchSpec, layer: int, hidden: torch.Tensor, module: nn.Module, hook
) -> Iterator[None]:
    """Within the block an editor trains its own side parameters from ``layer`` up: gradients
    on, every weight of the model frozen (:func:`trainable_only`), the layers below ``layer``
    replaced by ``hidden`` (:func:`frozen_prefix`) and ``hook`` on ``module``'s output (removed on
    exit)."""
    handle = module.register_forward_hook(hook)
    try:
        with (
            torch.enable_grad(),
            trainable_only(model, []),
            frozen_prefix(model, arch, layer, hidden),
        ):
            yield
    finally:
        handle.remove()


def layer_states(
    model: nn.Module, arch: ArchSpec, layer: int, module: nn.Module, ids: torch.Tensor
):
    """One forward of ``ids``: (the hidden state entering decoder layer ``layer``, ``module``'s
    input, ``module``'s output), detached. An editor that trains only from ``layer`` up feeds the
    first to :func:`frozen_prefix`."""
    got: dict[str, torch.Tensor] = {}

    def entering(_m, args, kwargs):
        got["hidden"] = first_tensor_arg(args, kwargs).detach()

    def seen(_m, args, kwargs, output):
        got["x"], got["out"] = first_tensor_arg(args, kwargs).detach(), output.detach()

    with hooked([(arch.layer_list(model)[layer], entering, None), (module, None, seen)]):
        model(ids)
    return got["hidden"], got["x"], got["out"]


# -- editing module outputs ----------------------------------------------------------------------
TensorEdit = Callable[[torch.Tensor], torch.Tensor]


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a module's output (attention modules return ``(output, weights)``)."""
    return output[0] if isinstance(output, tuple) else output


def with_output_tensor(output: Any, tensor: torch.Tensor) -> Any:
    """``output`` with its main tensor replaced, keeping a tuple's other elements."""
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextlib.contextmanager
def edited_outputs(edits: list[tuple[nn.Module, TensorEdit]]) -> Iterator[None]:
    """Within the block, each module's output tensor ``t`` is replaced by ``edit(t)``.

    Several edits of one module apply in order. Specialise ``edit`` with ``functools.partial``
    over :func:`put_rows`, :func:`add_rows` or :func:`record`.
    """

    def post(edit: TensorEdit) -> PostHook:
        def hook(_m, _args, _kwargs, output):
            return with_output_tensor(output, edit(output_tensor(output)))

        return hook

    with hooked([(module, None, post(edit)) for module, edit in edits]):
        yield


def put_rows(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, tensor: torch.Tensor
) -> torch.Tensor:
    """``tensor`` (B, T, d) with ``tensor[rows[i], cols[i]] = values[i]`` (out of place), on
    ``tensor``'s device (a layer of a --device-map may live on another than ``values``)."""
    at = (rows.to(tensor.device), cols.to(tensor.device))
    return tensor.index_put(at, values.to(tensor.device, tensor.dtype))


def add_rows(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, tensor: torch.Tensor
) -> torch.Tensor:
    """``tensor`` (B, T, d) with ``values[i]`` added at ``tensor[rows[i], cols[i]]`` (out of place)."""
    at = (rows.to(tensor.device), cols.to(tensor.device))
    return tensor.index_put(at, values.to(tensor.device, tensor.dtype), accumulate=True)


def record(store: list[torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    """Append ``tensor`` to ``store`` and pass it on unchanged."""
    store.append(tensor)
    return tensor


@contextlib.contextmanager
def trainable_only(model: nn.Module, params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Only ``params`` require grad inside the block (an editor trains them and nothing else);
    the previous flags come back on exit and the gradients are dropped."""
    params = list(params)
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p in params:
            p.grad = None
