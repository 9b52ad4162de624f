"""The registry of editing methods: name -> class, imported lazily (``medit --help`` stays fast).

A new editor is one file under ``medit/editors/`` and one line here.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from medit.core.errors import UserError
from medit.editors.base import Editor

#: method name -> "module:Class"
METHODS: dict[str, str] = {
    "ft-l": "medit.editors.ft:FTL",
    "ft-m": "medit.editors.ft:FTM",
    "lora": "medit.editors.lora:LoRA",
    "adalora": "medit.editors.lora:AdaLoRA",
    "medlasa": "medit.editors.medlasa:MedLaSA",
    "rome": "medit.editors.rome:ROME",
    "memit": "medit.editors.memit:MEMIT",
    "alphaedit": "medit.editors.alphaedit:AlphaEdit",
    "grace": "medit.editors.grace:GRACE",
    "tpatcher": "medit.editors.tpatcher:TPatcher",
    "ultraedit": "medit.editors.ultraedit:UltraEdit",
    "scen": "medit.editors.scen:SCEN",
    "wise": "medit.editors.wise:WISE",
    "mend": "medit.editors.mend:MEND",
    "serac": "medit.editors.serac:SERAC",
}


def get_editor_class(name: str) -> type[Editor]:
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown method {name!r}{hint} (available: {', '.join(METHODS)})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_editor(name: str, **overrides: Any) -> Editor:
    return get_editor_class(name)(**overrides)


def editor_modules(
    editor: Editor, config: Any, device_map: str | None, quantize: str | None
) -> tuple[str, ...]:
    """The modules ``load_model`` keeps for ``editor``: off a device map's offload and out of
    the quantisation (its :meth:`Editor.resident_modules`). An editor that does not say which
    modules it edits cannot edit a quantised model: refused before anything loads."""
    if not (device_map or quantize):
        return ()
    names = editor.resident_modules(config)
    if names is None and quantize:
        raise UserError(
            f"{editor.name} does not declare which modules it edits, so it cannot edit a "
            "quantised model (--quantize): load the model without it"
        )
    return names or ()
