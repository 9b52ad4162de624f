"""The ``medit`` command line: parses options and calls the library, nothing more.

Heavy imports (torch, transformers) happen inside the commands so that ``medit --help`` is fast.
Bad input exits with code 2 and one clear line on stderr; nothing is written.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from medit.core.errors import UserError

DEVICES = "auto|cpu|cuda[:N]|mps"
DTYPES = click.Choice(["auto", "float32", "bfloat16", "float16"])


def _user_errors(fn):
    """Bad user input (:class:`~medit.core.errors.UserError`) exits 2 with its one line. Anything
    else is a bug: exit 1 with a short message, and the traceback with ``-v``. An operating-system
    error (disk full, permission denied) exits 1 with its message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            click.echo(f"medit: error: {exc}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence of the CLI
            ctx = click.get_current_context(silent=True)
            verbose = bool(ctx and ctx.obj and ctx.obj.get("verbose"))
            if verbose:
                traceback.print_exc()
            if isinstance(exc, OSError):
                click.echo(f"medit: error: {exc}", err=True)
            else:
                hint = "" if verbose else "; rerun with -v for the traceback"
                click.echo(
                    f"medit: internal error ({type(exc).__name__}: {exc}): this is a bug "
                    f"in medit, not in your input{hint}",
                    err=True,
                )
            sys.exit(1)

    return wrapper


def _quiet_option(fn):
    """``--quiet/-q`` on a command as well as on ``medit`` itself (either works)."""

    @click.option("--quiet", "-q", "cmd_quiet", is_flag=True, help="No progress bars or logs.")
    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx, *args, cmd_quiet=False, **kwargs):
        ctx.ensure_object(dict)
        if cmd_quiet and not ctx.obj.get("quiet"):
            ctx.obj["quiet"] = True
            _silence(ctx.obj.get("verbose", False))
        return ctx.invoke(fn, *args, **kwargs)

    return wrapper


def _silence(verbose: bool) -> None:
    """Quiet mode: no progress bars or warnings from medit or the libraries it calls."""
    import os
    import warnings

    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TQDM_DISABLE"] = "1"
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _parse_hparams(items: tuple[str, ...]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--hparam")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _placement_options(fn):
    """--device-map / --max-memory: a model across GPUs, CPU and disk, placed by accelerate
    (see medit.core.placement); not together with an explicit --device."""

    @click.option(
        "--max-memory",
        metavar="DEV=SIZE,...",
        help="With --device-map auto|balanced|sequential: memory per device, e.g. "
        "0=20GiB,1=20GiB,cpu=64GiB (the rest is offloaded to disk).",
    )
    @click.option(
        "--device-map",
        metavar="auto|balanced|sequential|FILE.json",
        help="Spread the model over devices with accelerate (CPU and disk offload included); "
        "FILE.json maps module names to devices (0, cuda:1, cpu, disk). Instead of --device.",
    )
    @functools.wraps(fn)
    def wrapper(*args, device_map=None, max_memory=None, **kwargs):
        ctx = click.get_current_context()
        source = ctx.get_parameter_source("device")
        if device_map is not None and source not in (None, click.core.ParameterSource.DEFAULT):
            raise click.UsageError("--device and --device-map cannot be used together", ctx)
        if max_memory is not None and device_map is None:
            raise click.UsageError("--max-memory goes with --device-map", ctx)
        return fn(*args, device_map=device_map, max_memory=max_memory, **kwargs)

    return wrapper


def _quantize_option(fn):
    """--quantize 8bit|4bit: bitsandbytes weights for the modules no editor writes."""
    return click.option(
        "--quantize",
        type=click.Choice(["8bit", "4bit"]),
        help="Load the linear layers quantised with bitsandbytes (pip install "
        "'medit[quantized]'), except the output head and the modules the editor edits, which stay "
        "in --dtype.",
    )(fn)


def _journal_options(fn):
    """--author / --reason / --workspace: what the edit journal records."""
    fn = click.option(
        "--workspace",
        type=click.Path(file_okay=False),
        help="Directory of the edit journal (journal.jsonl); default: the "
        "directory that holds --out.",
    )(fn)
    fn = click.option("--reason", help="Why this change is made (recorded in the journal).")(fn)
    fn = click.option("--author", help="Who makes it (journal; default: the OS user name).")(fn)
    return fn


class _Group(click.Group):
    """Usage errors (bad options) as one line, like every other user error: exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("medit: aborted", err=True)
            sys.exit(1)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            click.echo(f"medit: error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"medit: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines on stderr.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """medit: correct facts in medical language models, prove the correction is safe."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="medit: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    ctx.obj = {"quiet": quiet, "verbose": verbose}
    if quiet:
        _silence(verbose)


@main.command()
@click.option(
    "--model",
    default="builtin:smollm2",
    show_default=True,
    help="builtin:NAME, a local HF directory, a .gguf file or a hub id.",
)
@click.option("--method", default="ft-m", show_default=True, help="Editor (see `medit methods`).")
@click.option(
    "--requests",
    "requests_",
    default="builtin",
    show_default=True,
    help="JSON/JSONL/MedCF/MedFE file, or 'builtin' for the shipped sample set.",
)
@click.option(
    "--mode",
    type=click.Choice(["single", "batch", "sequential"]),
    default="single",
    show_default=True,
    help="single: edit-evaluate-restore each; batch: all at once; "
    "sequential: one after another, then evaluate all (retention).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option(
    "--save-model",
    type=click.Path(file_okay=False),
    help="Also save the edited model here (safetensors HF dir + delta file).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help=DEVICES)
@click.option("--dtype", type=DTYPES, default="auto", show_default=True)
@click.option("--limit", type=int, help="Use only the first N requests.")
@click.option(
    "--hparam",
    "hparams",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override an editor hyper-parameter (repeatable), e.g. --hparam steps=40.",
)
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Evaluation batch size.",
)
@click.option("--no-generation", is_flag=True, help="Skip the generation-based protocol.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a run directory (and --save-model directory) medit wrote earlier.",
)
@click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    metavar="KEY=VALUE",
    help="Pass-rate threshold the report's verdict uses (efficacy, generality, "
    "locality; generation-based), declared before the run. Repeatable.",
)
@click.option("--fail-under", is_flag=True, help="Exit 3 when the verdict fails the thresholds.")
@click.option(
    "--locality-from",
    type=click.Path(dir_okay=False),
    help="Facts the model knows (e.g. `medit check`'s right.jsonl): each request gets "
    "--locality-per-edit of them as locality probes (never an edited question).",
)
@click.option(
    "--locality-per-edit",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Known facts sampled per request with --locality-from.",
)
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) weights. Unsafe.")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repo's code. Unsafe.")
@click.option(
    "--force", is_flag=True, help="Edit even where `medit plan` expects the edit not to fit."
)
@_journal_options
@_quiet_option
@click.pass_context
@_user_errors
@_quantize_option
@_placement_options
def edit(
    ctx,
    model,
    method,
    requests_,
    mode,
    out,
    save_model,
    seed,
    device,
    dtype,
    limit,
    hparams,
    batch_size,
    no_generation,
    overwrite,
    thresholds,
    fail_under,
    locality_from,
    locality_per_edit,
    allow_pickle,
    trust_remote_code,
    force,
    author,
    reason,
    workspace,
    device_map,
    max_memory,
    quantize,
):
    """Edit facts into a model and evaluate the edit before/after; writes RUN_DIR."""
    from medit.evaluation import EvalConfig
    from medit.runner import RunConfig, run_edit

    cfg = RunConfig(
        out=out,
        model=model,
        method=method,
        requests=requests_,
        mode=mode,
        hparams=_parse_hparams(hparams),
        seed=seed,
        device=device,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        quantize=quantize,
        limit=limit,
        save_model=save_model,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        quiet=ctx.obj["quiet"],
        eval=EvalConfig(batch_size=batch_size, generation=not no_generation),
        thresholds=_parse_thresholds(thresholds),
        author=author,
        reason=reason,
        workspace=workspace,
        locality_from=locality_from,
        locality_per_edit=locality_per_edit,
        force=force,
    )
    from medit.core.results import format_summary
    from medit.report.render import write_report

    res = run_edit(cfg)
    if not ctx.obj["quiet"]:
        click.echo(format_summary(res), err=True)
    report = write_report(out)
    if not ctx.obj["quiet"]:
        click.echo(f"report: {report.resolve()}", err=True)
    click.echo(str(Path(out).resolve()))
    if fail_under:
        _gate(res)


@main.command()
@click.option("--model", default="builtin:smollm2", show_default=True, help="Model spec.")
@click.option("--method", default="ft-m", show_default=True, help="Editor (see `medit methods`).")
@click.option("--device", default="auto", show_default=True, help=DEVICES)
@click.option("--dtype", type=DTYPES, default="auto", show_default=True)
@click.option("--hparam", "hparams", multiple=True, metavar="KEY=VALUE", help="Editor override.")
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Sequences per evaluation forward.",
)
@click.option(
    "--seq-len",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Tokens of an edit prompt + target.",
)
@click.option(
    "--edits",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests per edit call (batch mode: all of them).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repo's code. Unsafe.")
@_user_errors
@_placement_options
def plan(
    model,
    method,
    device,
    dtype,
    hparams,
    batch_size,
    seq_len,
    edits,
    as_json,
    trust_remote_code,
    device_map,
    max_memory,
):
    """Expected peak memory per device of editing MODEL with METHOD, from its config alone."""
    from medit.core.memory import Workload
    from medit.plan import plan_memory

    mem = plan_memory(
        model,
        method,
        hparams=_parse_hparams(hparams),
        device=device,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        work=Workload(seq_len=seq_len, batch_size=batch_size, edits=edits),
        trust_remote_code=trust_remote_code,
    )
    click.echo(json.dumps(mem.to_dict(), indent=2) if as_json else mem.table())


@main.command()
@click.option("--model", default="builtin:smollm2", show_default=True, help="Base model spec.")
@click.option(
    "--artifact",
    type=click.Path(exists=True),
    help="Run directory (or artifact file) whose edit is applied to the base model.",
)
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Text file, one prompt per line, or JSONL with a 'prompt' field.",
)
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--device", default="auto", show_default=True, help=DEVICES)
@click.option("--dtype", type=DTYPES, default="auto", show_default=True)
@_quiet_option
@_user_errors
@_quantize_option
@_placement_options
def generate(
    model,
    artifact,
    prompts,
    prompts_file,
    max_new_tokens,
    device,
    dtype,
    device_map,
    max_memory,
    quantize,
):
    """Greedy continuations as JSONL ({"prompt", "completion"}), optionally with an edit applied."""
    all_prompts = list(prompts) + (read_prompts(prompts_file) if prompts_file else [])
    if not all_prompts:
        raise UserError("give --prompt TEXT or --prompts FILE")
    from medit.core.models import load_model
    from medit.editors.load import load_edit, written_modules
    from medit.evaluation import generate as greedy

    keep = written_modules(artifact) if artifact and quantize else ()
    lm = load_model(
        model,
        device,
        dtype,
        device_map=device_map,
        max_memory=max_memory,
        quantize=quantize,
        keep_resident=keep,
    )
    if artifact:
        load_edit(lm.model, lm.tokenizer, artifact)
    for prompt, completion in zip(
        all_prompts, greedy(lm.model, lm.tokenizer, all_prompts, max_new_tokens), strict=True
    ):
        click.echo(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))


@main.command()
@click.option("--model", default="builtin:smollm2", show_default=True, help="Model spec.")
@click.option(
    "--questions",
    required=True,
    help="CSV/TSV/JSON/JSONL: a question (prompt) and the expected answer per row.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--limit", type=int, help="Ask only the first N questions.")
@click.option(
    "--similarity",
    default=0.8,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="Word-overlap F1 that counts an answer of 4+ words as right.",
)
@click.option(
    "--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Batch size."
)
@click.option("--device", default="auto", show_default=True, help=DEVICES)
@click.option("--dtype", type=DTYPES, default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a check directory medit wrote earlier.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) weights. Unsafe.")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repo's code. Unsafe.")
@_quiet_option
@click.pass_context
@_user_errors
def check(
    ctx,
    model,
    questions,
    out,
    limit,
    similarity,
    batch_size,
    device,
    dtype,
    overwrite,
    allow_pickle,
    trust_remote_code,
):
    """Ask the model every question; write the wrong answers as requests to edit (wrong.jsonl)
    and the right ones as locality probes (right.jsonl), with a report."""
    from medit.check import CheckConfig, run_check, summary
    from medit.evaluation import EvalConfig

    cfg = CheckConfig(
        out=out,
        questions=questions,
        model=model,
        device=device,
        dtype=dtype,
        limit=limit,
        similarity=similarity,
        eval=EvalConfig(batch_size=batch_size, fluency_tokens=0),
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        quiet=ctx.obj["quiet"],
    )
    results = run_check(cfg)
    from medit.report.render import write_report

    write_report(out)
    if not ctx.obj["quiet"]:
        click.echo(summary(results, out), err=True)
    click.echo(str(Path(out).resolve()))


def read_prompts(path: str) -> list[str]:
    """Plain text (one prompt per line) or JSONL with a 'prompt' field."""
    try:
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if lines and lines[0].lstrip().startswith("{"):
        out = []
        for i, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {i}: invalid JSON: {exc.msg}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise UserError(f"{path}: line {i}, field 'prompt': missing or not a string")
            out.append(rec["prompt"])
        return out
    return lines


@main.command()
@click.option(
    "--suite",
    type=click.Choice(["medcf", "medfe", "builtin"]),
    default="builtin",
    show_default=True,
)
@click.option(
    "--data",
    type=click.Path(exists=True),
    help="The suite's JSON file or folder (MedCF/MedFE as published with MedLaSA).",
)
@click.option("--methods", default="ft-m", show_default=True, help="Comma-separated editors.")
@click.option("--model", default="builtin:smollm2", show_default=True)
@click.option(
    "--mode",
    type=click.Choice(["single", "batch", "sequential"]),
    default="single",
    show_default=True,
)
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Edits per batch (batch mode).",
)
@click.option("--limit", type=int, help="First N cases.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help=DEVICES)
@click.option("--dtype", type=DTYPES, default="auto", show_default=True)
@click.option(
    "--hparam",
    "hparams",
    multiple=True,
    metavar="[METHOD:]KEY=VALUE",
    help="Override a hyper-parameter of one method (or of all).",
)
@click.option(
    "--curve-every",
    default=50,
    show_default=True,
    type=click.IntRange(min=0),
    help="Sequential mode: a retention-curve point every N edits (0: no curve).",
)
@click.option(
    "--curve-sample",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="Edits made so far (and locality probes) evaluated at each curve point.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option(
    "--keep-flagged",
    is_flag=True,
    help="Keep metrics that data-quality flags mark as unmeasurable.",
)
@click.option(
    "--compare",
    "compare_dirs",
    multiple=True,
    type=click.Path(exists=True),
    help="Merge finished runs into one table (repeatable); writes --out if given.",
)
@click.option(
    "--common",
    is_flag=True,
    help="With --compare: aggregate every row over the cases all compared rows hold.",
)
@click.option("--out", type=click.Path(file_okay=False), help="Run directory.")
@_quiet_option
@click.pass_context
@_user_errors
@_quantize_option
@_placement_options
def bench(
    ctx,
    suite,
    data,
    methods,
    model,
    mode,
    batch_size,
    limit,
    seed,
    device,
    dtype,
    hparams,
    curve_every,
    curve_sample,
    resume,
    keep_flagged,
    compare_dirs,
    common,
    out,
    device_map,
    max_memory,
    quantize,
):
    """Benchmark editors on MedCF, MedFE or the built-in set (resumable); or --compare runs."""
    from medit.bench import tables

    if common and not compare_dirs:
        raise UserError("--common applies to --compare only")
    if compare_dirs:
        from medit.core.fs import atomic_dir, atomic_write_text, check_out

        if out:
            check_out(out, True, "compare")
        merged = tables.compare(list(compare_dirs), common=common)
        text = tables.markdown(merged)
        if out:
            with atomic_dir(out, "compare") as tmp:
                atomic_write_text(tmp / "results.json", json.dumps(merged, indent=2))
                atomic_write_text(tmp / "table.md", text)
                atomic_write_text(tmp / "table.csv", tables.csv_text(merged))
        click.echo(text)
        return
    if not out:
        raise UserError("give --out RUN_DIR")
    from medit.bench.runner import BenchConfig, run_bench

    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    per_method: dict[str, dict] = {m: {} for m in names}
    for key, value in _parse_hparams(hparams).items():
        method, _, field = key.rpartition(":")
        for m in [method] if method else names:
            if m not in per_method:
                raise UserError(f"--hparam {key}: {m!r} is not among --methods")
            per_method[m][field] = value
    cfg = BenchConfig(
        out=out,
        suite=suite,
        data=data,
        methods=names,
        model=model,
        mode=mode,
        batch_size=batch_size,
        limit=limit,
        seed=seed,
        device=device,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        quantize=quantize,
        hparams=per_method,
        curve_every=curve_every,
        curve_sample=curve_sample,
        resume=resume,
        keep_flagged=keep_flagged,
        quiet=ctx.obj["quiet"],
    )
    res = run_bench(cfg)
    if os.environ.get("RANK", "0") == "0":  # a launch of several processes: the first one prints
        click.echo(tables.markdown(res))
        click.echo(str(Path(out).resolve()), err=True)


def _parse_thresholds(items: tuple[str, ...]) -> dict[str, float]:
    from medit.core.results import DEFAULT_THRESHOLDS

    out = dict(DEFAULT_THRESHOLDS)
    for key, value in _parse_hparams(items).items():
        if key not in DEFAULT_THRESHOLDS:
            raise UserError(f"unknown --threshold {key!r}; use {', '.join(DEFAULT_THRESHOLDS)}")
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise UserError(f"--threshold {key}: expected a pass rate between 0 and 1")
        out[key] = float(value)
    return out


@main.command("train-editor")
@click.argument("method", type=click.Choice(["mend", "serac"]))
@click.option("--model", default="builtin:smollm2", show_default=True, help="Base model spec.")
@click.option(
    "--data",
    type=click.Path(file_okay=False),
    help="A folder with train.json and valid.json (MedCF as published); or use --train/--valid.",
)
@click.option("--train", "train_file", type=click.Path(dir_okay=False), help="Training edits.")
@click.option("--valid", "valid_file", type=click.Path(dir_okay=False), help="Validation edits.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Training directory.")
@click.option("--steps", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--eval-every", default=100, show_default=True, type=click.IntRange(min=1), help="Steps."
)
@click.option(
    "--patience",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Stop after this many validations without improvement.",
)
@click.option("--limit-train", type=int, help="Use only the first N training edits.")
@click.option("--limit-valid", type=int, help="Use only the first N validation edits.")
@click.option(
    "--hparam",
    "hparams",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override an editor hyper-parameter (repeatable), e.g. --hparam lr=1e-4.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue the training in --out from its checkpoint.")
@click.option("--device", default="auto", show_default=True, help=DEVICES)
@click.option("--dtype", type=DTYPES, default="auto", show_default=True)
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) weights. Unsafe.")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repo's code. Unsafe.")
@_quiet_option
@click.pass_context
@_user_errors
@_placement_options
def train_editor(
    ctx,
    method,
    model,
    data,
    train_file,
    valid_file,
    out,
    steps,
    eval_every,
    patience,
    limit_train,
    limit_valid,
    hparams,
    seed,
    resume,
    device,
    dtype,
    allow_pickle,
    trust_remote_code,
    device_map,
    max_memory,
):
    """Train a learned editor (MEND, SERAC) for a model; edit with --hparam checkpoint=OUT."""
    from medit.train import TrainConfig, data_files, run_training

    files = data_files(data, train_file, valid_file)
    cfg = TrainConfig(
        method=method,
        hparams=_parse_hparams(hparams),
        steps=steps,
        eval_every=eval_every,
        patience=patience,
        seed=seed,
        resume=resume,
        quiet=ctx.obj["quiet"],
        data=files,
    )
    res = run_training(
        cfg,
        model_spec=model,
        out=out,
        device=device,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        limit_train=limit_train,
        limit_valid=limit_valid,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    from medit.report.render import write_report

    report = write_report(out)
    if not ctx.obj["quiet"]:
        click.echo(
            f"{res['steps']} steps, best {res['best']} at step {res['best_step']}; "
            f"report: {report.resolve()}",
            err=True,
        )
    click.echo(str((Path(out) / "best").resolve()))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Report file (default: RUN_DIR/report.html or report.md).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["html", "md"]), default="html", show_default=True
)
@click.option(
    "--fail-under", is_flag=True, help="Exit 3 when an edit run's verdict fails its thresholds."
)
@_quiet_option
@_user_errors
def report(run_dir, output, fmt, fail_under):
    """Render RUN_DIR (an edit or benchmark run) as a self-contained report."""
    from medit.core.fs import check_writable
    from medit.report.render import load_run, write_report

    check_writable(output or Path(run_dir) / f"report.{fmt}", "-o" if output else "report")
    path = write_report(run_dir, output, fmt)
    click.echo(str(path.resolve()))
    kind, results, _ = load_run(run_dir)
    if fail_under and kind == "edit":
        _gate(results)


def _gate(results: dict) -> None:
    """Exit 3 when an edit run's verdict fails its declared thresholds (--fail-under)."""
    from medit.core.results import verdict

    if not verdict(results)["passed"]:
        click.echo("medit: verdict FAIL against the run's thresholds (--fail-under)", err=True)
        sys.exit(3)


@main.command()
@click.option("--model", default="builtin:smollm2", show_default=True, help="Model spec.")
@click.option(
    "--requests",
    "requests_",
    default="builtin",
    show_default=True,
    help="JSON/JSONL/MedCF/MedFE file, or 'builtin'. Requests without a subject get one detected.",
)
@click.option("--prompt", help="Trace this one prompt (instead of --requests).")
@click.option("--subject", help="The prompt's subject (detected when omitted).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option(
    "--answer",
    type=click.Choice(["predicted", "ground_truth", "target_new"]),
    default="predicted",
    show_default=True,
    help="Answer whose first token is scored: the model's prediction or a request field.",
)
@click.option(
    "--mode",
    type=click.Choice(["full", "fast"]),
    default="full",
    show_default=True,
    help="full: every restoration run (batched); fast: attribution-patching estimate.",
)
@click.option("--fast", is_flag=True, help="Same as --mode fast.")
@click.option("--kinds", default="hidden,mlp,attn", show_default=True, help="Comma-separated.")
@click.option("--samples", default=10, show_default=True, type=int, help="Noise samples.")
@click.option(
    "--noise",
    default="auto",
    show_default=True,
    help="Noise std, or 'auto': 3 x std of the subject embeddings of the request set.",
)
@click.option(
    "--window", default=10, show_default=True, type=int, help="Layers per mlp/attn window."
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--limit", type=int, help="Trace only the first N requests.")
@click.option("--device", default="auto", show_default=True, help=DEVICES)
@click.option("--dtype", type=DTYPES, default="auto", show_default=True)
@click.option("--no-cache", is_flag=True, help="Recompute traces cached on disk.")
@click.option("--overwrite", is_flag=True, help="Replace a trace run directory medit wrote.")
@_quiet_option
@click.pass_context
@_user_errors
@_quantize_option
@_placement_options
def trace(
    ctx,
    model,
    requests_,
    prompt,
    subject,
    out,
    answer,
    mode,
    fast,
    kinds,
    samples,
    noise,
    window,
    seed,
    limit,
    device,
    dtype,
    no_cache,
    overwrite,
    device_map,
    max_memory,
    quantize,
):
    """Causal tracing of the requests' facts; writes RUN_DIR/traces.json and SVG heatmaps."""
    from medit.tracing.run import TraceRunConfig, run_trace
    from medit.tracing.trace import TraceConfig

    if subject and not prompt:
        raise UserError("--subject goes with --prompt")
    mode = "fast" if fast else mode

    try:
        noise_std = None if noise == "auto" else float(noise)
    except ValueError:
        raise UserError(f"--noise must be a number or 'auto', not {noise!r}") from None
    cfg = TraceRunConfig(
        out=out,
        model=model,
        requests=requests_,
        prompt=prompt,
        subject=subject,
        answer=answer,
        limit=limit,
        device=device,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        quantize=quantize,
        use_cache=not no_cache,
        overwrite=overwrite,
        quiet=ctx.obj["quiet"],
        trace=TraceConfig(
            kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
            samples=samples,
            noise=noise_std,
            window=window,
            seed=seed,
            mode=mode,
        ),
    )
    doc = run_trace(cfg)
    if not ctx.obj["quiet"]:
        for item in doc["traces"]:
            peaks = ", ".join(f"{k} {v}" for k, v in item["peak_layers"].items())
            click.echo(
                f"{item['id']}: {item['answer_token']!r} p={item['clean_prob']:.3f} -> "
                f"{item['corrupted_prob']:.3f} corrupted; peak layers: {peaks}",
                err=True,
            )
    click.echo(str(Path(out).resolve()))


def _model_writer(out_help: str):
    """The options of the commands that write a model directory (apply, revert)."""

    def wrap(f):
        for option in reversed(
            (
                click.option(
                    "--out", required=True, type=click.Path(file_okay=False), help=out_help
                ),
                click.option("--device", default="auto", show_default=True, help=DEVICES),
                click.option("--dtype", type=DTYPES, default="auto", show_default=True),
                click.option(
                    "--overwrite",
                    is_flag=True,
                    help="Replace a model directory medit wrote earlier.",
                ),
                _journal_options,
                _quiet_option,
                _user_errors,
            )
        ):
            f = option(f)
        return f

    return wrap


@main.command()
@click.argument("edit", type=click.Path(exists=True))
@click.option(
    "--model",
    default="builtin:smollm2",
    show_default=True,
    help="The base model the edit was made for.",
)
@_model_writer("Directory of the edited model to write.")
def apply(edit, model, out, device, dtype, overwrite, author, reason, workspace):
    """Write the edited model: EDIT (a run directory or artifact) applied to its base --model."""
    from medit.apply import ApplyConfig, apply_edit

    entry = apply_edit(
        ApplyConfig(
            source=edit,
            out=out,
            model=model,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            author=author,
            reason=reason,
            workspace=workspace,
        )
    )
    click.echo(f"edited weights sha256 {entry['result_weights_sha256']}", err=True)
    click.echo(str(Path(out).resolve()))


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@_model_writer("Directory of the restored base model to write.")
def revert(model_dir, out, device, dtype, overwrite, author, reason, workspace):
    """Give back the base model of MODEL_DIR (a model medit saved), bit-exactly."""
    from medit.apply import ApplyConfig, revert_model

    entry = revert_model(
        ApplyConfig(
            source=model_dir,
            out=out,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            author=author,
            reason=reason,
            workspace=workspace,
        )
    )
    click.echo(
        f"base weights sha256 {entry['result_weights_sha256']} (as the edit recorded)", err=True
    )
    click.echo(str(Path(out).resolve()))


@main.group("journal")
def journal_group():
    """The edit journal: every edit, apply and revert, hash-chained."""


def _journal_path(where: str) -> Path:
    from medit.artifacts.journal import JOURNAL_FILE

    path = Path(where)
    if path.is_dir():
        path = path / JOURNAL_FILE
    if not path.is_file():
        raise UserError(
            f"no edit journal at {where} (expected a workspace directory holding "
            f"{JOURNAL_FILE}, or the journal file)"
        )
    return path


@journal_group.command("show")
@click.argument("workspace", default=".", type=click.Path(exists=True))
@click.option("--run", "run_dir", type=click.Path(), help="Only the entries of this run directory.")
@click.option("--json", "as_json", is_flag=True, help="The entries as JSON lines.")
@_user_errors
def journal_show(workspace, run_dir, as_json):
    """The journal of WORKSPACE (a directory or journal file), oldest entry first."""
    from medit.artifacts import journal

    path = _journal_path(workspace)
    entries = journal.entries_for_run(path, run_dir) if run_dir else journal.read(path)
    if as_json:
        for e in entries:
            click.echo(json.dumps(e, ensure_ascii=False))
    else:
        click.echo(journal.format_entries(entries))


@journal_group.command("verify")
@click.argument("workspace", default=".", type=click.Path(exists=True))
@click.option("--head", help="The head hash you hold: also detects removed last entries.")
@_user_errors
def journal_verify(workspace, head):
    """Check the hash chain; exit 3 naming every edited, removed or reordered entry."""
    from medit.artifacts import journal

    path = _journal_path(workspace)
    problems = journal.verify(path, expected_head=head)
    if problems:
        for p in problems:
            click.echo(f"medit: journal: {p}", err=True)
        sys.exit(3)
    n = len(journal.read(path))
    click.echo(f"{path}: {n} entries, chain intact; head {journal.head(path)}")


@main.command()
def models():
    """Builtin models and the models materialised in the cache."""
    from medit.core.cache import cache_dir
    from medit.core.models import BUILTIN_MODELS, builtin_gguf_path, cached_models

    click.echo("builtin models:")
    for name, b in BUILTIN_MODELS.items():
        try:
            where = str(builtin_gguf_path(name))
        except ValueError:
            where = f"not installed ({b.install})"
        click.echo(f"  builtin:{name:10s} {b.name}  [{where}]")
    click.echo(f"cache: {cache_dir()}")
    for m in cached_models():
        click.echo(f"  {m['name']}  {m['size_mb']} MB  {m['path']}")


@main.command()
@click.argument("name", required=False)
@click.option("--model", default=None, help="Also say which defaults apply to this model.")
@_user_errors
def methods(name, model):
    """Editors, their hyper-parameters, presets and per-family / per-size defaults."""
    from medit.editors.registry import METHODS, get_editor_class

    for method in [name] if name else list(METHODS):
        cls = get_editor_class(method)
        modes = ["single", *(["batch"] if cls.capabilities.batch else []), "sequential"]
        click.echo(f"{method}: {cls.summary}  [modes: {', '.join(modes)}]")
        for field, default, help_text in cls.hparams_class.describe():
            click.echo(f"    {field:18s} {default!r:14s} {help_text}")
        for preset in cls.hparams_class.PRESETS:
            click.echo(f"    preset {preset}: {cls.hparams_class.PRESETS[preset]}")
        for row in cls.hparams_class.DEFAULTS:
            click.echo(f"    defaults for {row.describe()}")
        if model:
            from medit.core.arch import get_arch, parameter_count
            from medit.core.models import load_config

            config = load_config(model)
            n = parameter_count(config)
            rows = cls.hparams_class.defaults_for(get_arch(config).family, n)
            applied = "; ".join(r.describe() for r in rows) or "the field defaults only"
            click.echo(f"    for {model} (~{n / 1e6:.0f}M parameters): {applied}")


if __name__ == "__main__":  # pragma: no cover
    main()
