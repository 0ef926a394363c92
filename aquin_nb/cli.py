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

from ._errors import AquinError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage block: the CLI's contract for bad input.
        self.exit(2, f"{self.prog}: error: {message}\n")


def say(text: str = "") -> None:
    """The one place the CLI prints results."""
    print(text, flush=True)


def _finite_float(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _count(text: str) -> int:
    """An argparse type: a whole number of rows, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; give 0 or more")
    return value


def _deprecated(message: str) -> None:
    sys.stderr.write(f"aquin-nb: warning: {message} (deprecated; removed in the next release)\n")


def _split_legacy_output(
    args: argparse.Namespace, new_flag: str, suffixes: tuple[str, ...]
) -> None:
    """``--output`` used to name a directory or checkpoint for some verbs; now it is the JSON.

    A value that does not end in ``.json`` and matches the old meaning (no suffix
    for a directory, ``suffixes`` for a file) keeps working for one release.
    """
    output = args.output
    if output is None or output.endswith(".json"):
        return
    old_meaning = Path(output).suffix in suffixes if suffixes else Path(output).suffix == ""
    if old_meaning and getattr(args, new_flag) is None:
        _deprecated(f"--output {output} for {args.verb_name}: use --{new_flag.replace('_', '-')}")
        setattr(args, new_flag, output)
        args.output = None


def _check_outputs(args: argparse.Namespace, *inputs: Any) -> None:
    """Refuse, before any work, outputs that would lose something: a directory named as
    the result JSON, or an output that is one of the inputs."""
    sources = [Path(str(p)).expanduser() for p in inputs if isinstance(p, (str, Path))]
    for flag in ("output", "html", "checkpoint_out"):
        value = getattr(args, flag, None)
        if not value:
            continue
        target = Path(value).expanduser()
        name = "--" + flag.replace("_", "-")
        if target.is_dir():
            raise AquinError(f"{name} {value} is a directory; give a file path")
        for source in sources:
            if source.exists() and target.exists() and os.path.samefile(source, target):
                raise AquinError(f"{name} {value} is the input {source}; refusing to overwrite it")
            if target.resolve() == source.resolve():
                raise AquinError(f"{name} {value} is the input {source}; refusing to overwrite it")


def _show(args: argparse.Namespace, result: Any) -> None:
    """Print the result's card as text, then write ``--output`` (JSON) and ``--html``."""
    from .cards import card_spec, render_text

    say(render_text(card_spec(result, rows=args.top)))
    if args.output:
        say(f"wrote {result.to_json(args.output)}")
    if args.html:
        from .cards import write_report

        say(f"wrote {write_report(args.html, [result])}")


def _cmd_models(args: argparse.Namespace) -> None:
    from .catalog import CATALOG

    say(f"{'slug':<20} {'model':<32} {'SAE release':<34} layer  description")
    for entry in CATALOG:
        say(
            f"{entry.slug:<20} {entry.hf_model:<32} {entry.sae_release:<34} "
            f"{entry.default_layer:>5}  {entry.description}"
        )


def _cmd_pull_sae(args: argparse.Namespace) -> None:
    _quiet_library_loaders()
    from .catalog import get_entry
    from .saes import load_sae

    entry = get_entry(args.slug)
    sae_id = entry.sae_id_for(args.layer)
    sae = load_sae(entry.slug, args.layer)
    where = "ships with aquin_nb" if entry.embedded else "cached"
    say(f"{entry.sae_release}:{sae_id} {where} (d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae})")


def _cmd_sae_diff(args: argparse.Namespace) -> None:
    _check_outputs(args, args.checkpoint, args.prompts, args.sae)
    _quiet_library_loaders()
    from .diff import sae_diff

    diff = sae_diff(
        args.model,
        args.checkpoint,
        prompts=args.prompts,
        layer=args.layer,
        sae=args.sae,
        name=args.name,
        batch_size=args.batch_size,
        fdr=args.fdr,
        min_rel_delta=args.min_rel_delta,
        device=args.device,
        progress=not args.quiet,
    )
    _show(args, diff)


def _cmd_sae_align(args: argparse.Namespace) -> None:
    _check_outputs(args, args.sae_a, args.sae_b)
    from .align import sae_align

    align = sae_align(
        args.sae_a,
        args.sae_b,
        args.max_features,
        method=args.method,
        force=args.force,
        progress=not args.quiet,
    )
    _show(args, align)


def _cmd_capture(args: argparse.Namespace) -> None:
    _split_legacy_output(args, "out_dir", ())
    if args.out_dir is None:
        raise AquinError("capture needs --out-dir DIR, the directory the shards go to")
    _check_outputs(args, args.checkpoint, args.prompts)
    _quiet_library_loaders()
    from .capture import capture_activations

    capture = capture_activations(
        args.model,
        args.checkpoint,
        args.prompts,
        output=args.out_dir,
        layers=args.layers,
        position=args.position,
        count=args.count,
        encode_sae=args.encode_sae,
        sae=args.sae,
        sae_layer=args.sae_layer,
        name=args.name,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if args.output_json:
        import json

        say(json.dumps(capture.to_dict(), indent=2))
        args.top = 0
    _show(args, capture)


def _cmd_sae_train(args: argparse.Namespace) -> None:
    _split_legacy_output(args, "out_dir", ())
    if args.json:
        _deprecated("--json FILE: use --output FILE")
        args.output = args.output or args.json
    _check_outputs(args, args.checkpoint, args.activations, args.prompts)
    _quiet_library_loaders()
    from .train import sae_train

    trained = sae_train(
        args.model,
        args.layer,
        checkpoint=args.checkpoint,
        activations=args.activations,
        prompts=args.prompts,
        init_from=args.init_from,
        architecture=args.architecture,
        d_sae=args.d_sae,
        steps=args.steps,
        tokens=args.tokens,
        quick=args.quick,
        name=args.name,
        output=args.out_dir,
        progress=not args.quiet,
    )
    _show(args, trained)


def _cmd_simulate(args: argparse.Namespace) -> None:
    _split_legacy_output(args, "checkpoint_out", (".pt", ".pth", ".bin", ".safetensors"))
    _check_outputs(args, args.data, args.model)
    _quiet_library_loaders()
    from .simulate import simulate

    simulation = simulate(
        args.model,
        args.data,
        lr=args.lr,
        steps=args.steps,
        batch_size=args.batch_size,
        layer=args.layer,
        sae=args.sae,
        name=args.name,
        output=args.checkpoint_out,
        params=args.params,
        exact_linear=args.exact_linear,
        curvature=args.curvature,
        progress=not args.quiet,
    )
    _show(args, simulation)


def _cmd_demo(args: argparse.Namespace) -> None:
    _quiet_library_loaders()
    from .cards import card_spec, render_text
    from .demo.run import run_demo

    result = run_demo(args.out, steps=args.steps, progress=not args.quiet)
    say(f"[demo] LoRA fine-tune of tiny-gpt2 on the cooking set: {result.checkpoint}")
    for shown in (result.diff, result.trained, result.align):
        say()
        say(render_text(card_spec(shown, rows=args.top)))
    say()
    for path in result.written:
        say(f"wrote {path}")


def _cmd_serve(args: argparse.Namespace) -> None:
    from .server import create_app, default_db, open_socket, run

    if not 0 <= args.port <= 65535:
        raise AquinError(f"--port {args.port} is not a TCP port (0-65535)")
    db = args.db or default_db()
    sock = open_socket(args.host, args.port)
    app = create_app(db, token=args.token)
    host, port = sock.getsockname()[:2]
    origin = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    state = "generated now and stored" if app.state.token_generated else "stored"
    say(f"[serve] aquin_nb mirror on {origin}, sessions in {db}")
    say(f"[serve] token ({state} in the database): {app.state.token}")
    say(f"[serve] open {origin}/?token={app.state.token}")
    say(
        f"[serve] clients: AQUIN_NB_URL={origin} AQUIN_NB_TOKEN={app.state.token} AQUIN_NB_SESSION=NAME"
    )
    if host not in ("127.0.0.1", "::1", "localhost"):
        say(f"[serve] warning: listening on {host}, reachable from other machines")
    run(app, sock)


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
    import os

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

    sae = commands.add_parser("sae", help="SAE verbs: diff, train, align")
    sae_verbs = sae.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    diff = _verb_parser(
        sae_verbs,
        "diff",
        "per-feature activation deltas between a base model and a checkpoint",
        _cmd_sae_diff,
        top=20,
    )
    diff.add_argument("--model", required=True, help="catalog slug or local model directory")
    diff.add_argument(
        "--checkpoint",
        required=True,
        help="{step, state_dict} .pt, state dict, .safetensors, HF directory or PEFT adapter",
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
    diff.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")

    train = _verb_parser(
        sae_verbs, "train", "train a temporary SAE on a checkpoint", _cmd_sae_train, top=10
    )
    train.add_argument("--model", required=True, help="catalog slug or local model directory")
    train.add_argument("--layer", type=int, required=True)
    train.add_argument("--checkpoint", help="train on this checkpoint's activations")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--activations", help="a capture directory (aquin-nb capture)")
    source.add_argument("--prompts", help="a prompts/corpus file (default: the shipped corpus)")
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
    train.add_argument("--json", help=argparse.SUPPRESS)  # deprecated spelling of --output

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


def _quiet_library_loaders() -> None:
    """Our own tqdm bars show the work; the per-tensor loading bars of transformers are noise.

    The CLI owns its process, so it may set this; the library never does.
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


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
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    warnings.showwarning = _one_line_warning  # the CLI owns its process: one line each
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
