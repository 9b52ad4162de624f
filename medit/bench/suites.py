"""Benchmark suites: which data, which fields, which locality types and metrics.

* ``medcf`` — MedCF, medical counterfactual facts (Xu et al., CIKM 2024), locality types target,
  mapping, struc, tokenSem.
* ``medfe`` — MedFE, medical fact explanations (same paper), locality types topic, tokenSem;
  adds explanation quality (ROUGE-L against the reference explanation, answer stated).
* ``builtin`` — medit's own 33 corrections of facts the default model gets wrong.

MedCF and MedFE are read from a local path (``--data``), in their original JSON format, by the
reader of request files (``medit.facts.requests.load_requests``: errors name the file and the line and
column of malformed JSON, or the record and field); nothing is downloaded. The files are
published with the MedLaSA paper's code (github.com/quqxui/MedLaSA, folder ``data/``):
``MedCF/{train,valid,test}.json`` and ``MedFE/{valid,test}.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from medit.core.errors import UserError
from medit.evaluation import EvalConfig
from medit.facts.requests import BUILTIN, EditRequest, RequestError, load_requests


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    description: str
    locality_types: tuple[str, ...]  #: locality probe names every case carries
    explanation: bool = False  #: score generated explanations against the reference (MedFE)
    needs_data: bool = True  #: a --data path is required
    default_file: str = "test.json"  #: file used when --data names a folder
    eval: EvalConfig = EvalConfig()  #: evaluation settings for this suite
    method_defaults: dict = dataclasses.field(default_factory=dict)  #: method -> hparams

    def resolve(self, data: str | None) -> str:
        """The file to read: --data itself, or its default file when it is a folder."""
        if not self.needs_data:
            return BUILTIN
        if not data:
            raise UserError(
                f"suite {self.name!r} needs --data PATH (its JSON file or folder, as published "
                "with the MedLaSA paper's code); medit never downloads data"
            )
        path = Path(data)
        if path.is_dir():
            for candidate in (
                path / self.default_file,
                path / self.name.upper() / self.default_file,
            ):
                if candidate.is_file():
                    return str(candidate)
            raise UserError(f"--data {path}: no {self.default_file} in this folder")
        if not path.is_file():
            raise UserError(f"--data {path}: file not found")
        return str(path)

    def load(self, data: str | None, limit: int | None = None) -> list[EditRequest]:
        """Read and validate the suite's cases; check the declared locality types are there."""
        source = self.resolve(data)
        requests = load_requests(source)
        requests = requests[:limit]
        for i, r in enumerate(requests, 1):
            missing = set(self.locality_types) - set(r.locality)
            if missing:
                raise RequestError(
                    source,
                    i,
                    f"locality_{sorted(missing)[0]}_prompt",
                    f"missing: suite {self.name!r} expects locality types "
                    f"{', '.join(self.locality_types)}",
                )
        return requests


def data_sha256(source: str) -> str:
    """Content hash of a suite's data (the package file for the builtin set)."""
    if source == BUILTIN:
        from importlib import resources

        blob = resources.files("medit.data").joinpath("builtin_requests.json").read_bytes()
    else:
        blob = Path(source).read_bytes()
    return hashlib.sha256(blob).hexdigest()


SUITES: dict[str, Suite] = {
    "medcf": Suite(
        name="medcf",
        description="MedCF medical counterfactual facts",
        locality_types=("target", "mapping", "struc", "tokenSem"),
    ),
    "medfe": Suite(
        name="medfe",
        description="MedFE medical fact explanations",
        locality_types=("topic", "tokenSem"),
        explanation=True,
        eval=EvalConfig(fluency_tokens=64),
        method_defaults={"medlasa": {"preset": "medfe"}},  # the paper's MedFE preset
    ),
    "builtin": Suite(
        name="builtin",
        description="medit's built-in corrections of facts the default model gets wrong",
        locality_types=("related", "general"),
        needs_data=False,
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    return SUITES[name]
