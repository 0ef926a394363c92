"""sae_align: known permutations recovered, sparse equals dense, selection, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aquin_nb import AquinError, SaeAlign, sae_align
from aquin_nb.align import match, select_features
from aquin_nb.saes import sae_from_cfg_and_state

HOOK = "blocks.2.hook_resid_pre"


def make_sae(decoder: torch.Tensor, encoder: torch.Tensor | None = None, hook: str = HOOK):
    d_sae, d_in = decoder.shape
    encoder = decoder.T.clone() if encoder is None else encoder
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "metadata": {"hook_name": hook},
    }
    state = {
        "W_dec": decoder.clone(),
        "W_enc": encoder.clone(),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
    }
    return sae_from_cfg_and_state(cfg, state, source="test")


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def noisy_permutation(n_a: int, n_b: int, d: int, noise: float, seed: int):
    """B is A's rows permuted plus noise; when n_b > n_a the extra rows are unrelated."""
    generator = torch.Generator().manual_seed(seed)
    a = unit(torch.randn(n_a, d, generator=generator))
    perm = torch.randperm(n_b, generator=generator)
    b = unit(torch.randn(n_b, d, generator=generator))
    b[perm[:n_a]] = unit(a + noise * torch.randn(n_a, d, generator=generator) / d**0.5)
    return a, b, perm[:n_a].numpy()


@pytest.mark.parametrize("n_a,n_b", [(300, 300), (200, 260), (260, 200)])
def test_known_permutation_is_recovered(n_a, n_b):
    if n_a <= n_b:
        a, b, perm = noisy_permutation(n_a, n_b, 64, 0.3, seed=1)
        expected = dict(enumerate(perm))
    else:
        b, a, perm = noisy_permutation(n_b, n_a, 64, 0.3, seed=1)
        expected = {int(row): col for col, row in enumerate(perm)}
    align = sae_align(make_sae(a), make_sae(b), progress=False)
    found = dict(zip(align.pairs["a"], align.pairs["b"], strict=True))
    assert found == expected
    assert align.summary["n_matched"] == min(n_a, n_b)
    assert len(align.unmatched) == abs(n_a - n_b)
    assert align.summary["optimal"] and align.summary["method"] == "dense"


def test_sparse_path_recovers_a_permutation_with_unrelated_rows():
    a, b, perm = noisy_permutation(400, 400, 48, 0.5, seed=2)
    unrelated = np.arange(0, 400, 5)  # a fifth of B's partners replaced by noise
    b[perm[unrelated]] = unit(
        torch.randn(len(unrelated), 48, generator=torch.Generator().manual_seed(9))
    )
    sparse = match(a, b, "sparse", progress=False)
    dense = match(a, b, "dense", progress=False)
    assert sparse.optimal and sparse.gap == 0.0
    assert sparse.cosine.sum() == pytest.approx(dense.cosine.sum(), rel=1e-9)
    related = np.setdiff1d(np.arange(400), unrelated)
    assert (sparse.cols[related] == perm[related]).all()


def test_rows_in_bfloat16_are_matched_in_float32_on_the_cpu():
    """As a GPU SAE hands them over: widened, made unit again, and proven optimal."""
    a, b, perm = noisy_permutation(400, 400, 48, 0.5, seed=3)
    exact = match(a, b, "sparse", progress=False)
    half = match(a.bfloat16(), b.bfloat16(), "sparse", progress=False)
    assert half.optimal and (half.cols == perm).all() and (exact.cols == perm).all()
    assert half.cosine.sum() == pytest.approx(exact.cosine.sum(), rel=1e-3)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=5, max_value=160),
    d=st.integers(min_value=4, max_value=48),
    structured=st.booleans(),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_sparse_equals_dense_on_square_problems(n, d, structured, seed):
    if structured:
        a, b, _ = noisy_permutation(n, n, d, 0.8, seed)
    else:
        generator = torch.Generator().manual_seed(seed)
        a, b = (
            unit(torch.randn(n, d, generator=generator)),
            unit(torch.randn(n, d, generator=generator)),
        )
    sparse = match(a, b, "sparse", progress=False)
    dense = match(a, b, "dense", progress=False)
    assert sparse.optimal
    assert sparse.cosine.sum() == pytest.approx(dense.cosine.sum(), rel=1e-7, abs=1e-7)
    assert sorted(sparse.cols.tolist()) == list(range(n))


def orphaned_permutation(n: int, d: int, fraction: float, seed: int):
    """A noisy permutation in which ``fraction`` of B's partners are replaced by noise:
    those rows of A have no counterpart (features new to one dictionary)."""
    a, b, perm = noisy_permutation(n, n, d, 0.5, seed)
    orphans = np.random.default_rng(seed).choice(n, int(fraction * n), replace=False)
    generator = torch.Generator().manual_seed(seed + 1)
    b[perm[orphans]] = unit(torch.randn(len(orphans), d, generator=generator))
    return a, b, perm, np.sort(orphans)


def test_small_uneven_blocks_give_the_same_candidates_and_optimum(monkeypatch):
    from aquin_nb._assignment import bound
    from aquin_nb._assignment.candidates import top_k

    a, b, perm, orphans = orphaned_permutation(500, 64, 0.3, seed=11)
    whole = top_k(a, b, 32, progress=False)
    dense = match(a, b, "dense", progress=False)
    # 4 bytes x 500 columns x 100 rows: blocks of 100 rows, not a multiple of 64.
    monkeypatch.setattr(bound, "ROW_BLOCK_BYTES", 4 * 500 * 100)
    blocked = top_k(a, b, 32, progress=False)
    assert np.array_equal(whole[0], blocked[0])
    direct = (a[:, None, :] * b[torch.as_tensor(blocked[0])]).sum(-1).double().numpy()
    assert np.allclose(blocked[1], direct, atol=1e-6)
    sparse = match(a, b, "sparse", progress=False)
    assert sparse.optimal
    assert sparse.cosine.sum() == pytest.approx(dense.cosine.sum(), rel=1e-9)


def test_weak_edges_join_the_rows_and_columns_without_partners():
    from aquin_nb._assignment.candidates import top_k, weak_edges

    a, b, perm, orphans = orphaned_permutation(600, 256, 0.2, seed=4)
    _, top_cos, _, _, col_max = top_k(a, b, 32, progress=False)
    weak = weak_edges(a, b, top_cos.max(1), col_max, 32)
    rows, cols, cos = weak.rows, weak.cols, weak.cos
    assert np.array_equal(np.unique(rows), orphans)
    assert set(np.unique(cols).tolist()) == set(perm[orphans].tolist())
    assert len(rows) == len(orphans) * 32  # each orphan's top 32 among the orphaned columns
    assert np.allclose(cos, (a[rows] * b[cols]).sum(1).numpy(), atol=1e-5)
    # Unrelated dictionaries have no strong pairs: no shortcut is taken.
    generator = torch.Generator().manual_seed(5)
    a2, b2 = (
        unit(torch.randn(600, 256, generator=generator)),
        unit(torch.randn(600, 256, generator=generator)),
    )
    _, top_cos, _, _, col_max = top_k(a2, b2, 32, progress=False)
    assert weak_edges(a2, b2, top_cos.max(1), col_max, 32) is None


def test_bf16_error_bound_holds_and_adapts_to_the_rounding():
    """|bf16 cosine - exact| never exceeds the bound pricing relies on, random rows or
    the worst case for rounding: every entry ±1/sqrt(254), rounded by ≈ 2^-8 of itself,
    against itself (the errors add up instead of cancelling)."""
    from aquin_nb._assignment.bound import Rounded

    def check(a, b):
        rounded = Rounded.of(a, b)
        approx = (rounded.a16 @ rounded.b16.T).float()
        exact = (a.double() @ b.double().T).float()
        bound = rounded.bounds(approx.clone(), torch.arange(len(a)))
        assert ((approx - exact).abs() <= bound).all()
        return (approx - exact).abs().max().item(), bound.max().item()

    generator = torch.Generator().manual_seed(3)
    for d in (64, 512, 2304):
        a, b = (
            unit(torch.randn(300, d, generator=generator)),
            unit(torch.randn(400, d, generator=generator)),
        )
        b[:50] = a[:50]  # cos = 1
        b[50:100] = -a[50:100]
        check(a, b)
        # The input part (≈ 0.004) is about half the worst case over all inputs, 2^-7.
        assert Rounded.of(a, b).error.max() < 0.005
    signs = torch.randint(0, 2, (40, 254), generator=generator) * 2.0 - 1.0
    worst = signs / 254**0.5
    error, bound = check(worst, torch.cat([worst, -worst]))
    assert error > 0.0075  # a fixed 0.005 would have been wrong here
    assert error <= bound


def test_repair_reaches_the_optimum_of_the_larger_edge_set():
    """Solve on each row's top 3 columns, then add the top 40: repairing the matching
    (shortest augmenting paths) gives SciPy's optimum on the 40, with potentials
    that settle; too many rows to free asks for a full solve instead."""
    from aquin_nb._assignment.duals import potentials, repair
    from aquin_nb._assignment.edges import Edges, solve

    generator = torch.Generator().manual_seed(8)
    n = 400
    a, b = (
        unit(torch.randn(n, 32, generator=generator)),
        unit(torch.randn(n, 32, generator=generator)),
    )
    cos = (a @ b.T).double().numpy()
    fallback = np.random.default_rng(0).permutation(n)

    def edges(k):
        cols = np.argsort(-cos, axis=1)[:, :k]
        rows = np.concatenate([np.repeat(np.arange(n), k), np.arange(n)])
        cols = np.concatenate([cols.reshape(-1), fallback])
        return Edges.of(rows, cols, cos[rows, cols], n)

    small, large = edges(3), edges(40)
    _, cols = solve(n, n, small)
    u, v, _ = potentials(n, small, cols)
    repaired = repair(n, large, cols, u, v, max_free=n)
    _, best = solve(n, n, large)
    total = cos[np.arange(n), repaired].sum()
    assert sorted(repaired.tolist()) == list(range(n))
    assert total == pytest.approx(cos[np.arange(n), best].sum(), rel=1e-12)
    assert total > cos[np.arange(n), cols].sum() + 1e-3  # the larger set did improve it
    assert potentials(n, large, repaired, u) is not None
    assert repair(n, large, cols, u, v, max_free=2) is None
    with pytest.raises(ValueError, match="sorted by row"):
        Edges(large.rows[::-1], large.cols[::-1], large.cos[::-1])


def test_without_repair_the_problem_is_solved_again_to_the_same_optimum(monkeypatch):
    from aquin_nb._assignment import square

    a, b, _, _ = orphaned_permutation(600, 48, 0.4, seed=21)
    dense = match(a, b, "dense", progress=False)
    repaired = match(a, b, "sparse", progress=False)
    calls, solve = [], square.solve
    monkeypatch.setattr(square, "REPAIR_MAX_ROWS", 0)
    monkeypatch.setattr(square, "solve", lambda *args: calls.append(1) or solve(*args))
    resolved = match(a, b, "sparse", progress=False)
    assert len(calls) >= 2  # the first solve and at least one full re-solve
    for result in (repaired, resolved):
        assert result.optimal
        assert result.cosine.sum() == pytest.approx(dense.cosine.sum(), rel=1e-9)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(min_value=40, max_value=220),
    d=st.sampled_from([24, 64, 256]),
    fraction=st.floats(min_value=0.05, max_value=0.5),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_sparse_equals_dense_when_some_rows_lost_their_partner(n, d, fraction, seed):
    a, b, perm, orphans = orphaned_permutation(n, d, fraction, seed)
    sparse = match(a, b, "sparse", progress=False)
    dense = match(a, b, "dense", progress=False)
    assert sparse.optimal
    assert sparse.cosine.sum() == pytest.approx(dense.cosine.sum(), rel=1e-7, abs=1e-7)
    if d == 256:  # partners stand far above noise: every surviving pair is recovered
        kept = np.setdiff1d(np.arange(n), orphans)
        assert (sparse.cols[kept] == perm[kept]).all()


@pytest.mark.parametrize("n_a,n_b", [(400, 560), (560, 400)])
def test_sparse_path_recovers_a_rectangular_permutation(n_a, n_b):
    """The narrower side's features all have partners among the wider side's."""
    narrow, wide = min(n_a, n_b), max(n_a, n_b)
    a, b, perm = noisy_permutation(narrow, wide, 48, 0.5, seed=6)
    if n_a > n_b:
        a, b = b, a
    sparse = match(a, b, "sparse", progress=False)
    assert sparse.optimal and sparse.gap == 0.0
    assert sparse.cosine.sum() == pytest.approx(match(a, b, "dense").cosine.sum(), rel=1e-9)
    found = dict(zip(sparse.rows.tolist(), sparse.cols.tolist(), strict=True))
    expected = (
        dict(enumerate(perm.tolist())) if n_a < n_b else {int(p): i for i, p in enumerate(perm)}
    )
    assert found == expected


@settings(max_examples=25, deadline=None)
@given(
    n_a=st.integers(min_value=5, max_value=200),
    extra=st.integers(min_value=1, max_value=200),
    d=st.sampled_from([8, 32, 256]),
    kind=st.sampled_from(["structured", "random", "orphaned"]),
    wider_a=st.booleans(),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_rectangular_sparse_equals_dense_and_is_proven_optimal(n_a, extra, d, kind, wider_a, seed):
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        a = unit(torch.randn(n_a, d, generator=generator))
        b = unit(torch.randn(n_a + extra, d, generator=generator))
    else:
        a, b, perm = noisy_permutation(n_a, n_a + extra, d, 0.8, seed)
        if kind == "orphaned":  # a third of the narrow side lost its partner
            lost = perm[: n_a // 3]
            b[lost] = unit(torch.randn(len(lost), d, generator=generator))
    if wider_a:
        a, b = b, a
    sparse = match(a, b, "sparse", progress=False)
    dense = match(a, b, "dense", progress=False)
    assert sparse.optimal and sparse.gap == 0.0
    assert sparse.cosine.sum() == pytest.approx(dense.cosine.sum(), rel=1e-7, abs=1e-7)
    assert len(set(sparse.cols.tolist())) == len(sparse.cols) == n_a
    assert len(set(sparse.rows.tolist())) == len(sparse.rows)


def test_rectangular_gap_bound_holds_when_rounds_run_out():
    from aquin_nb._assignment import sparse_assignment

    a, b, _ = noisy_permutation(150, 230, 16, 1.0, seed=3)
    bounded = sparse_assignment(a, b, max_rounds=0, progress=False)
    dense = match(a, b, "dense", progress=False)
    shortfall = dense.cosine.sum() - bounded.cosine.sum()
    assert not bounded.optimal
    assert shortfall >= -1e-9
    assert bounded.gap is not None and bounded.gap >= shortfall - 1e-9
    assert len(set(bounded.cols.tolist())) == 150


def test_max_features_by_gain_and_by_frequency():
    decoder = unit(torch.randn(10, 8, generator=torch.Generator().manual_seed(0)))
    encoder = decoder.T.clone() * torch.arange(1, 11, dtype=torch.float32)  # gain grows with i
    sae = make_sae(decoder, encoder)
    assert select_features(sae, 3).tolist() == [7, 8, 9]
    frequencies = np.array([0.9, 0.1, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7])
    assert select_features(sae, 3, frequencies).tolist() == [0, 2, 9]
    align = sae_align(sae, sae, max_features=3, progress=False)
    assert sorted(align.pairs["a"].tolist()) == [7, 8, 9]
    assert align.summary["n_a"] == 3 and "gain" in align.summary["selection"]


def test_summary_baseline_and_round_trip(tmp_path):
    a, b, _ = noisy_permutation(256, 256, 32, 0.4, seed=3)
    align = sae_align(make_sae(a), make_sae(b), progress=False)
    s = align.summary
    assert s["mean_cosine"] > 0.8 > s["baseline_mean_cosine"] + 0.3
    assert s["frac_above_0.5"] >= s["frac_above_0.7"] >= s["frac_above_0.9"]
    assert align.strongest(1)["cosine"][0] == align.pairs["cosine"].max()
    assert align.weakest(1)["cosine"][0] == align.pairs["cosine"].min()
    assert (align.pairs["rank"] == np.arange(1, 257)).all()
    assert align.pairs["encoder_cosine"].mean() > 0.8  # encoders are the decoders here
    again = SaeAlign.from_json(align.to_json(tmp_path / "align.json"))
    assert again.summary == s
    assert again.pairs.equals(align.pairs)


def test_unrelated_dictionaries_score_at_their_baseline():
    generator = torch.Generator().manual_seed(5)
    a, b = (
        unit(torch.randn(200, 32, generator=generator)),
        unit(torch.randn(200, 32, generator=generator)),
    )
    s = sae_align(make_sae(a), make_sae(b), progress=False).summary
    assert s["mean_cosine"] == pytest.approx(s["baseline_mean_cosine"], abs=0.03)


def test_shape_mismatch_and_hooks_are_refused(tmp_path):
    small = make_sae(unit(torch.randn(20, 16)))
    wide = make_sae(unit(torch.randn(20, 32)))
    with pytest.raises(AquinError, match=r"d_in 16 \(A\) vs 32 \(B\)"):
        sae_align(small, wide, progress=False)
    other_hook = make_sae(unit(torch.randn(20, 16)), hook="blocks.3.hook_resid_pre")
    with pytest.raises(AquinError, match="different hooks.*force"):
        sae_align(small, other_hook, progress=False)
    assert sae_align(small, other_hook, force=True, progress=False).summary["n_matched"] == 20


def test_corrupt_sae_file_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torch file at all")
    with pytest.raises(AquinError, match=r"broken\.pt: the file is truncated or corrupt"):
        sae_align(broken, broken, progress=False)
    wrong = tmp_path / "wrong.pt"
    cfg = {"architecture": "standard", "d_in": 4, "d_sae": 3}
    state = {
        "W_dec": torch.zeros(3, 5),
        "W_enc": torch.zeros(4, 3),
        "b_enc": torch.zeros(3),
        "b_dec": torch.zeros(4),
    }
    torch.save({"cfg": cfg, "state_dict": state}, wrong)
    with pytest.raises(AquinError, match=r"W_dec has shape \(3, 5\) in .*wrong\.pt .*\(3, 4\)"):
        sae_align(wrong, wrong, progress=False)


def test_card_heatmap_is_the_matched_block_and_numbers_match():
    from aquin_nb.cards import card_spec, render_html

    a, b, _ = noisy_permutation(64, 64, 32, 0.3, seed=4)
    align = sae_align(make_sae(a), make_sae(b), progress=False)
    heatmap = align.summary["heatmap"]
    diagonal = [heatmap["cosine"][i][i] for i in range(len(heatmap["a"]))]
    strongest = align.strongest(len(diagonal))
    np.testing.assert_allclose(diagonal, strongest["cosine"], atol=1e-4)
    assert heatmap["a"] == strongest["a"].tolist()
    assert sum(align.summary["histogram"]["counts"]) == 64
    spec = card_spec(align, "sae_align")
    chips = {chip["label"]: chip["value"] for chip in spec["chips"]}
    assert chips["mean cosine"] == f"{align.summary['mean_cosine']:.3f}"
    page = render_html(align, "sae_align")
    assert page.count("<rect") >= 64 and 'data-kind="sae_align"' in page


def test_cli_sae_align_prints_pairs_and_writes_json(tmp_path, capsys):
    from aquin_nb.cli import main

    a, b, perm = noisy_permutation(50, 50, 16, 0.2, seed=6)
    for name, matrix in (("a", a), ("b", b)):
        sae = make_sae(matrix)
        torch.save(
            {"cfg": sae.cfg.to_dict(), "state_dict": sae.state_dict()}, tmp_path / f"{name}.pt"
        )
    output = tmp_path / "pairs.json"
    code = main(
        [
            "sae",
            "align",
            "--sae-a",
            str(tmp_path / "a.pt"),
            "--sae-b",
            str(tmp_path / "b.pt"),
            "--output",
            str(output),
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "mean cosine" in out and "weakest pairs" in out
    payload = SaeAlign.from_json(output)
    assert dict(zip(payload.pairs["a"], payload.pairs["b"], strict=True)) == dict(enumerate(perm))
    missing = main(
        ["sae", "align", "--sae-a", str(tmp_path / "nope.pt"), "--sae-b", str(tmp_path / "b.pt")]
    )
    assert missing == 2 and "nope.pt does not exist" in capsys.readouterr().err
