"""Mirror events: what a verb's call and result become, and the size bound."""

from __future__ import annotations

import math
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

from aquin_nb import _events, mirror
from aquin_nb._errors import AquinError


def big_card(rows: int) -> dict:
    return {
        "kind": "sae_diff",
        "title": "t",
        "chips": [],
        "token_views": {str(i): {"prompts": [{"tokens": ["x"] * 200}]} for i in range(10)},
        "sections": [
            {
                "type": "table",
                "title": "rows",
                "columns": ["feature", "delta"],
                "rows": [{"feature": i, "delta": i / 7} for i in range(rows)],
            }
        ],
    }


def test_a_large_result_is_slimmed_under_the_limit_keeping_summary_and_top_rows():
    summary = {"n_changed": 12, "histogram": {"counts": list(range(5000))}}
    event = _events.result_event(
        uuid.uuid4().hex,
        uuid.uuid4().hex,
        "sae_diff",
        "r",
        duration_s=0.0,
        summary=summary,
        card=big_card(20_000),
    )
    assert len(_events.encode(event)) <= _events.MAX_EVENT_BYTES
    assert _events.event_problem(event) is None
    assert event["summary"] == {"n_changed": 12, "omitted": ["histogram"]}
    card = event["card"]
    assert "token_views" not in card
    rows = card["sections"][0]["rows"]
    assert 100 < len(rows) < 20_000 and rows[0] == {"feature": 0, "delta": 0.0}  # the top rows


def test_a_small_result_is_sent_whole():
    card = big_card(25)
    event = _events.result_event(
        uuid.uuid4().hex, uuid.uuid4().hex, "sae_align", "r", duration_s=0.0, summary={}, card=card
    )
    assert len(event["card"]["sections"][0]["rows"]) == 25 and "token_views" in event["card"]


def test_arguments_are_described_not_copied():
    def verb(model, checkpoint, prompts=None, layer=None, *, lr=0.1, weights=None):
        return None

    prompts = [f"prompt {i} " + "x" * 500 for i in range(32)]
    described = _events.describe_arguments(
        verb,
        ("tiny-gpt2", Path("/runs/a.pt"), prompts),
        {"lr": float("nan"), "weights": np.ones((3, 4))},
    )
    assert described["model"] == "tiny-gpt2" and described["checkpoint"] == "/runs/a.pt"
    assert described["prompts"]["items"] == 32 and len(described["prompts"]["head"]) == 3
    assert len(described["prompts"]["head"][0]) == _events.MAX_ARGUMENT_CHARS + 1
    assert described["lr"] is None and described["weights"] == "<ndarray (3, 4)>"
    assert "layer" not in described  # defaults are not sent
    assert _events.invocation_label(described) == "a.pt"


def test_plain_makes_strict_json():
    value = _events.plain({"a": np.float32(1.5), "b": [math.inf, np.int64(3)], 4: None})
    assert value == {"a": 1.5, "b": [None, 3], "4": None}
    _events.encode(value)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "x" * 65, "-lead", "sp ace", "<script>"])
def test_bad_session_names_are_refused_by_the_client(name):
    with pytest.raises(AquinError, match="session name"):
        mirror.Session(name, "http://127.0.0.1:9", "t")


def test_connect_needs_a_token_and_a_name(monkeypatch):
    for variable in (mirror.ENV_URL, mirror.ENV_TOKEN, mirror.ENV_SESSION):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(AquinError, match="AQUIN_NB_TOKEN"):
        mirror.connect("run")
    with pytest.raises(AquinError, match="AQUIN_NB_SESSION"):
        mirror.connect(token="t")
    with pytest.raises(AquinError, match="http://"):
        mirror.connect("run", url="127.0.0.1:8765", token="t")


def test_the_queue_is_bounded_and_drops_the_oldest(tmp_path):
    # Port 9 (discard) on loopback refuses: nothing is delivered, the queue fills.
    session = mirror.Session(
        "bounded", "http://127.0.0.1:9", "t", max_queue=10, spool_dir=tmp_path, retry_max_s=60
    )
    events = [
        _events.start_event(uuid.uuid4().hex, uuid.uuid4().hex, "sae_align", {}) for _ in range(25)
    ]
    for event in events:
        session.emit(event)
    assert session.pending == 10 and session.dropped == 15
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session.close(timeout=0.5)
    spooled = (tmp_path / next(p.name for p in tmp_path.iterdir())).read_text().splitlines()
    kept = [line for line in spooled if line]
    assert len(kept) == 10 and events[-1]["event_id"] in kept[-1]  # the newest are kept
    with pytest.raises(AquinError, match="closed"):
        session.emit(events[0])
