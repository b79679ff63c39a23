"""``kvpolicy`` command line: ``kvpolicy compare`` runs policies over quality tasks on a model.

Why errors look the way they do: the usual mistakes (a wrong path, a typo in a policy name,
a ratio of 54 instead of 0.54) deserve one line saying what to do, not a traceback, and a
distinct exit status (2) that scripts can test.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

#: pyramidinfer runs as users meet it, its ratio form (configs/pyramidinfer_ratio.yaml's shape) at the same
#: ratio as the others, so the table compares equal KV budgets
DEFAULT_POLICIES = "full,pyramidinfer,h2o,streamingllm,snapkv,random"
DEFAULT_TASKS = "ppl,needle,agreement"
DEFAULT_RATIO = 0.54
SWEEP_RATIOS = "0.2,0.4,0.6,0.8"
#: ``--suite``: a named set of tasks, and the ratios it runs at unless --ratio/--ratios say otherwise
SUITES = {"ruler": ("ruler", "0.25,0.5,0.75,0.9")}
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _ratios(text: str) -> list[float]:
    try:
        return [float(p) for p in _csv(text)]
    except ValueError:
        raise UsageError(
            f"ratios must be numbers in [0, 1) separated by commas, got {text!r}; e.g. --ratios 0.2,0.4"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvpolicy", description="KV-cache compression policies for Hugging Face transformers.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, help_text in (
        ("compare", "compare policies on quality tasks, KV memory and speed"),
        ("sweep", "compare at several compression ratios (default 0.2,0.4,0.6,0.8), saving JSON and a plot"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--model", help="model folder, .gguf file, or an embedded model: smollm2-135m "
                                       "(SmolLM2-135M-Instruct, the default) or gemma3-270m (Gemma 3 270M)")
        p.add_argument("--policies", default=DEFAULT_POLICIES,
                       help=f"comma-separated policies (default: {DEFAULT_POLICIES}); "
                            "'full' always runs first as the reference")
        p.add_argument("--config",
                       help="preset name or YAML/JSON file with a 'policy' key: the settings of that policy")
        p.add_argument("--ratio", type=float,
                       help="compression_ratio of every policy that takes one (pyramidinfer included) and of "
                            f"presets, in [0, 1) (default: {DEFAULT_RATIO})")
        p.add_argument("--ratios", help="comma-separated ratios: run every policy that takes a compression_ratio "
                                        "at each (sweep mode)"
                       + (f"; default {SWEEP_RATIOS}" if name == "sweep" else "; default with --suite ruler: "
                          + SUITES["ruler"][1]))
        p.add_argument("--kv-dtype", default="auto",
                       help="how the caches store kept keys/values, comma-separated to run each policy at each: "
                            "auto (the model's dtype), int8, fp8 (8-bit codes and a scale per vector, about half "
                            "the bytes), int4 (4-bit codes per group of 32 channels, 0.31 of 16-bit; no decode "
                            "kernel: dequantize + SDPA); docs/kv-dtype.md; full at auto stays the reference "
                            "(default: auto)")
        p.add_argument("--tasks", help=f"comma-separated tasks: ppl, needle, agreement, ruler "
                                       f"(default: {DEFAULT_TASKS})")
        p.add_argument("--sizes", default="sweep" if name == "sweep" else "small",
                       help="size preset: tiny, small, sweep, needle, large (default: %(default)s)")
        add_input_arguments(p)
        p.add_argument("--json", dest="json_path",
                       help="write the results (meta block and rows, docs/cli.md) to this file")
        p.add_argument("--plot", help="write a PNG: kept tokens per layer, and quality vs KV reduction")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """The options that decide a run's inputs (suite, lengths, samples, seed, where the question goes)
    and where it runs. Shared with ``benchmarks/kvpress_compare.py``, so that the same flags give
    both tools the very same samples (:func:`build_sizes`)."""
    p.add_argument("--suite", choices=sorted(SUITES),
                   help="run a task suite instead of --tasks: 'ruler' (RULER-style long-context tasks, "
                        "score vs KV removed at ratios 0.25,0.5,0.75,0.9 unless --ratio/--ratios)")
    p.add_argument("--ruler-tasks",
                   help="comma-separated RULER tasks (default: the calibrated default suite; see docs/cli.md)")
    p.add_argument("--samples", type=int, help="ruler: samples per task and context length (overrides --sizes)")
    p.add_argument("--texts", choices=texts_choices(), default="auto",
                   help="the prose of the tasks: 'austen' (Jane Austen's novels, Debian's r-cran-janeaustenr), "
                        "'python-docs' (the Python language reference, ships with Python) or 'auto': the novels "
                        "where installed, else the Python docs (default: %(default)s)")
    p.add_argument("--haystack", help="ruler: a UTF-8 text file to hide the needles in (default: the --texts)")
    p.add_argument("--context",
                   help="tokens of the ppl prefix and agreement prompts (overrides --sizes); with the ruler "
                        "suite, its context lengths in the model's tokens, comma-separated (e.g. 2048,4096)")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per agreement prompt (overrides --sizes)")
    p.add_argument("--batch-size", type=int, help="sequences per forward (default: 1)")
    p.add_argument("--prefill-rows", type=int,
                   help="run a batch's prefill this many rows at a time (default: the whole batch)")
    p.add_argument("--question", choices=["in-prompt", "after-context"], default="in-prompt",
                   help="needle and ruler tasks: compress the prompt with the question in it (default), or "
                        "compress the document alone and ask the question after it on the same cache")
    p.add_argument("--seed", type=int, help="seed of the inputs (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: float32)")


def texts_choices() -> tuple[str, ...]:
    from .evaluation.texts import CHOICES

    return CHOICES


def _check_output(path: str | None, flag: str, suffix: str | None = None) -> None:
    """An output path that cannot be written fails now, before the model loads, not after the first
    policy's minutes of work: a missing folder, a folder given as the file, a file or folder without
    write permission (tried by opening the file for appending, which leaves an existing file as it is
    and removes one it had to create)."""
    if path is None:
        return
    target = Path(path)
    parent = target.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{flag}: folder {str(parent)!r} does not exist; create it or pick another path")
    if target.is_dir():
        raise UsageError(f"{flag}: {path!r} is a folder; give a file name in it, e.g. {flag} "
                         f"{str(target / ('results' + (suffix or '.json')))!r}")
    if suffix and target.suffix.lower() != suffix:
        raise UsageError(f"{flag}: {path!r} should end in {suffix}")
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as err:
        raise UsageError(f"{flag}: cannot write {path!r} ({err.strerror or err}); pick a path you can write, "
                         "or fix the folder's permissions") from None
    if not existed:
        target.unlink(missing_ok=True)


def _positive(flag: str, text: str) -> list[int]:
    try:
        values = [int(p) for p in _csv(text)]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{flag} must be a positive integer (or, for --context with the ruler suite, several "
                         f"separated by commas), got {text!r}")
    return values


def tasks_of(args: argparse.Namespace) -> list[str]:
    """The tasks asked for: the suite's, or ``--tasks`` (default :data:`DEFAULT_TASKS`)."""
    if args.suite and args.tasks:
        raise UsageError(f"give --suite {args.suite} or --tasks, not both (--tasks ruler,ppl mixes them)")
    return [SUITES[args.suite][0]] if args.suite else _csv(args.tasks or DEFAULT_TASKS)


def _ruler_sizes(args: argparse.Namespace, contexts: list[int] | None, sizes: Any) -> dict[str, Any]:
    """The ruler suite's sizes from the options, validated now (a bad task or length fails before
    the model loads)."""
    from .evaluation.ruler import Haystack, ruler_config

    tasks = tuple(_csv(args.ruler_tasks)) if args.ruler_tasks else None
    changes = {"ruler_tasks": tasks, "ruler_lengths": tuple(contexts) if contexts else None,
               "ruler_samples": args.samples, "ruler_haystack": args.haystack}
    merged = sizes.replace(**changes)
    ruler_config(tasks=merged.ruler_tasks, lengths=merged.ruler_lengths, samples=merged.ruler_samples,
                 seed=merged.seed, haystack=merged.ruler_haystack, texts=args.texts)
    if merged.ruler_haystack is not None:
        Haystack.from_file(merged.ruler_haystack)
    return changes


def build_sizes(args: argparse.Namespace, task_names: list[str]) -> Any:
    """The run's :class:`~kvpolicy.evaluation.tasks.EvalSizes`: the ``--sizes`` preset with the input
    options (:func:`add_input_arguments`) applied, validated before any model work. ``kvpolicy compare``
    and ``benchmarks/kvpress_compare.py`` both build their sizes here, so the same flags give them the
    very same samples."""
    from .evaluation import texts
    from .evaluation.tasks import PRESETS

    if args.sizes not in PRESETS:
        raise UsageError(f"unknown size preset {args.sizes!r}; choose from {', '.join(PRESETS)}")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--samples", args.samples), ("--prefill-rows", args.prefill_rows)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    contexts = _positive("--context", args.context) if args.context is not None else None
    ruler = "ruler" in task_names
    if contexts and len(contexts) > 1 and (not ruler or len(task_names) > 1):
        raise UsageError("--context takes several lengths only for the ruler suite alone (--suite ruler)")
    if not ruler and (args.ruler_tasks or args.samples or args.haystack):
        raise UsageError("--ruler-tasks, --samples and --haystack are options of the ruler suite; add --suite ruler")
    sizes = PRESETS[args.sizes].replace(seed=args.seed)
    changes: dict[str, Any] = {}
    if ruler:
        changes = _ruler_sizes(args, contexts, sizes)
    choice = args.texts
    if any(t != "ruler" for t in task_names) or sizes.replace(**changes).ruler_haystack is None:
        # the texts must be there before we spend time loading a model; ``auto`` is recorded as what it chose
        choice = texts.source(args.texts).name
    single = contexts[0] if contexts and not ruler else None
    return sizes.replace(
        texts=choice,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        ppl_prefix=single,
        agreement_prompt_tokens=single,
        question=args.question.replace("-", "_"),
        prefill_rows=args.prefill_rows,
        **changes,
    )


def check_device(device: str) -> None:
    """A CUDA device where CUDA is not available is a usage error, found before the model loads."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything that needs no model; returns the pieces of the run."""
    from .evaluation.runner import build_specs
    from .evaluation.tasks import TASKS
    from .models import EMBEDDED_MODELS, resolve_model

    task_names = tasks_of(args)
    unknown = [t for t in task_names if t not in TASKS]
    if unknown or not task_names:
        raise UsageError(f"unknown task {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(TASKS)} (e.g. --tasks ppl,needle)")
    sizes = build_sizes(args, task_names)
    ratios_text = args.ratios or (SWEEP_RATIOS if args.command == "sweep" else None)
    if args.suite and not ratios_text and args.ratio is None:
        ratios_text = SUITES[args.suite][1]
    ratios = _ratios(ratios_text) if ratios_text else [DEFAULT_RATIO if args.ratio is None else args.ratio]
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad:
        flag = "--ratios" if args.ratios or args.command == "sweep" else "--ratio"
        raise UsageError(f"{flag} {bad[0]:g} is outside [0, 1): it is the share of tokens evicted, e.g. {flag} 0.54")
    policies = _csv(args.policies)
    if not policies:
        raise UsageError("--policies is empty; e.g. --policies full,pyramidinfer,h2o")
    kv_dtypes = tuple(_csv(args.kv_dtype))
    if not kv_dtypes:
        raise UsageError("--kv-dtype is empty; e.g. --kv-dtype auto,int8")
    specs = build_specs(policies, ratios, args.config, kv_dtypes)
    if args.model in EMBEDDED_MODELS:
        resolve_model(args.model)  # installed (and, for gemma3-270m, assembled) before any model work
    elif args.model is not None:
        path = Path(args.model)
        if not path.exists():
            raise UsageError(f"--model {args.model!r} does not exist; pass a model folder, a .gguf file or an "
                             f"embedded model ({', '.join(EMBEDDED_MODELS)}), or omit --model for the default")
        if path.is_file() and path.suffix != ".gguf":
            raise UsageError(f"--model {args.model!r} is a file but not a .gguf; pass a model folder or a .gguf file")
    _check_output(args.json_path, "--json")
    _check_output(args.plot, "--plot", ".png")
    check_device(args.device)
    return {"tasks": task_names, "specs": specs, "sizes": sizes}


def texts_note(args: argparse.Namespace, sizes: Any) -> str | None:
    """The line saying that ``--texts auto`` fell back from the novels (what a run used is never silent)."""
    from .evaluation import texts

    if sizes.texts == texts.AUTO:  # no task reads the texts (the suite on a --haystack file)
        return None
    return texts.fell_back(args.texts, texts.SOURCES[sizes.texts])


def compare(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .evaluation.runner import run_compare
    from .models import load_model

    started = time.time()
    plan = _prepare(args)
    plan["started"] = started
    err = Console(stderr=True)
    note = texts_note(args, plan["sizes"])
    if note:
        err.print(note, style="yellow", highlight=False, soft_wrap=True)
    if not args.quiet:
        err.print(f"[dim]loading {args.model or 'default model (SmolLM2-135M-Instruct GGUF)'}...[/dim]")
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if not args.quiet and "ruler" in plan["tasks"]:
        err.print("[dim]generating the ruler suite's samples...[/dim]")
    total = [len(plan["specs"]) * len(plan["tasks"])]  # until the tasks say how many units they have
    on_row = _partial_writer(args, plan)
    if not args.quiet and not err.is_terminal:  # a log file: one line per step instead of a bar
        done = [0]

        def log_step() -> None:
            done[0] += 1
            err.print(f"[{done[0]}/{total[0]}] {current[0]}", highlight=False)

        current = [""]
        rows = run_compare(model, tokenizer, plan["specs"], plan["tasks"], plan["sizes"],
                           progress=lambda d: current.__setitem__(0, d), on_step=log_step,
                           on_total=lambda n: total.__setitem__(0, n), on_row=on_row)
        return _finish(args, plan, rows)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, disable=args.quiet, transient=False,
    ) as bar:
        job = bar.add_task("compare", total=total[0])
        rows = run_compare(
            model, tokenizer, plan["specs"], plan["tasks"], plan["sizes"],
            progress=lambda d: bar.update(job, description=d),
            on_step=lambda: bar.advance(job),
            on_total=lambda n: bar.update(job, total=n),
            on_row=on_row,
        )
    return _finish(args, plan, rows)


def _partial_writer(args: argparse.Namespace, plan: dict[str, Any]):
    """With ``--json``: write the rows finished so far after each policy (``meta.partial: true``), so a run
    stopped early (a time limit, an error in a later policy) keeps them; the end of the run rewrites the file."""
    if not args.json_path:
        return None
    from .evaluation import report

    return lambda rows: report.save_json(rows, args.json_path, {**results_meta(args, plan), "partial": True})


def _finish(args: argparse.Namespace, plan: dict[str, Any], rows: list[dict[str, Any]]) -> int:
    from rich.console import Console

    from .evaluation import report

    out = Console() if sys.stdout.isatty() else Console(width=200)
    report.print_table(rows, plan["tasks"], out)
    if args.json_path:
        report.save_json(rows, args.json_path, results_meta(args, plan))
    if args.plot:
        report.plot(rows, plan["tasks"], args.plot)
    return 0


def results_meta(args: argparse.Namespace, plan: dict[str, Any]) -> dict[str, Any]:
    """The ``meta`` block of a ``--json`` file: :func:`kvpolicy.provenance.run_meta` (command,
    argv, commit and dirty flag, versions, machine and threads, date) plus this run's settings."""
    from .provenance import run_meta

    return run_meta(
        ["kvpolicy", *args.argv],
        tool=f"kvpolicy {args.command}",
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        tasks=plan["tasks"],
        suite=args.suite,
        sizes_preset=args.sizes,
        sizes=dataclasses.asdict(plan["sizes"]),
        texts=texts_title(plan["sizes"]),
        labels=[spec.label for spec in plan["specs"]],
        wall_s=round(time.time() - plan["started"], 1),
    )


def texts_title(sizes: Any) -> str | None:
    """What the run's prose was (``meta.texts``): the source's title, or None when no task read it."""
    from .evaluation import texts

    return texts.SOURCES[sizes.texts].title if sizes.texts in texts.SOURCES else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvpolicy`` console script and ``python -m kvpolicy``."""
    from .core.errors import KVPolicyError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return compare(args)
    except (UsageError, KVPolicyError) as err:
        print(f"kvpolicy: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kvpolicy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
