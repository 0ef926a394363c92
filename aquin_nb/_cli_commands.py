"""What each ``aquin-nb`` subcommand does: call the verb, then print its card as text.

The commands hold no rendering of their own: text comes from the result's card
spec (`aquin_nb.cards.render_text`), and every line goes through `say`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._errors import AquinError


def say(text: str = "") -> None:
    """The one place the CLI prints results."""
    print(text, flush=True)


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
    a file, or an output that is one of the inputs."""
    from ._io import check_not_same_file

    sources = [p for p in inputs if isinstance(p, (str, Path))]
    for flag in ("output", "html", "checkpoint_out"):
        value = getattr(args, flag, None)
        if value:
            try:
                check_not_same_file(value, *sources)
            except AquinError as error:
                raise AquinError(f"--{flag.replace('_', '-')}: {error}") from None


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


_RUN_FLAGS = ("backend", "prompt_shards", "metrics", "top_k", "max_features")


def _tracking(args: argparse.Namespace) -> dict[str, Any]:
    """The trajectory keywords the user set (the verb's defaults otherwise)."""
    names = ("top_k", "max_features")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _cmd_sae_diff(args: argparse.Namespace) -> None:
    from ._checkpoint_sets import names_a_set

    _check_outputs(args, args.checkpoint, args.prompts, args.sae)
    if names_a_set(args.checkpoint):
        _sae_trajectory(args)
        return
    given = [
        f"--{flag.replace('_', '-')}" for flag in _RUN_FLAGS if getattr(args, flag) is not None
    ]
    if given:
        raise AquinError(
            f"{', '.join(given)} only apply to a run of checkpoints: give --checkpoint a run "
            f"directory (checkpoints/step_<N>.pt) or a quoted glob, not {args.checkpoint}"
        )
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
        fit=args.fit,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
    )
    _show(args, diff)


def _sae_trajectory(args: argparse.Namespace) -> None:
    """``sae diff --checkpoint RUN_DIR|GLOB``: every checkpoint of the run, one trajectory.

    A bad checkpoint anywhere stops the run with exit 2 and writes nothing.
    """
    _quiet_library_loaders()
    from .trajectory import sae_trajectory

    trajectory = sae_trajectory(
        args.model,
        args.checkpoint,
        prompts=args.prompts,
        layer=args.layer,
        sae=args.sae,
        name=args.name,
        metrics=args.metrics,
        batch_size=args.batch_size,
        fdr=args.fdr,
        min_rel_delta=args.min_rel_delta,
        fit=args.fit,
        backend=args.backend or "local",
        prompt_shards=args.prompt_shards or 1,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
        **_tracking(args),
    )
    _show(args, trajectory)


def _cmd_watch(args: argparse.Namespace) -> None:
    """``watch RUN_DIR``: one line per diffed checkpoint, the card when it stops."""
    _check_outputs(args, args.run_dir, args.prompts, args.sae, args.metrics)
    _quiet_library_loaders()
    from . import _verbs
    from .watcher import watch

    def report(event: Any) -> None:
        if event.phase != "result":
            return
        if event.error is not None:
            return  # watch logs the skipped checkpoint as a warning line
        say(f"[watch] {event.result.describe_step(event.args[1])}")

    _verbs.add_listener(report)
    try:
        trajectory = watch(
            args.run_dir,
            args.model,
            prompts=args.prompts,
            layer=args.layer,
            sae=args.sae,
            name=args.name,
            output=args.output,
            metrics=args.metrics,
            poll_s=args.poll,
            idle_timeout_s=args.idle_timeout,
            batch_size=args.batch_size,
            fdr=args.fdr,
            min_rel_delta=args.min_rel_delta,
            device=args.device,
            dtype=args.dtype,
            progress=not args.quiet,
            **_tracking(args),
        )
    finally:
        _verbs.remove_listener(report)
    from .cards import card_spec, render_text

    say(render_text(card_spec(trajectory, rows=args.top)))
    if not trajectory.per_step.empty:  # watch wrote it after each step
        from .watcher import TRAJECTORY_FILE

        say(f"wrote {args.output or Path(args.run_dir) / TRAJECTORY_FILE}")
    if args.html:
        from .cards import write_report

        say(f"wrote {write_report(args.html, [trajectory])}")


def _cmd_model_diff(args: argparse.Namespace) -> None:
    _check_outputs(args, args.checkpoint, args.prompts)
    _quiet_library_loaders()
    from .modeldiff import model_diff

    result = model_diff(
        args.model,
        args.checkpoint,
        prompts=args.prompts,
        name=args.name,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
    )
    _show(args, result)


def _cmd_dashboards(args: argparse.Namespace) -> None:
    _check_outputs(args, args.checkpoint, args.corpus, args.sae)
    _quiet_library_loaders()
    from .dashboards import feature_dashboards

    boards = feature_dashboards(
        args.model,
        sae=args.sae,
        corpus=args.corpus,
        checkpoint=args.checkpoint,
        layer=args.layer,
        k=args.k,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
    )
    _show(args, boards)
    for feature in args.feature or []:
        board = boards.feature(feature)
        say(
            f"\n[feature {feature}] {board['label']}"
            + (f"  {board['url']}" if board["url"] else "")
        )
        for side in ("base", "checkpoint"):
            data = board[side]
            if data is None:
                continue
            say(
                f"  {side}: fires on {data['density']:.2%} of tokens; promotes "
                + " · ".join(item["token"].strip() for item in data["promoted"][:8])
            )
            for context in data["contexts"][:5]:
                tokens = list(context["tokens"])
                if context["peak"] < len(tokens):
                    tokens[context["peak"]] = f"⟦{tokens[context['peak']]}⟧"
                say(f"    {context['max']:.3g}  {''.join(tokens)!r}")


def _cmd_import_explanations(args: argparse.Namespace) -> None:
    from .labels import import_explanations
    from .saes import load_sae

    sae = load_sae(args.sae, args.layer) if args.sae else None
    count = import_explanations(args.file, sae, neuronpedia=args.neuronpedia_id)
    say(f"[explanations] imported {count} explanations from {args.file}")


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
        context_size=args.context_size,
        device=args.device,
        dtype=args.dtype,
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
    _check_outputs(args, args.checkpoint, args.activations, args.prompts, args.sae)
    _quiet_library_loaders()
    from .train import sae_train

    trained = sae_train(
        args.model,
        args.layer,
        checkpoint=args.checkpoint,
        activations=args.activations,
        prompts=args.prompts,
        sae=args.sae,
        init_from=args.init_from,
        architecture=args.architecture,
        d_sae=args.d_sae,
        steps=args.steps,
        tokens=args.tokens,
        quick=args.quick,
        name=args.name,
        output=args.out_dir,
        context_size=args.context_size,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
    )
    _show(args, trained)


def _cmd_simulate(args: argparse.Namespace) -> None:
    _split_legacy_output(args, "checkpoint_out", (".pt", ".pth", ".bin", ".safetensors"))
    _check_outputs(args, args.data, args.model)
    _quiet_library_loaders()
    from .simulation import simulate

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
        context_size=args.context_size,
        dtype=args.dtype,
        progress=not args.quiet,
    )
    _show(args, simulation)


def _cmd_demo(args: argparse.Namespace) -> None:
    _quiet_library_loaders()
    from .cards import card_spec, render_text
    from .demo.run import run_demo

    result = run_demo(args.out, steps=args.steps, progress=not args.quiet)
    say(f"[demo] LoRA fine-tune of tiny-gpt2 on the cooking set: {result.checkpoint}")
    for shown in (result.signals, result.diff, result.trained, result.align):
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
    from urllib.parse import quote

    token_file = getattr(app.state, "token_file", None)
    if token_file is None:
        where = "given with --token"
    else:
        made = "generated now and kept" if app.state.token_generated else "kept"
        where = f"{made} in {token_file}; the database holds only its hash"
    say(f"[serve] aquin_nb mirror on {origin}, sessions in {db}")
    say(f"[serve] token ({where}): {app.state.token}")
    say(f"[serve] open {origin}/?token={quote(app.state.token, safe='')}")
    say(
        f"[serve] clients: AQUIN_NB_URL={origin} AQUIN_NB_TOKEN={app.state.token} AQUIN_NB_SESSION=NAME"
    )
    if host not in ("127.0.0.1", "::1", "localhost"):
        say(f"[serve] warning: listening on {host}, reachable from other machines")
    run(app, sock)


_LOADER_STATE: list[tuple[bool, int]] = []


def _quiet_library_loaders() -> None:
    """Our own tqdm bars show the work; the per-tensor loading bars of transformers are noise.

    `restore_library_loaders` undoes it when the command ends, so a program that
    calls ``main()`` (a test, a notebook) keeps its own settings.
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    if not _LOADER_STATE:
        _LOADER_STATE.append((hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()))
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def restore_library_loaders() -> None:
    """Put transformers' progress bars and verbosity back as they were before the command."""
    if not _LOADER_STATE:
        return
    from transformers.utils import logging as hf_logging

    bars, verbosity = _LOADER_STATE.pop()
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()
