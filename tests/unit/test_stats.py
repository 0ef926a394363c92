"""Known answers for the streaming statistics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats

from aquin_nb._stats import FitStats, PairedFeatureStats


def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    return tensor.to_sparse() if layout == "sparse" else tensor


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_paired_pvalues_match_scipy_ttest_rel_in_any_batching(layout):
    rng = np.random.default_rng(0)
    n_prompts, d_sae = 12, 5
    tokens_per_prompt = rng.integers(2, 9, size=n_prompts)
    base_tokens, ckpt_tokens, owner = [], [], []
    for prompt, count in enumerate(tokens_per_prompt):
        base = rng.exponential(1.0, size=(count, d_sae))
        shift = np.array([0.0, 0.5, 0.0, -0.2, 0.05]) + rng.normal(0, 0.1, size=(1, d_sae))
        base_tokens.append(base)
        ckpt_tokens.append(base + shift)
        owner += [prompt] * count
    base_all, ckpt_all = np.concatenate(base_tokens), np.concatenate(ckpt_tokens)
    owner = np.array(owner)

    # Reference: per-prompt means, then scipy's paired t-test.
    base_means = np.stack([base_all[owner == p].mean(0) for p in range(n_prompts)])
    ckpt_means = np.stack([ckpt_all[owner == p].mean(0) for p in range(n_prompts)])
    expected = stats.ttest_rel(ckpt_means, base_means).pvalue

    for batch in (1, 5, 12):
        acc = PairedFeatureStats(d_sae)
        for start in range(0, n_prompts, batch):
            prompts = list(range(start, min(start + batch, n_prompts)))
            keep = np.isin(owner, prompts)
            rows = torch.as_tensor(owner[keep] - start)
            acc.update(
                _layout(torch.as_tensor(base_all[keep]), layout),
                _layout(torch.as_tensor(ckpt_all[keep]), layout),
                rows,
                len(prompts),
            )
        np.testing.assert_allclose(acc.paired_t_pvalues(), expected, rtol=1e-8)
        np.testing.assert_allclose(acc.base_sum.numpy() / acc.n_tokens, base_all.mean(0))
        assert acc.n_prompts == n_prompts and acc.n_tokens == len(owner)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_identical_sides_give_p_one_and_constant_shift_gives_p_zero(layout):
    base = torch.rand(10, 3)
    owner = torch.arange(10) // 2
    same = PairedFeatureStats(3)
    same.update(_layout(base, layout), _layout(base.clone(), layout), owner, 5)
    assert same.paired_t_pvalues().tolist() == [1.0, 1.0, 1.0]
    shifted = PairedFeatureStats(3)
    moved = base.double() + torch.tensor([0.0, 1.0, 0.0]).double()
    shifted.update(_layout(base.double(), layout), _layout(moved, layout), owner, 5)
    assert shifted.paired_t_pvalues().tolist() == [1.0, 0.0, 1.0]


def test_sparse_features_choose_the_layout_by_the_whole_arrays_density():
    """Sparse when under `SPARSE_DECODE_DENSITY` of the whole array fires; the first
    rows only screen: dense first rows keep the array dense without a conversion, and
    sparse first rows above a dense rest still give the dense array back."""
    from aquin_nb.saes import DENSITY_SAMPLE_ROWS, SPARSE_DECODE_DENSITY, sparse_features

    generator = torch.Generator().manual_seed(8)
    rows = 4 * DENSITY_SAMPLE_ROWS
    few = (torch.rand(rows, 1000, generator=generator) < SPARSE_DECODE_DENSITY / 4).float()
    converted = sparse_features(few)
    assert converted.is_sparse and converted.is_coalesced()
    assert torch.equal(converted.to_dense(), few)
    dense_head = few.clone()
    dense_head[:DENSITY_SAMPLE_ROWS] = 1.0  # the screen sees a dense batch
    assert sparse_features(dense_head) is dense_head
    dense_tail = few.clone()
    dense_tail[DENSITY_SAMPLE_ROWS:] = 1.0  # sparse first rows, dense overall
    assert sparse_features(dense_tail) is dense_tail


def test_sparse_features_give_the_dense_statistics():
    """SAE-like float32 features (about 3% firing, a few negative values that are not
    firings, rows with nothing firing), in three batches: every accumulator from the
    sparse layout equals the dense one to float32 rounding, and so do mixed layouts."""
    from aquin_nb.saes import sparse_features

    generator = torch.Generator().manual_seed(3)
    accumulators = {name: PairedFeatureStats(500) for name in ("dense", "sparse", "mixed")}
    for n_rows in (3, 5, 1):
        owner = torch.randint(n_rows, (40,), generator=generator).sort().values
        base = torch.relu(torch.randn(40, 500, generator=generator) - 1.9)
        base[5] = 0.0
        base[7, :3] = -0.5
        scale = 1 + 0.3 * torch.randn(40, 500, generator=generator)
        fresh = torch.relu(torch.randn(40, 500, generator=generator) - 2.2)  # new firings
        ckpt = torch.relu(base * scale + fresh)
        sparse_base, sparse_ckpt = sparse_features(base), sparse_features(ckpt)
        assert sparse_base.is_sparse and sparse_ckpt.is_sparse
        accumulators["dense"].update(base, ckpt, owner, n_rows)
        accumulators["sparse"].update(sparse_base, sparse_ckpt, owner, n_rows)
        accumulators["mixed"].update(base, sparse_ckpt, owner, n_rows)
    dense = accumulators["dense"]
    assert float(dense.base_fires.sum()) > 0
    for other in (accumulators["sparse"], accumulators["mixed"]):
        for name in ("base_sum", "checkpoint_sum", "diff_sum", "diff_sq_sum"):
            torch.testing.assert_close(
                getattr(other, name), getattr(dense, name), rtol=1e-5, atol=1e-5
            )
        for name in ("base_fires", "checkpoint_fires"):
            assert torch.equal(getattr(other, name), getattr(dense, name)), name
        assert (other.n_tokens, other.n_prompts) == (dense.n_tokens, dense.n_prompts)
        np.testing.assert_allclose(other.paired_t_pvalues(), dense.paired_t_pvalues(), rtol=1e-4)


def test_fit_stats_known_answers():
    x = torch.randn(100, 4, dtype=torch.float64)
    perfect = FitStats(4)
    perfect.update(x, x)
    assert perfect.explained_variance() == pytest.approx(1.0)
    mean_only = FitStats(4)
    mean_only.update(x[:50], x.mean(0).expand(50, 4))
    mean_only.update(x[50:], x.mean(0).expand(50, 4))
    assert mean_only.explained_variance() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("predict_rows", [1, 8, 24, 1024])
def test_pursuit_picks_what_scikit_learns_omp_picks(predict_rows, monkeypatch):
    """Random sparse problems: the same rows in the same order as ``orthogonal_mp``,
    whether each prediction of the picks to come looks at 1 row (so every pick is a
    miss and gets its own pass over the decoder), 8 or 24 rows (often wrong) or all
    256 (always right: then two passes suffice, D·target and every pick at once)."""
    from sklearn.linear_model import orthogonal_mp

    from aquin_nb import _shift
    from aquin_nb._shift import pursuit

    monkeypatch.setattr(_shift, "PREDICT_ROWS", predict_rows)
    passes = []
    scores = _shift._scores
    monkeypatch.setattr(_shift, "_scores", lambda *a: passes.append(1) or scores(*a))
    rng = np.random.default_rng(0)
    for _ in range(50):
        decoder = rng.standard_normal((256, 32)).astype(np.float32)
        unit = decoder.astype(np.float64) / np.linalg.norm(decoder, axis=1, keepdims=True)
        support = rng.choice(256, int(rng.integers(1, 12)), replace=False)
        target = rng.standard_normal(len(support)) @ unit[support]
        target += 0.01 * rng.standard_normal(32)
        passes.clear()
        ours = pursuit(torch.tensor(decoder), target, 16)
        path = orthogonal_mp(unit.T, target, n_nonzero_coefs=16, return_path=True)
        path = path.reshape(256, -1)[:, : len(ours)]
        chosen = np.flatnonzero(path[:, -1])
        theirs = sorted(chosen, key=lambda f: int(np.argmax(path[f] != 0)))  # pick order
        assert ours == [int(f) for f in theirs]
        if predict_rows >= 256:  # D·target, then every predicted pick at once (none if
            assert len(passes) == min(2, len(ours))  # the first pick explains it all)


def test_pursuit_stops_where_the_dictionary_has_no_more_rank():
    """64 rows spanning 8 of 32 dimensions: after 8 picks every other row lies in their
    span (to float32 rounding), so the pursuit stops there, with scikit-learn's 8 picks
    (scikit-learn also stops early, with a warning), and the per-prompt fit is finite."""
    import warnings

    from sklearn.linear_model import orthogonal_mp

    from aquin_nb._shift import attribute, pursuit

    rng = np.random.default_rng(4)
    decoder = (rng.standard_normal((64, 8)) @ rng.standard_normal((8, 32))).astype(np.float32)
    target = rng.standard_normal(32)  # mostly outside the rows' span
    ours = pursuit(torch.tensor(decoder), target, 16)
    unit = decoder.astype(np.float64) / np.linalg.norm(decoder, axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ended prematurely due to linear dependence"
        path = orthogonal_mp(unit.T, target, n_nonzero_coefs=8, return_path=True)
    path = path.reshape(64, -1)
    theirs = sorted(np.flatnonzero(path[:, -1]), key=lambda f: int(np.argmax(path[f] != 0)))
    assert ours == [int(f) for f in theirs] and len(ours) == 8
    attribution = attribute(rng.standard_normal((5, 32)), torch.tensor(decoder))
    assert len(attribution.support) == 8
    assert np.isfinite(attribution.shift).all() and np.abs(attribution.shift).max() < 100


def test_attribution_at_65536_features_recovers_a_planted_direction():
    """scikit-learn's path would need a 65,536² float64 array (32 GiB) here."""
    from aquin_nb._shift import attribute

    generator = torch.Generator().manual_seed(5)
    decoder = torch.randn(65536, 48, generator=generator)
    planted = int(torch.randint(65536, (1,), generator=generator))
    direction = (decoder[planted] / decoder[planted].norm()).double().numpy()
    per_prompt = (
        0.7 * direction[None, :] + 0.01 * torch.randn(12, 48, generator=generator).double().numpy()
    )
    attribution = attribute(per_prompt, decoder)
    assert attribution.support[0] == planted
    assert attribution.shift[planted] == pytest.approx(0.7, abs=0.02)


def _random_sae(architecture: str, d_sae: int, generator: torch.Generator):
    """A SAELens SAE of ``architecture`` (d_in 32) with every parameter drawn at random."""
    from sae_lens import SAE

    cfg = {"architecture": architecture, "d_in": 32, "d_sae": d_sae, "dtype": "float32"}
    if architecture == "topk":
        cfg["k"] = 16
    sae = SAE.from_dict(cfg)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return sae


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_the_chunked_encode_equals_one_saelens_encode(architecture, monkeypatch):
    """Chunks of 7 rows (an uneven split), 2D and 3D inputs: the same features, to float
    rounding (a product of 7 rows may sum in another order than one of 50)."""
    from aquin_nb import saes
    from aquin_nb.saes import encode

    generator = torch.Generator().manual_seed(2)
    sae = _random_sae(architecture, 256, generator)
    monkeypatch.setattr(saes, "ENCODE_BYTES", 7 * 4 * 256)
    for shape in ((50, 32), (3, 17, 32)):
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = sae.encode(x)
        ours = encode(sae, x)
        assert ours.shape == expected.shape
        assert int((ours > 0).sum()) > 0
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)  # GEMM blocking
    # heads not yet flattened (a hook_z SAE reshapes them itself): one whole call
    calls = []
    sae.encode = lambda x: calls.append(tuple(x.shape)) or torch.zeros(*x.shape[:-2], 256)
    encode(sae, torch.randn(50, 4, 8))
    assert calls == [(50, 4, 8)]


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_the_sparse_decode_equals_saelens_dense_decode(architecture):
    from aquin_nb.saes import decode, sparse_features

    generator = torch.Generator().manual_seed(1)
    sae = _random_sae(architecture, 2048, generator)
    features = torch.relu(torch.randn(64, 2048, generator=generator) - 2.5)  # ~0.6% nonzero
    assert 0 < torch.count_nonzero(features) / features.numel() < 0.05
    torch.testing.assert_close(decode(sae, features), sae.decode(features), rtol=1e-5, atol=1e-4)
    given = sparse_features(features)  # sparse already, as sae_diff passes it
    assert given.is_sparse
    torch.testing.assert_close(decode(sae, given), sae.decode(features), rtol=1e-5, atol=1e-4)
    for half in (torch.bfloat16, torch.float16):  # no sparse half product on the CPU: dense
        sae_half = copy.deepcopy(sae).to(half)
        sparse_half = sparse_features(features.to(half))
        assert sparse_half.is_sparse
        torch.testing.assert_close(
            decode(sae_half, sparse_half), sae_half.decode(features.to(half))
        )
    dense = torch.rand(8, 2048, generator=generator)  # every feature on: the dense path
    torch.testing.assert_close(decode(sae, dense), sae.decode(dense))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "kind", ["rank_1", "rank_4", "rank_16_plus_noise", "gaussian_square", "gaussian_wide", "row"]
)
def test_stable_ranks_match_the_svd(kind, precision, monkeypatch):
    """Block Lanczos, in float32 or on a bfloat16 copy with a last float32 pass (the path a
    CPU with fast bfloat16 takes on large stacks, forced here on small ones)."""
    from aquin_nb import modeldiff
    from aquin_nb.modeldiff import _stable_ranks

    if precision == "bfloat16":
        monkeypatch.setenv("AQUIN_NB_BF16", "1")
        monkeypatch.setattr(modeldiff, "LOW_PRECISION_ELEMENTS", 1)
        monkeypatch.setattr(modeldiff, "MERGED_ELEMENTS", 1)

    generator = torch.Generator().manual_seed(sum(map(ord, kind)))

    def draw(*shape):
        return torch.randn(*shape, generator=generator)

    makers = {
        "rank_1": lambda: draw(96, 1) @ draw(1, 200),
        "rank_4": lambda: draw(200, 4) @ draw(4, 96),
        "rank_16_plus_noise": lambda: draw(128, 16) @ draw(16, 160) + 0.1 * draw(128, 160),
        "gaussian_square": lambda: draw(64, 64),
        "gaussian_wide": lambda: draw(48, 300),
        "row": lambda: draw(1, 50),
    }
    deltas = [makers[kind]() for _ in range(3)] + [draw(7, 5)]  # two shapes, batched apart
    expected = [
        float(d.double().pow(2).sum() / torch.linalg.matrix_norm(d.double(), ord=2) ** 2)
        for d in deltas
    ]
    np.testing.assert_allclose(_stable_ranks(deltas), expected, rtol=1e-3)


@pytest.mark.parametrize("tall", [False, True])
def test_an_update_of_low_rank_costs_two_passes_over_the_stack(tall):
    """The start block Δ·probe spans a rank-≤16 ΔW, so Mᵀ·M with M = Δᵀ·block is
    already T: σ_max² is read from it, without the Krylov step's second pass. Noise
    takes the full iteration. Passes are counted as products reading the stack."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from aquin_nb.modeldiff import _row_summed_norms, _top_sigma2

    class Passes(TorchDispatchMode):
        def __init__(self, stack):
            super().__init__()
            self.size, self.count = stack.numel(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.bmm and any(
                isinstance(a, torch.Tensor) and a.numel() == self.size for a in args
            ):
                self.count += 1
            return func(*args, **(kwargs or {}))

    generator = torch.Generator().manual_seed(11)
    low_rank = torch.randn(3, 120, 6, generator=generator) @ torch.randn(
        3, 6, 200, generator=generator
    )
    noise = torch.randn(3, 120, 200, generator=generator)
    for stack, expected_passes in ((low_rank, 2), (noise, None)):
        stack = stack.transpose(1, 2).contiguous() if tall else stack
        with Passes(stack) as passes:
            sigma2 = _top_sigma2(stack, _row_summed_norms(stack) ** 2)
        exact = torch.linalg.matrix_norm(stack.double(), ord=2) ** 2
        if expected_passes is None:
            assert passes.count > 3
            assert bool((sigma2 <= exact * (1 + 1e-6)).all())
        else:
            assert passes.count == expected_passes
            torch.testing.assert_close(sigma2, exact, rtol=1e-5, atol=0)


def test_weight_norms_of_large_matrices_are_summed_without_float32_drift():
    """A float32 norm over a whole 8,192 × 2,048 matrix is 7.5e-4 low (4% at a real
    128,256 × 2,048 embedding); model_diff's ‖ΔW‖ and ‖W‖ sum float32 row norms in
    float64 and stay within 1e-6 of the float64 norm."""
    from aquin_nb.modeldiff import _delta_stats, _frobenius, _subtracter

    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(8192, 2048, generator=generator) * 0.02
    other = weight + torch.randn(8192, 2048, generator=generator) * 0.01
    exact_delta = float((other.double() - weight.double()).norm())
    exact_weight = float(weight.double().norm())
    [(change, _)] = _delta_stats([((8192, 2048), weight.device, _subtracter(weight, other))])
    assert change == pytest.approx(exact_delta, rel=1e-6)
    assert _frobenius(weight) == pytest.approx(exact_weight, rel=1e-6)
    assert _frobenius(weight.bfloat16()) == pytest.approx(
        float(weight.bfloat16().double().norm()), rel=1e-6
    )


def test_small_matrices_of_many_shapes_share_one_stack_and_keep_their_ranks():
    """Small ΔWs with one narrow side go in one zero-padded stack, tall ones transposed:
    norms and stable ranks are each matrix's own, and the iteration runs once."""
    from aquin_nb import modeldiff
    from aquin_nb.modeldiff import _delta_stats, _subtracter

    generator = torch.Generator().manual_seed(11)

    def draw(*shape):
        return torch.randn(*shape, generator=generator)

    deltas = [
        draw(40, 2) @ draw(2, 100),  # wide, rank 2
        draw(100, 40),  # tall noise: written transposed
        draw(40, 1) @ draw(1, 60),  # rank 1, padded from 60 to 100
        draw(40, 40),
        draw(60, 3) @ draw(3, 40),  # tall, rank 3
    ]
    bases = [draw(*d.shape) for d in deltas]
    jobs = [
        (tuple(d.shape), d.device, _subtracter(w, w + d))
        for d, w in zip(deltas, bases, strict=True)
    ]
    calls = []
    original = modeldiff._top_sigma2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            modeldiff, "_top_sigma2", lambda *a, **k: calls.append(1) or original(*a, **k)
        )
        stats = _delta_stats(jobs)
    assert len(calls) == 1
    for (norm, rank), delta, weight in zip(stats, deltas, bases, strict=True):
        exact = (weight + delta).double() - weight.double()
        expected_rank = float(exact.pow(2).sum() / torch.linalg.matrix_norm(exact, ord=2) ** 2)
        assert norm == pytest.approx(float(exact.norm()), rel=1e-5)
        assert rank == pytest.approx(expected_rank, rel=1e-3)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_stable_rank_of_noise_is_an_upper_bound_within_1_percent(precision, monkeypatch):
    """No dominant direction: Lanczos stops at its cap (documented: under 0.5% high), and the
    estimate is a float32 Rayleigh quotient, so the rank is never below the true one."""
    from aquin_nb import modeldiff
    from aquin_nb.modeldiff import _stable_ranks

    monkeypatch.setenv("AQUIN_NB_BF16", "1" if precision == "bfloat16" else "0")
    monkeypatch.setattr(modeldiff, "LOW_PRECISION_ELEMENTS", 1)
    monkeypatch.setattr(modeldiff, "MERGED_ELEMENTS", 1)
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(768, 3072, generator=generator) for _ in range(2)]
    deltas.append(torch.randn(3072, 768, generator=generator))  # tall: the other side
    expected = np.array(
        [
            float(d.double().pow(2).sum() / torch.linalg.matrix_norm(d.double(), ord=2) ** 2)
            for d in deltas
        ]
    )
    ranks = np.array(_stable_ranks(deltas))
    assert (ranks >= expected * (1 - 1e-6)).all() and (ranks <= expected * 1.01).all()


@pytest.mark.parametrize(
    "threshold, signed", [(1.5, False), (3.2, False), (1.5, True)]
)  # dense-ish, features firing < k times, and negative values (not firings) among them
def test_top_contexts_equal_a_brute_force_top_k_over_the_whole_corpus(threshold, signed):
    """Streamed over batches, the dashboards' top k per feature, their windows, densities and
    histograms equal what sorting every real token of the corpus at once gives."""
    from aquin_nb.dashboards import AFTER, BEFORE, HISTOGRAM_EDGES, TopContexts

    generator = torch.Generator().manual_seed(int(threshold * 10))
    d_sae, k, positions = 64, 4, 30
    batches = []
    for _ in range(5):
        features = torch.randn(3, positions, d_sae, generator=generator) - threshold
        if not signed:
            features = torch.relu(features)
        tokens = torch.randint(0, 500, (3, positions), generator=generator)
        mask = torch.ones(3, positions, dtype=torch.bool)
        mask[:, 0] = False  # BOS
        mask[2, 20:] = False  # padding
        batches.append((features, tokens, mask))
    streamed = TopContexts(d_sae, k)
    for features, tokens, mask in batches:
        streamed.update(features.clone(), tokens, mask)

    candidates = []  # (value, batch, row, position, feature) of every real firing
    for index, (features, _, mask) in enumerate(batches):
        for row, position, feature in (features > 0).nonzero().tolist():
            if mask[row, position]:
                value = float(features[row, position, feature])
                candidates.append((value, index, row, position, feature))
    n_real = sum(int(mask.sum()) for _, _, mask in batches)
    assert int(streamed.n_tokens) == n_real
    for feature in range(d_sae):
        fired = sorted((c for c in candidates if c[4] == feature), reverse=True)
        assert int(streamed.fires[feature]) == len(fired)
        expected_counts = np.bincount(
            np.clip(np.searchsorted(HISTOGRAM_EDGES, [c[0] for c in fired]) - 1, 0, 23),
            minlength=24,
        )
        width = len(HISTOGRAM_EDGES) - 1
        got_counts = streamed.histogram[feature * width : (feature + 1) * width].numpy()
        np.testing.assert_array_equal(got_counts, expected_counts)
        for slot in range(k):
            if slot >= len(fired):
                assert streamed.values[feature, slot] == float("-inf")
                continue
            value, index, row, position, _ = fired[slot]
            assert float(streamed.values[feature, slot]) == value
            features, tokens, mask = batches[index]
            for offset in range(-BEFORE, AFTER + 1):
                spot = position + offset
                real = 0 <= spot < positions and bool(mask[row, spot])
                got_token = int(streamed.tokens[feature, slot, offset + BEFORE])
                got_act = float(streamed.acts[feature, slot, offset + BEFORE])
                assert got_token == (int(tokens[row, spot]) if real else -1)
                assert got_act == (float(features[row, spot, feature]) if real else 0.0)


def _same_tokens(left, right, tolerance=1e-6):
    """Equal (indices, cosines) up to the order of tokens whose cosines tie within rounding."""
    (left_i, left_v), (right_i, right_v) = left, right
    torch.testing.assert_close(left_v, right_v, rtol=0, atol=tolerance)
    for row in range(len(left_i)):
        gaps = torch.diff(left_v[row]).abs() > tolerance  # strictly ordered neighbours
        if bool(gaps.all()):
            assert left_i[row].tolist() == right_i[row].tolist()
        else:
            assert set(left_i[row].tolist()) == set(right_i[row].tolist())


@pytest.mark.parametrize("kind", ["random", "near_ties"])
def test_the_bfloat16_screened_lens_gives_the_float32_tokens(kind, monkeypatch):
    """Screened in bfloat16 and rescored in float32, the lens picks the float32 top and
    bottom tokens; near-ties at the screen's edge fall back to float32 for their rows."""
    from aquin_nb import _lens

    generator = torch.Generator().manual_seed(7)
    vocab, width, rows, k = 20_000, 64, 40, 10
    if kind == "random":
        unembed = torch.randn(vocab, width, generator=generator)
    else:  # a few distinct rows, each repeated with noise far below bfloat16's resolution
        distinct = torch.randn(25, width, generator=generator)
        unembed = distinct.repeat(vocab // 25, 1) * (
            1 + 1e-5 * torch.randn(vocab, 1, generator=generator)
        )
    normed = torch.randn(rows, width, generator=generator)
    norms = unembed.norm(dim=-1)
    redone = []
    exact = _lens._exact

    def spy(subset, *args):
        redone.append(len(subset))
        return exact(subset, *args)

    monkeypatch.setattr(_lens, "_exact", spy)
    screened = _lens._screened(normed, unembed, norms, k)
    monkeypatch.setattr(_lens, "_exact", exact)
    reference = _lens._exact(normed, unembed, norms, k)
    for side in (0, 1):
        _same_tokens(screened[side], reference[side])
    if kind == "near_ties":
        assert sum(redone) == rows  # every row ties at the edge: all redone in float32
    else:
        assert sum(redone) < rows // 4


def test_model_diff_kl_in_chunks_equals_the_float64_definition(monkeypatch):
    """KL(base ‖ checkpoint) and both argmaxes at the real positions, read in cache-sized
    row chunks of the flat logits, equal Σ p·(log p − log q) computed in float64 on the whole batch."""
    from aquin_nb import modeldiff

    generator = torch.Generator().manual_seed(5)
    base = torch.randn(3, 7, 5000, generator=generator) * 3
    ckpt = base + 0.3 * torch.randn(3, 7, 5000, generator=generator)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 5:] = False
    monkeypatch.setattr(modeldiff, "KL_CHUNK_BYTES", 3 * 4 * 5000)  # 3 rows a chunk
    kl = modeldiff._next_token_kls(base[mask], ckpt[mask])
    log_p = base.double().log_softmax(-1)[mask]
    log_q = ckpt.double().log_softmax(-1)[mask]
    expected = (log_p.exp() * (log_p - log_q)).sum(-1)
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(
        modeldiff._next_token_kls(base[mask], base[mask].clone()), torch.zeros(int(mask.sum()))
    )
    chosen = torch.tensor([0, 4, int(mask.sum()) - 1])
    base_next, ckpt_next = modeldiff._guesses(base[mask], ckpt[mask], chosen)
    assert torch.equal(base_next, base[mask].argmax(-1)[chosen])
    assert torch.equal(ckpt_next, ckpt[mask].argmax(-1)[chosen])


def test_the_feature_frame_is_ordered_by_abs_delta_then_feature():
    """Random statistics with many exact ties in |Δ| (zeros and repeated values): the
    frame's rows are pandas' stable sort by (abs_delta descending, feature ascending),
    every column moved with its feature."""
    import pandas as pd

    from aquin_nb._diff_core import feature_frame

    generator = torch.Generator().manual_seed(12)
    stats = PairedFeatureStats(400)
    owner = torch.arange(6).repeat_interleave(5)
    base = torch.relu(torch.randn(30, 400, generator=generator)).round()  # few distinct means
    ckpt = base.clone()
    moved = torch.randperm(400, generator=generator)[:150]
    ckpt[:, moved] += torch.randint(0, 3, (30, 150), generator=generator).float()
    stats.update(base, ckpt, owner, 6)
    frame = feature_frame(stats, 0.05, 0.1, 0.0)
    assert frame["abs_delta"].duplicated().sum() > 100  # ties to break
    expected = frame.sort_values("feature").sort_values(
        ["abs_delta", "feature"], ascending=[False, True], kind="stable"
    )
    pd.testing.assert_frame_equal(frame, expected.reset_index(drop=True))
    features = frame["feature"].to_numpy()
    np.testing.assert_allclose(frame["base"], base.double().mean(0).numpy()[features])
    np.testing.assert_allclose(frame["delta"], (ckpt - base).double().mean(0).numpy()[features])
    np.testing.assert_allclose(frame["p_value"], stats.paired_t_pvalues()[features])
