"""A small module-patch editor, written as a new editor would be: this file plus one registry
line (``METHODS["codebook"] = "tests.editors.codebook:Codebook"``, set by the tests).

At the last layer's MLP output projection it keeps one codebook entry per edit: a key (the
projection's input at the prompt's last token), a radius and a value. At positions whose input
lies within the radius of the key, the projection's output is replaced by the value (trained
for a few Adam steps so that the prompt continues with the target's first token); elsewhere
the output is the base model's, bit for bit. A GRACE-like toy that proves the mechanism.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from medit.artifacts.modules import write_module_artifact
from medit.core.arch import get_arch, get_module
from medit.core.hooks import capture_input, trainable_only
from medit.core.text import teacher_batch
from medit.editors.base import Capabilities, Editor, HParams, hp
from medit.editors.patching.bank import Patch, PatchBank
from medit.editors.results import ModuleEdit


@dataclasses.dataclass(frozen=True)
class CodebookHParams(HParams):
    radius: float = hp(1e-3, "relative distance to the key within which an entry acts")
    steps: int = hp(40, "Adam steps of the value")
    lr: float = hp(0.5, "Adam learning rate of the value")


@dataclasses.dataclass(eq=False)
class Entry(Patch):
    edit_id: str
    module: str
    key: torch.Tensor  # (d_in,)
    value: torch.Tensor  # (d_out,)
    radius: float

    mergeable = False  # a replacement where a key matches is no weight change

    @property
    def modules(self) -> list[str]:
        return [self.module]

    def gate(self, module: str, x: torch.Tensor) -> torch.Tensor:
        dist = (x.float() - self.key).norm(dim=-1) / self.key.norm().clamp_min(1e-12)
        return (dist <= self.radius).float()  # (batch, pos)

    @classmethod
    def act(cls, patches, module, x, out, gate):
        values = torch.stack([p.value for p in patches])[:, None, :].to(out.dtype)  # (n, 1, d)
        return torch.where(gate[..., None] > 0, values.expand_as(out), out)

    @classmethod
    def write_artifact(cls, directory, result, bank, peft: bool = True, **provenance):
        tensors = {}
        for i, e in enumerate(result.patches):
            tensors[f"{i}::key"], tensors[f"{i}::value"] = e.key, e.value
        edits = [{"id": e.edit_id, "module": e.module, "radius": e.radius} for e in result.patches]
        hparams = result.hparams.to_dict()
        return write_module_artifact(
            directory, "modules", result.method, hparams, edits, tensors, **provenance
        )


class Codebook(Editor):
    name = "codebook"
    hparams_class = CodebookHParams
    capabilities = Capabilities(batch=True)
    summary = "test patch: a key-value codebook at the last MLP output projection"

    def _apply(self, model: Any, tok: Any, requests, hp: CodebookHParams, prior=None):
        arch = get_arch(model)
        name = arch.layer_path(arch.n_layers(model) - 1, "mlp_out")
        bank = PatchBank.of(model, arch)
        entries = []
        with bank.disabled():
            for req in requests:
                batch = teacher_batch(tok, [req.prompt], [req.target_new])
                x = capture_input(get_module(model, name), lambda b=batch: model(b.input_ids))
                key = x[0, batch.prompt_last[0]].detach().float()
                value = _train_value(model, tok, name, batch, hp)
                entries.append(Entry(req.id, name, key, value, hp.radius))
        bank.add(*entries)
        return ModuleEdit(self.name, hp, bank, entries)

    @classmethod
    def load(cls, model, tok, manifest, tensors):
        bank = PatchBank.of(model, get_arch(model))
        entries = [
            Entry(e["id"], e["module"], tensors[f"{i}::key"], tensors[f"{i}::value"], e["radius"])
            for i, e in enumerate(manifest["edits"])
        ]
        bank.add(*entries)
        return ModuleEdit(
            manifest["method"], cls.hparams_class(**manifest["hparams"]), bank, entries
        )


def _train_value(model, tok, name, batch, hp: CodebookHParams) -> torch.Tensor:
    """The output of ``name`` at the last prompt position that makes the first target token
    most likely: Adam on the value alone."""
    module, pos = get_module(model, name), int(batch.prompt_last[0])
    with torch.no_grad():
        out = capture_output(module, lambda: model(batch.input_ids))
    value = out[0, pos].detach().float().clone().requires_grad_(True)

    def put(_m, _args, output):
        output = output.clone()
        output[0, pos] = value.to(output.dtype)
        return output

    opt = torch.optim.Adam([value], lr=hp.lr)
    handle = module.register_forward_hook(put)
    try:
        with torch.enable_grad(), trainable_only(model, []):
            for _ in range(hp.steps):
                logits = model(batch.input_ids).logits[0, pos].float()
                loss = -torch.log_softmax(logits, -1)[batch.labels[0]]
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        handle.remove()
    return value.detach()


def capture_output(module, run) -> torch.Tensor:
    got = []
    handle = module.register_forward_hook(lambda _m, _a, o: got.append(o.detach()))
    try:
        run()
    finally:
        handle.remove()
    return got[0]
