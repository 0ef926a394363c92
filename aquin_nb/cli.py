"""The ``aquin-nb`` command line. It calls the package's verbs; it never reimplements them.

Heavy imports (torch, SAELens) happen inside the commands, so ``aquin-nb --help``
answers at once. Bad input exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._cli_commands import (
    _cmd_capture,
    _cmd_dashboards,
    _cmd_demo,
    _cmd_import_explanations,
    _cmd_model_diff,
    _cmd_models,
    _cmd_pull_sae,
    _cmd_sae_align,
    _cmd_sae_diff,
    _cmd_sae_train,
    _cmd_serve,
    _cmd_simulate,
    _cmd_watch,
    restore_library_loaders,
)
from ._errors import AquinError

CONTEXT_HELP = (
    "tokens per window, BOS included, for {what} (default: the SAE's context size, else 1024; "
    "never above the model's maximum)"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage block: the CLI's contract for bad input.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _finite_float(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _tracking_flags(parser: Any) -> None:
    """Which features a trajectory keeps rows for (see SaeTrajectory)."""
    parser.add_argument(
        "--top-k", type=_count, help="each step's top features by |Δ| that get rows (default 16)"
    )
    parser.add_argument(
        "--max-features", type=_count, help="at most this many features get rows (default 256)"
    )


def _count(text: str) -> int:
    """An argparse type: a whole number of rows, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; give 0 or more")
    return value


def _verb_parser(
    verbs: Any, name: str, help: str, run: Callable[[argparse.Namespace], None], *, top: int
) -> argparse.ArgumentParser:
    """A verb's subcommand with the flags every verb shares, declared once."""
    parser: argparse.ArgumentParser = verbs.add_parser(name, help=help)
    parser.set_defaults(run=run, verb_name=name)
    shared = parser.add_argument_group("output")
    shared.add_argument("--output", metavar="JSON", help="write the result JSON here")
    shared.add_argument(
        "--html", metavar="FILE", help="write the result's card as a self-contained HTML page"
    )
    shared.add_argument(
        "--top", type=_count, default=top, help=f"rows in each printed table (default {top})"
    )
    shared.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    shared.add_argument(
        "--sync",
        action="store_true",
        help="mirror this run to the session $AQUIN_NB_SESSION on $AQUIN_NB_URL "
        "(on by default when AQUIN_NB_URL is set)",
    )
    return parser


def _connect_mirror(args: argparse.Namespace) -> Any:
    """``--sync``, or AQUIN_NB_URL in the environment: mirror this verb's run."""

    from . import mirror

    if not hasattr(args, "sync") or not (args.sync or os.environ.get(mirror.ENV_URL)):
        return None
    return mirror.connect(os.environ.get(mirror.ENV_SESSION) or "cli")


def _one_line_warning(
    message: Any, category: type[Warning], filename: str, *_: Any, **__: Any
) -> None:
    """The project's own warnings as one stderr line each; other libraries' go to the log.

    A third-party deprecation notice (transformers, PEFT, SAELens) is not the
    user's business at the command line, so it is logged at DEBUG (``-v`` shows it).
    """
    own = category.__module__.startswith("aquin_nb") or Path(filename).resolve().is_relative_to(
        Path(__file__).resolve().parent
    )
    if own:
        sys.stderr.write(f"aquin-nb: warning: {message}\n")
    else:
        logging.getLogger("aquin_nb.cli").debug("%s: %s", category.__name__, message)


def _model_flags(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """``--device`` and ``--dtype``, for every command that runs a model."""
    if device:
        parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        help="float32 (default), bfloat16 or float16 for the model; refused where the "
        "device cannot run it",
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="aquin-nb",
        description="See what a fine-tune changed inside a language model, in SAE features.",
    )
    parser.add_argument("--version", action="version", version=f"aquin-nb {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    models = commands.add_parser("models", help="list the model catalog")
    models.set_defaults(run=_cmd_models)

    pull = commands.add_parser("pull", help="fetch and cache public artifacts")
    pull_kinds = pull.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
    pull_sae = pull_kinds.add_parser("sae", help="fetch a catalog model's public SAE")
    pull_sae.add_argument("slug", help="catalog slug, see `aquin-nb models`")
    pull_sae.add_argument("--layer", type=int, help="layer (default: the catalog's)")
    pull_sae.set_defaults(run=_cmd_pull_sae)

    model = commands.add_parser("model", help="SAE-free verbs: diff")
    model_verbs = model.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    model_diff = _verb_parser(
        model_verbs,
        "diff",
        "where a fine-tune acts, without an SAE: per-token KL, layer drift, promoted "
        "tokens, weight diff",
        _cmd_model_diff,
        top=15,
    )
    model_diff.add_argument("--model", required=True, help="catalog slug or local model directory")
    model_diff.add_argument(
        "--checkpoint",
        required=True,
        help="{step, state_dict} .pt, state dict, .safetensors, HF directory or PEFT adapter",
    )
    model_diff.add_argument("--prompts", help="JSON array or JSONL (default: the shipped probes)")
    model_diff.add_argument("--name", help="label for the checkpoint (default: its file stem)")
    model_diff.add_argument("--batch-size", type=int, default=16)
    _model_flags(model_diff)

    sae = commands.add_parser("sae", help="SAE verbs: diff, train, align")
    sae_verbs = sae.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    diff = _verb_parser(
        sae_verbs,
        "diff",
        "per-feature activation deltas between a base model and a checkpoint, "
        "or every checkpoint of a run (a trajectory)",
        _cmd_sae_diff,
        top=20,
    )
    diff.add_argument("--model", required=True, help="catalog slug or local model directory")
    diff.add_argument(
        "--checkpoint",
        required=True,
        help="{step, state_dict} .pt, state dict, .safetensors, HF directory or PEFT adapter; "
        "a run directory (checkpoints/step_<N>.pt) or a quoted glob gives a trajectory",
    )
    diff.add_argument(
        "--prompts",
        help="JSON array or JSONL of strings or {instruction, response} rows "
        "(default: the shipped probe set)",
    )
    diff.add_argument("--layer", type=int, help="SAE layer (default: the catalog's)")
    diff.add_argument(
        "--sae", help="custom SAE: SAELens directory, .pt {cfg, state_dict}, RELEASE:SAE_ID or slug"
    )
    diff.add_argument("--name", help="label for the checkpoint (default: its file stem)")
    diff.add_argument("--batch-size", type=int, default=16)
    diff.add_argument(
        "--fdr", type=_finite_float, default=0.05, help="false-discovery rate for 'changed'"
    )
    diff.add_argument(
        "--min-rel-delta",
        type=_finite_float,
        default=0.1,
        help="minimum |Δ| relative to max(base, checkpoint) for 'changed'",
    )
    diff.add_argument(
        "--fit",
        choices=["fast", "full", "off"],
        default="fast",
        help="downstream fit (CE loss recovered) on the first 8 prompts, all, or none",
    )
    _model_flags(diff)
    run = diff.add_argument_group("a run of checkpoints (trajectory)")
    run.add_argument(
        "--backend",
        choices=["local", "ray"],
        help="local (default) or ray: checkpoints and prompt shards as Ray tasks "
        "(joins $RAY_ADDRESS when set)",
    )
    run.add_argument("--prompt-shards", type=int, help="prompt shards per checkpoint (ray)")
    run.add_argument("--metrics", help="metrics JSONL to plot (default: the run's metrics.jsonl)")
    _tracking_flags(run)

    train = _verb_parser(
        sae_verbs, "train", "train a temporary SAE on a checkpoint", _cmd_sae_train, top=10
    )
    train.add_argument("--model", required=True, help="catalog slug or local model directory")
    train.add_argument("--layer", type=int, required=True)
    train.add_argument("--checkpoint", help="train on this checkpoint's activations")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--activations", help="a capture directory (aquin-nb capture)")
    source.add_argument("--prompts", help="a prompts/corpus file (default: the shipped corpus)")
    train.add_argument(
        "--sae", help="SAE to warm-start from and read like (default: the catalog's public one)"
    )
    train.add_argument("--init-from", choices=["public", "scratch"], default="public")
    train.add_argument("--architecture", choices=["standard", "topk"], default="standard")
    train.add_argument("--d-sae", type=int, help="dictionary width (a warm start keeps the public)")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int)
    budget.add_argument("--tokens", type=int)
    train.add_argument("--quick", action="store_true", help="a smoke run on 120k tokens")
    train.add_argument("--name", help="run name (default: the checkpoint's stem)")
    train.add_argument(
        "--out-dir", help="where the trained SAE goes (default ~/.aquin_nb/sae/user/...)"
    )
    train.add_argument("--context-size", type=int, help=CONTEXT_HELP.format(what="corpus windows"))
    _model_flags(train)
    train.add_argument("--json", help=argparse.SUPPRESS)  # deprecated spelling of --output

    boards = _verb_parser(
        sae_verbs,
        "dashboards",
        "feature dashboards over a corpus: top contexts, density, histogram, logit lens, label",
        _cmd_dashboards,
        top=25,
    )
    boards.add_argument("--model", required=True, help="catalog slug or local model directory")
    boards.add_argument("--sae", help="the SAE (default: the model's public SAE)")
    boards.add_argument("--layer", type=int, help="SAE layer (default: the catalog's)")
    boards.add_argument(
        "--corpus", help="JSON/JSONL/text file (default: the shipped corpus and the probes)"
    )
    boards.add_argument("--checkpoint", help="also compute them on this checkpoint")
    boards.add_argument("--k", type=int, default=10, help="top contexts kept per feature")
    _model_flags(boards)
    boards.add_argument(
        "--feature", type=int, action="append", help="print this feature's dashboard (repeatable)"
    )

    explain = sae_verbs.add_parser(
        "import-explanations", help="read a Neuronpedia explanations export into the cache"
    )
    explain.add_argument("file", help="JSON or JSONL rows: modelId, layer, index, description")
    explain.add_argument("--sae", help="the SAE they explain (its neuronpedia_id is checked)")
    explain.add_argument("--layer", type=int, help="layer of --sae")
    explain.add_argument("--neuronpedia-id", help="MODEL/SAE_ID when the SAE carries none")
    explain.set_defaults(run=_cmd_import_explanations)

    align = _verb_parser(
        sae_verbs,
        "align",
        "Hungarian matching of two SAEs' decoder directions",
        _cmd_sae_align,
        top=10,
    )
    align.add_argument("--sae-a", required=True, help="SAE A: directory, .pt, RELEASE:ID or slug")
    align.add_argument("--sae-b", required=True, help="SAE B: directory, .pt, RELEASE:ID or slug")
    align.add_argument(
        "--max-features", type=int, help="align at most N features per side (chosen by gain)"
    )
    align.add_argument("--method", choices=["auto", "dense", "sparse"], default="auto")
    align.add_argument("--force", action="store_true", help="align SAEs of different hooks")

    capture = _verb_parser(
        commands, "capture", "write residual activations to disk", _cmd_capture, top=25
    )
    capture.add_argument("--out-dir", help="the directory the activation shards go to")
    capture.add_argument("--model", default="tiny-gpt2", help="catalog slug or model directory")
    capture.add_argument("--checkpoint", help="capture the checkpoint (default: the base model)")
    capture.add_argument("--prompts", help="JSON or JSONL prompts file")
    capture.add_argument(
        "--count", type=int, help="without --prompts, draw N probes from the shipped probe set"
    )
    capture.add_argument("--layers", default="all", help="comma list or 'all'")
    capture.add_argument("--position", choices=["last", "mean", "all"], default="all")
    capture.add_argument(
        "--encode-sae",
        action="store_true",
        help="also write the public SAE's features for --sae-layer",
    )
    capture.add_argument("--sae-layer", type=int, help="layer for --encode-sae")
    capture.add_argument("--sae", help="SAE for --encode-sae (default: the public one)")
    capture.add_argument("--name", help="label for the checkpoint")
    capture.add_argument("--output-json", action="store_true", help="print the result JSON")
    capture.add_argument("--overwrite", action="store_true", help="write into a non-empty dir")
    capture.add_argument("--context-size", type=int, help=CONTEXT_HELP.format(what="prompts"))
    _model_flags(capture)

    sim = _verb_parser(
        commands,
        "simulate",
        "forecast a fine-tune (NTK-linearised) and diff it",
        _cmd_simulate,
        top=10,
    )
    sim.add_argument("--model", required=True, help="catalog slug or local model directory")
    sim.add_argument(
        "--data", required=True, help="JSONL of {instruction, response}, {text} or strings"
    )
    sim.add_argument("--lr", type=float, default=0.002, help="gradient-descent learning rate")
    sim.add_argument("--steps", type=int, default=100)
    sim.add_argument("--batch-size", type=int, default=8)
    sim.add_argument("--layer", type=int, help="SAE layer (default: the catalog's)")
    sim.add_argument("--sae", help="custom SAE instead of the public one")
    sim.add_argument("--name", help="label for the synthetic checkpoint")
    sim.add_argument(
        "--checkpoint-out", help="synthetic checkpoint path (default simulations/<name>.pt)"
    )
    sim.add_argument(
        "--params",
        help="regex of parameter names to move (default: attention "
        "and MLP weights of the blocks before the SAE layer)",
    )
    sim.add_argument(
        "--exact-linear",
        action="store_true",
        help="T steps of GD on the linearised model (jvp/vjp) instead",
    )
    sim.add_argument("--curvature", choices=["fisher", "hutchinson"], default="fisher")
    _model_flags(sim, device=False)
    sim.add_argument(
        "--context-size",
        type=int,
        help="tokens per training row (default 1024, or the model's maximum if smaller)",
    )

    watch = _verb_parser(
        commands,
        "watch",
        "diff each new checkpoint of a training run as it is written (Ctrl-C stops)",
        _cmd_watch,
        top=10,
    )
    watch.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (or its checkpoints/)")
    watch.add_argument("--model", required=True, help="catalog slug or local model directory")
    watch.add_argument("--prompts", help="prompts file (default: the shipped probe set)")
    watch.add_argument("--layer", type=int, help="SAE layer (default: the catalog's)")
    watch.add_argument("--sae", help="custom SAE instead of the public one")
    watch.add_argument("--name", help="label for the run (default: the directory's name)")
    watch.add_argument(
        "--poll", type=_seconds, default=2.0, help="seconds between looks (default 2)"
    )
    watch.add_argument(
        "--idle-timeout",
        type=_seconds,
        help="stop after this many seconds without a new checkpoint (default: run until Ctrl-C)",
    )
    watch.add_argument("--metrics", help="metrics JSONL to plot (default RUN_DIR/metrics.jsonl)")
    watch.add_argument("--batch-size", type=int, default=16)
    watch.add_argument("--fdr", type=_finite_float, default=0.05)
    watch.add_argument("--min-rel-delta", type=_finite_float, default=0.1)
    _model_flags(watch)
    _tracking_flags(watch)

    serve = commands.add_parser(
        "serve", help="run the web mirror receiver (session pages, SQLite, token)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument(
        "--db", help="SQLite file (default $AQUIN_NB_DB or ~/.local/share/aquin_nb/mirror.sqlite)"
    )
    serve.add_argument("--token", help="use this token instead of the stored one")
    serve.set_defaults(run=_cmd_serve)

    demo = commands.add_parser(
        "demo", help="fine-tune the embedded model with LoRA and diff it (offline)"
    )
    demo.add_argument("--out", default="demo_out", help="output directory")
    demo.add_argument("--steps", type=int, default=120, help="LoRA fine-tuning steps")
    demo.add_argument("--top", type=_count, default=15, help="rows in the printed table")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a bad flag (one line already written)
        return exit_.code if isinstance(exit_.code, int) else 2
    run: Callable[[argparse.Namespace], None] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 0
    # aquin_nb's log lines go to stderr as `aquin-nb: warning: ...`, like its other warnings.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "%(levelname)s %(name)s: %(message)s"
            if args.verbose
            else "aquin-nb: warning: %(message)s"
        )
    )
    package_logger = logging.getLogger("aquin_nb")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    shown_before, warnings.showwarning = warnings.showwarning, _one_line_warning  # one line each
    session = None
    try:
        session = _connect_mirror(args)
        run(args)
    except AquinError as error:
        sys.stderr.write(f"aquin-nb: error: {error}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("aquin-nb: interrupted\n")
        return 130
    finally:
        if session is not None:
            session.close(timeout=5.0)
        package_logger.removeHandler(handler)
        warnings.showwarning = shown_before
        restore_library_loaders()
    return 0


if __name__ == "__main__":
    sys.exit(main())
