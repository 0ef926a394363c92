"""The package's shape: one verb seam, results that render without torch, no import cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import aquin_nb
from aquin_nb import _verbs
from aquin_nb.results import RESULT_TYPES

PACKAGE = Path(aquin_nb.__file__).resolve().parent
# Modules that render, deliver or drive; everything else computes.
NOT_COMPUTATION = (
    "aquin_nb.cards",
    "aquin_nb.mirror",
    "aquin_nb.cli",
    "aquin_nb._cli_commands",
    "aquin_nb.server",
)
TINY_CORPUS = ["Preheat the oven and bake the bread.", "Return a new list of keys."]
LAZY_BY_DESIGN = ("aquin_nb", "aquin_nb.results")
RENDERING = ("aquin_nb.cards", "aquin_nb.mirror", "plotly", "anywidget", "ipywidgets")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the aquin_nb modules (and others) that ``path`` imports."""
    tree = ast.parse(path.read_text("utf-8"))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` is not an import
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def test_the_import_graph_has_no_cycle():
    """Deferred imports count too, except in the modules that are lazy by design: the
    root (its verbs load on first use) and `results` (their renderer and machinery)."""
    modules = _modules()
    graph = {
        name: {
            m
            for m in _imports(
                path, top_level_only=name in LAZY_BY_DESIGN or name.startswith("aquin_nb.results.")
            )
            if m in modules and m != name
        }
        for name, path in modules.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_computation_module_imports_rendering_or_the_mirror():
    offenders = {}
    for name, path in _modules().items():
        # The root only names the verbs lazily; results render themselves in lazy methods.
        if name.startswith((*NOT_COMPUTATION, "aquin_nb.results")) or name in (
            "aquin_nb",
            "aquin_nb.demo.run",
        ):
            continue
        bad = sorted(m for m in _imports(path, top_level_only=False) if m.startswith(RENDERING))
        if bad:
            offenders[name] = bad
    assert offenders == {}
    # results import the cards lazily, in the methods that render, and nothing else heavy.
    for path in (PACKAGE / "results").glob("*.py"):
        top = _imports(path, top_level_only=True)
        heavy = {m for m in top if m.startswith(("torch", "aquin_nb.cards", "aquin_nb.mirror"))}
        assert not heavy, path.name


def test_a_listener_sees_one_start_and_one_result_per_verb_and_not_inner_verbs(
    tmp_path, tiny_sae, copy_pt
):
    seen: list[_verbs.VerbEvent] = []
    _verbs.add_listener(seen.append)
    try:
        aquin_nb.sae_diff("tiny-gpt2", copy_pt, progress=False)
        aquin_nb.model_diff("tiny-gpt2", copy_pt, progress=False)
        aquin_nb.feature_dashboards("tiny-gpt2", corpus=TINY_CORPUS, k=2, progress=False)
        aquin_nb.sae_align(tiny_sae, tiny_sae, max_features=32, progress=False)
        aquin_nb.capture_activations(
            "tiny-gpt2", output=tmp_path / "cap", layers=[2], count=16, progress=False
        )
        aquin_nb.sae_train(
            "tiny-gpt2",
            2,
            activations=tmp_path / "cap",
            steps=3,
            batch_size=64,
            output=tmp_path / "sae",
            progress=False,
        )
        rows = [{"instruction": "Bake bread.", "response": "Preheat the oven."}] * 4
        aquin_nb.simulate("tiny-gpt2", rows, steps=5, output=tmp_path / "s.pt", progress=False)
        aquin_nb.sae_trajectory("tiny-gpt2", {0: copy_pt}, fit="off", progress=False)
        with pytest.raises(aquin_nb.AquinError):
            aquin_nb.sae_diff("tiny-gpt2", tmp_path / "missing.pt", progress=False)
    finally:
        _verbs.remove_listener(seen.append)
    tools = [
        "sae_diff",
        "model_diff",
        "feature_dashboards",
        "sae_align",
        "capture_activations",
        "sae_train",
        "simulate",
        "sae_trajectory",
        "sae_diff",
    ]
    assert [(e.tool, e.phase) for e in seen] == [
        (tool, phase) for tool in tools for phase in ("start", "result")
    ]
    for start, end in zip(seen[::2], seen[1::2], strict=True):
        assert start.invocation_id == end.invocation_id and end.duration_s > 0
    results = [e.result for e in seen[1::2]]
    assert [type(r).kind for r in results[:-1]] == [
        "sae_diff",
        "model_diff",
        "dashboards",
        "sae_align",
        "capture",
        "sae_train",
        "simulation",
        "sae_trajectory",
    ]
    assert results[-1] is None and "missing.pt" in str(seen[-1].error)
    assert {type(r).verb for r in results[:-1]} == set(_verbs.VERBS)


def test_a_failing_listener_never_breaks_the_verb(tiny_sae, caplog):
    def broken(event):
        raise RuntimeError("listener bug")

    _verbs.add_listener(broken)
    try:
        align = aquin_nb.sae_align(tiny_sae, tiny_sae, max_features=16, progress=False)
    finally:
        _verbs.remove_listener(broken)
    assert align.summary["n_matched"] == 16
    assert "listener bug" in caplog.text


def test_every_result_kind_has_a_card_and_is_in_the_event_schema():
    from aquin_nb import _events
    from aquin_nb.cards import SPECS

    assert set(SPECS) == set(RESULT_TYPES) == set(_events.CARD_KINDS)
    assert set(_events.TOOLS) == {cls.verb for cls in RESULT_TYPES.values()}


RENDER_WITHOUT_TORCH = """
import sys
from aquin_nb.results import RESULT_TYPES
from aquin_nb.cards import card_spec, render_text
for kind, path in {paths!r}.items():
    result = RESULT_TYPES[kind].from_json(path)
    bundle = result._repr_mimebundle_()
    assert 'data-kind="' + kind + '"' in bundle["text/html"], kind
    assert render_text(card_spec(result)), kind
    if kind == "dashboards":
        assert result.feature(0)["base"]["promoted"], "a dashboard reads back without torch"
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "sae_lens", "transformer_lens")))
assert not loaded, loaded
print("rendered", len({paths!r}))
"""


def test_results_round_trip_and_render_from_json_without_torch(tmp_path, tiny_sae, copy_pt):
    diff = aquin_nb.sae_diff("tiny-gpt2", copy_pt, progress=False).with_token_views([3])
    capture = aquin_nb.capture_activations(
        "tiny-gpt2", output=tmp_path / "cap", layers=[1], count=8, progress=False
    )
    trained = aquin_nb.sae_train(
        "tiny-gpt2",
        1,
        activations=tmp_path / "cap",
        init_from="scratch",
        d_sae=64,
        steps=3,
        batch_size=32,
        output=tmp_path / "sae",
        progress=False,
    )
    align = aquin_nb.sae_align(tiny_sae, tiny_sae, max_features=32, progress=False)
    rows = [{"instruction": "Stir.", "response": "Whisk the eggs."}] * 4
    simulation = aquin_nb.simulate(
        "tiny-gpt2", rows, steps=5, output=tmp_path / "s.pt", progress=False
    )
    model = aquin_nb.model_diff("tiny-gpt2", copy_pt, progress=False)
    trajectory = aquin_nb.sae_trajectory(
        "tiny-gpt2", {0: copy_pt, 5: tmp_path / "s.pt"}, fit="off", progress=False
    )
    boards = aquin_nb.feature_dashboards("tiny-gpt2", corpus=TINY_CORPUS, k=2, progress=False)
    paths = {}
    for result in (diff, capture, trained, align, simulation, model, trajectory, boards):
        path = result.to_json(tmp_path / f"{result.kind}.json")
        again = type(result).from_json(path)
        assert again.summary == json.loads(json.dumps(result.summary))
        paths[result.kind] = str(path)
    from aquin_nb.cards import render_html

    again_diff = type(diff).from_json(paths["sae_diff"])  # token views travel with the JSON
    assert again_diff.views == diff.views and 'data-token-view="3"' in render_html(again_diff)
    again = type(simulation).from_json(paths["simulation"])
    assert again.diff.features["feature"].tolist() == simulation.diff.features["feature"].tolist()
    assert type(capture).from_json(paths["capture"]).directory == capture.directory
    script = RENDER_WITHOUT_TORCH.format(paths=paths)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"rendered {len(RESULT_TYPES)}" in done.stdout


def test_reading_a_result_of_another_kind_or_version_is_a_clear_error(tmp_path, tiny_sae):
    from aquin_nb.results import SaeAlign, SaeDiff

    align = aquin_nb.sae_align(tiny_sae, tiny_sae, max_features=8, progress=False)
    path = align.to_json(tmp_path / "a.json")
    with pytest.raises(aquin_nb.AquinError, match="is not a sae_diff result"):
        SaeDiff.from_json(path)
    payload = json.loads(path.read_text())
    payload["pairs"].pop("cosine")
    (tmp_path / "b.json").write_text(json.dumps(payload))
    with pytest.raises(aquin_nb.AquinError, match="'pairs' must have the columns"):
        SaeAlign.from_json(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("[" * 100_000)
    with pytest.raises(aquin_nb.AquinError, match="cannot read sae_align result"):
        SaeAlign.from_json(tmp_path / "c.json")


def test_every_verb_stays_a_function_after_every_module_is_imported():
    """A verb module named like its verb would shadow it on the package once imported."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(aquin_nb.__path__, "aquin_nb."):
        if not module.name.startswith(("aquin_nb.demo.build", "aquin_nb.__main__")):
            importlib.import_module(module.name)
    for tool in _verbs.VERBS:
        assert callable(getattr(aquin_nb, tool)), tool
        assert getattr(aquin_nb, tool).__module__ != f"aquin_nb.{tool}"
