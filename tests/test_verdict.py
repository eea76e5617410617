"""verdict.py: intervals, paired tests, Holm's adjustment and the recommendation, by hand."""

import numpy as np
import pytest
from scipy.stats import binomtest

import verdict

N = 462  # the default eval set's size when the issue was written


def outcomes(n_correct: int, n: int = N, start: int = 0) -> np.ndarray:
    """A 0/1 vector with n_correct ones from position start (wrapping)."""
    vector = np.zeros(n)
    vector[(np.arange(n_correct) + start) % n] = 1
    return vector


def records(*seeds: np.ndarray) -> list[list[dict]]:
    """Per-seed record lists as evaluate.py writes them (key_match only)."""
    return [[{"key_match": bool(v)} for v in seed] for seed in seeds]


# --- Tests and adjustment against hand-computed values ------------------------


def test_mcnemar_exact_by_hand():
    a = np.array([1, 1, 1, 0, 1, 0])
    b = np.array([0, 0, 1, 0, 1, 1])
    # discordant: a-only 2, b-only 1: two-sided binomial = P(X<=1)+P(X>=2) of Bin(3, 1/2) = 1
    assert verdict.mcnemar_exact(a, b) == pytest.approx(1.0)
    a, b = np.ones(10), np.zeros(10)
    assert verdict.mcnemar_exact(a, b) == pytest.approx(2 * 0.5 ** 10)
    assert verdict.mcnemar_exact(np.ones(5), np.ones(5)) == 1.0


def test_sign_flip_equals_mcnemar_with_one_seed():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
        only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        expected = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        assert verdict.sign_flip_exact(a[None], b[None]) == pytest.approx(expected, rel=1e-9)


def test_sign_flip_with_seeds_by_enumeration():
    """Three questions, two seeds: enumerate all 8 sign patterns by hand."""
    a = np.array([[1, 1, 0], [1, 0, 1]])   # seed means 1, .5, .5
    b = np.array([[0, 0, 0]])              # means 0, 0, 0
    # differences x2 (scale = 2 seeds * 1 seed): 2, 1, 1; observed sum 4
    sums = [s1 * 2 + s2 + s3 for s1 in (1, -1) for s2 in (1, -1) for s3 in (1, -1)]
    expected = sum(abs(s) >= 4 for s in sums) / 8
    assert verdict.sign_flip_exact(a, b) == pytest.approx(expected)


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 with m=3: 0.03, max(0.03, 0.04)=0.04, max(0.04, 0.04)=0.04
    assert verdict.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert verdict.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert verdict.holm([0.001]) == pytest.approx([0.001])


# --- Intervals ---------------------------------------------------------------


def test_interval_is_degenerate_for_constant_scores():
    q = verdict.bootstrap_indices(50)
    assert verdict.interval(verdict.replicate_means(np.ones((1, 50)), q, 0)) == [1.0, 1.0]


def test_interval_matches_the_normal_approximation_with_one_seed():
    """Bootstrap of a proportion p on n questions: about p +- 1.96 sqrt(p(1-p)/n)."""
    matrix = outcomes(231)[None]  # 50% of 462
    low, high = verdict.interval(verdict.replicate_means(matrix, verdict.bootstrap_indices(N), 0))
    half = 1.96 * np.sqrt(0.25 / N)
    assert low == pytest.approx(0.5 - half, abs=0.01)
    assert high == pytest.approx(0.5 + half, abs=0.01)


def test_interval_widens_when_seeds_disagree():
    q = verdict.bootstrap_indices(N)
    agree = np.stack([outcomes(231), outcomes(231)])
    disagree = np.stack([outcomes(150), outcomes(312)])  # same mean, seeds 35 points apart
    width = lambda m: np.subtract(*verdict.interval(verdict.replicate_means(m, q, 0))[::-1])
    assert width(disagree) > 2 * width(agree)


def test_perplexity_interval_contains_the_pooled_value():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 6, 100).astype(float)
    nll = (tokens * rng.uniform(0.5, 1.5, 100))[None]
    pooled = np.exp(nll.sum() / tokens.sum())
    low, high = verdict.interval(verdict.replicate_perplexity(
        nll, tokens, verdict.bootstrap_indices(100), 0))
    assert low < pooled < high


# --- The recommendation --------------------------------------------------------


def verdict_for(accuracies: dict, seconds: dict, memory: dict | None = None,
                overlap: dict | None = None) -> tuple[str, list[dict]]:
    """Recommendation for synthetic per-question outcomes (n = 462).

    accuracies: method -> % correct; overlap: method -> where its correct
    answers start (shifted sets make the discordance mixed, as in real data).
    """
    overlap = overlap or {}
    runs = {m: records(outcomes(round(acc * N / 100), start=overlap.get(m, 0)))
            for m, acc in accuracies.items()}
    pairs = verdict.pairwise(runs, "key_match")
    rows = [{"method": m, "key_accuracy": 100 * np.mean([r["key_match"] for r in runs[m][0]]),
             "train_seconds": seconds.get(m), "peak_memory_mb": (memory or {}).get(m, 1000)}
            for m in accuracies]
    return verdict.recommend(rows, pairs, "key_accuracy", "key accuracy"), pairs


def test_never_recommends_a_method_not_better_than_base():
    # the example: base 40, full 48, bitfit 42; bitfit's gains are mixed with losses
    text, _ = verdict_for({"base": 40, "full": 48, "bitfit": 42},
                          {"full": 300, "bitfit": 100}, overlap={"bitfit": 20})
    assert "Recommendation: full" in text
    assert "Recommendation: bitfit" not in text
    assert "Not shown better than the base: bitfit" in text


def test_a_method_below_base_is_never_recommended():
    text, _ = verdict_for({"base": 40, "full": 48, "bitfit": 38},
                          {"full": 300, "bitfit": 100}, overlap={"bitfit": 5})
    assert "Recommendation: full" in text and "Recommendation: bitfit" not in text


def test_no_contradiction_near_the_threshold():
    """base 50 vs full 56.42: the text says 'better' or 'not shown', never both."""
    text, pairs = verdict_for({"base": 50, "full": 56.42}, {"full": 300}, overlap={"full": 40})
    better = "Significantly better than the untuned base" in text
    assert better != ("Not shown better than the base" in text)
    assert better == (pairs[0]["p_adjusted"] < 0.05)
    assert ("Recommendation: none" in text) != better


def test_cheapest_method_not_significantly_worse_than_the_best():
    # full 80 and lora 79 share most questions (not significantly different); bitfit 60 is worse
    text, _ = verdict_for({"base": 40, "full": 80, "lora": 79, "bitfit": 60},
                          {"full": 900, "lora": 300, "bitfit": 100},
                          {"full": 3000, "lora": 2000, "bitfit": 1500})
    assert "Best key accuracy: full" in text
    assert "Recommendation: lora" in text and "3.0x faster" in text
    assert "Significantly worse than full: bitfit" in text


def test_best_method_recommended_when_every_cheaper_one_is_worse():
    text, _ = verdict_for({"base": 40, "full": 80, "lora": 60},
                          {"full": 900, "lora": 300})
    assert "Recommendation: full" in text
    assert "Significantly worse than full: lora" in text


def test_none_when_nothing_beats_the_base():
    text, _ = verdict_for({"base": 40, "full": 41, "lora": 40.5},
                          {"full": 900, "lora": 300}, overlap={"full": 30, "lora": 60})
    assert "Recommendation: none" in text
    assert "Significantly better" not in text


def test_pairwise_covers_every_pair_and_the_base_with_holm():
    _, pairs = verdict_for({"base": 40, "full": 80, "lora": 79, "qlora": 70, "bitfit": 60},
                           {"full": 1, "lora": 1, "qlora": 1, "bitfit": 1})
    assert len(pairs) == 6 + 4
    assert {(p["a"], p["b"]) for p in pairs if p["b"] == "base"} == {
        (m, "base") for m in ("full", "lora", "qlora", "bitfit")}
    assert [p["p_adjusted"] for p in pairs] == pytest.approx(
        verdict.holm([p["p_value"] for p in pairs]))
    for p in pairs:
        assert p["ci95"][0] <= p["difference"] <= p["ci95"][1]
        assert set(p) >= {"a", "b", "metric", "difference", "ci95", "p_value", "p_adjusted"}


def test_significant_needs_the_test_and_an_interval_without_zero():
    row = {"difference": -2.8, "ci95": [-5.8, 0.1], "p_adjusted": 0.039}
    assert not verdict.is_significant(row)  # the interval still allows no difference
    assert verdict.is_significant({**row, "ci95": [-5.8, -0.4]})
    assert not verdict.is_significant({**row, "ci95": [-5.8, -0.4], "p_adjusted": 0.06})
    pairs = [{"a": "full", "b": "lora", **row}]
    assert verdict.significantly(pairs, "lora", "full") == 0
    pairs[0]["ci95"] = [-5.8, -0.4]
    assert verdict.significantly(pairs, "lora", "full") == 1
    assert verdict.significantly(pairs, "full", "lora") == -1
