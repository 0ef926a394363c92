"""The web mirror's cost to the verb, and the receiver's event rate, side by side in one run.

    python benchmarks/mirror.py [--repeats 9] [--events 5000]

* overhead: ``sae_diff`` on tiny-gpt2 (32 probes) with no session, with a session
  whose server is down (a closed loopback port), and with a live receiver (an
  ``aquin-nb serve`` process), interleaved; two forms of the call: models already
  loaded (the ~60 ms fast path, where any per-call cost shows most) and from
  paths (what the CLI does), each in a fresh session; then the fast path back
  to back in one session, where the delivery thread's work overlaps the next
  verbs. Medians, and the ratios to "no session". The target is <= 1.05x with
  the server down.
* load: 5,000 events from 4 concurrent clients (one POST each) to an
  ``aquin-nb serve`` subprocess on loopback; every event must be stored exactly once.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.diff import _checkpoint  # noqa: E402
from tests.mirror_server import ServeProcess, free_port  # noqa: E402


def _compare(
    modes: dict[str, tuple[str, str] | None],
    work,
    rounds: int,
    order: random.Random,
    tmp: Path,
) -> dict[str, float]:
    """Median seconds of ``work()`` per mode, modes interleaved in random order; each
    run in a fresh session (None: no session), disconnected outside the timing."""
    from aquin_nb import mirror

    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in order.sample(list(modes), len(modes)):  # no position bias
            target = modes[mode]
            if target is not None:
                mirror.connect(
                    f"bench-{uuid.uuid4().hex[:8]}",
                    url=target[0],
                    token=target[1],
                    spool_dir=tmp / "spool",
                    max_queue=10_000,
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                work()
                times[mode].append(time.perf_counter() - start)
                mirror.disconnect(timeout=2.0)
    return {mode: statistics.median(t) for mode, t in times.items()}


def _report(label: str, medians: dict[str, float], unit: float, suffix: str) -> None:
    floor = medians["no session"]
    cells = ", ".join(
        f"{mode} {t * unit:.{1 if unit > 1 else 2}f} {suffix} ({t / floor:.3f}x)"
        for mode, t in medians.items()
    )
    print(f"overhead [{label}]: {cells}")


def overhead(repeats: int, tmp: Path) -> None:
    from aquin_nb import load_model, load_sae, sae_diff

    checkpoint = _checkpoint(tmp)
    base, tuned = load_model("tiny-gpt2"), load_model("tiny-gpt2", checkpoint)
    sae = load_sae("tiny-gpt2")
    calls = {
        "loaded": lambda: sae_diff(base, tuned, sae=sae, progress=False),
        "paths": lambda: sae_diff("tiny-gpt2", checkpoint, progress=False),
    }
    order = random.Random(0)
    with ServeProcess(tmp / "bench.sqlite") as server:
        modes = {
            "no session": None,
            "server down": (f"http://127.0.0.1:{free_port()}", "t"),
            "live server": (server.url, server.token),
        }
        for label, call in calls.items():
            call()  # warm-up
            _report(label, _compare(modes, call, repeats, order, tmp), 1000, "ms")

        # Back to back: the delivery thread's work (cards, posts) overlaps the next verbs.
        def loop() -> None:
            for _ in range(repeats):
                calls["loaded"]()

        medians = _compare(modes, loop, 3, order, tmp)
        _report(f"loaded, {repeats} back to back in one session", medians, 1, "s")


def load(total: int, clients: int, tmp: Path) -> None:
    from aquin_nb import _events

    with ServeProcess(tmp / "load.sqlite") as server:
        url, token = server.url, server.token
        per_client = total // clients
        batches = [
            [
                _events.start_event(uuid.uuid4().hex, uuid.uuid4().hex, "sae_diff", {"name": "x"})
                for _ in range(per_client)
            ]
            for _ in range(clients)
        ]
        headers = {"Authorization": f"Bearer {token}"}

        def send(events: list[dict]) -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
                for event in events:
                    client.post(
                        "/api/sessions/load/events", json={"events": [event]}
                    ).raise_for_status()

        threads = [threading.Thread(target=send, args=(b,)) for b in batches]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
        stored = httpx.get(f"{url}/api/sessions/load/events", headers=headers, timeout=30).json()[
            "events"
        ]
        ids = [e["event_id"] for e in stored]
        exact = len(ids) == len(set(ids)) == per_client * clients
        print(
            f"load: {per_client * clients} events from {clients} clients in {seconds:.2f} s = "
            f"{per_client * clients / seconds:.0f} events/s; stored exactly once: {exact}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        overhead(args.repeats, Path(tmp))
        load(args.events, args.clients, Path(tmp))


if __name__ == "__main__":
    main()
