"""The verdict: intervals, paired tests and a recommendation that follows from them.

evaluate.py scores every model on the same questions; this module turns those
per-question scores into the statements a user acts on.  Every method may have
several seeds; the untuned base model has one.

  interval      95% percentile bootstrap over questions AND seeds (two levels):
                each replicate resamples the questions with replacement and,
                independently, the seeds with replacement, and averages the
                resampled (seed, question) scores.  With one seed it is the
                ordinary bootstrap over questions.
  difference    the same, paired: both methods see the same resampled questions
                (their seeds are resampled independently).
  p-value       exact McNemar test on the per-question outcomes (scipy's
                binomial test on the discordant questions).  With several seeds
                a question's outcome is its mean over seeds, and the test is the
                exact sign-flip (permutation) test on the per-question
                differences, which is McNemar's test when there is one seed.
  adjustment    Holm's step-down over every comparison made: each pair of
                methods and each method against the base.
  significant   Holm-adjusted p < 0.05 and a paired interval that excludes 0
                (the test sees question sampling only; the interval seeds too).
  recommendation  only a method significantly better than the base qualifies;
                among those not significantly worse than the best, the cheapest
                (training time, then peak memory).
"""

from __future__ import annotations

import itertools

import numpy as np

ALPHA = 0.05
BOOTSTRAP = 2000  # replicates: percentile endpoints move by < 0.3 points between seeds of the RNG
RNG_SEED = 0      # fixed, so the same scores always give the same intervals


# --- Per-question score matrices ----------------------------------------------


def score_matrix(runs: list[list[dict]], metric: str) -> np.ndarray:
    """seeds x questions array of one metric (key_match, exact_match as 0/1; token_f1)."""
    return np.array([[float(record[metric]) for record in records] for records in runs])


def bootstrap_indices(n_questions: int, n_replicates: int = BOOTSTRAP,
                      seed: int = RNG_SEED) -> np.ndarray:
    """Resampled question indices, one row per replicate, shared by every method (pairing)."""
    return np.random.default_rng(seed).integers(0, n_questions, (n_replicates, n_questions))


def _seed_draws(n_seeds: int, n_replicates: int, rng) -> np.ndarray:
    """Resampled seed indices, one row per replicate."""
    return rng.integers(0, n_seeds, (n_replicates, n_seeds))


def replicate_means(matrix: np.ndarray, questions: np.ndarray, seed: int) -> np.ndarray:
    """The statistic in each bootstrap replicate: mean over resampled seeds and questions."""
    per_seed = matrix[:, questions].mean(axis=2).T              # replicates x seeds
    draws = _seed_draws(matrix.shape[0], len(questions), np.random.default_rng(seed))
    return np.take_along_axis(per_seed, draws, axis=1).mean(axis=1)


def replicate_perplexity(nll: np.ndarray, tokens: np.ndarray, questions: np.ndarray,
                         seed: int) -> np.ndarray:
    """Answer perplexity in each replicate: exp(resampled NLL sum / resampled token count)."""
    per_seed = nll[:, questions].sum(axis=2).T                  # replicates x seeds
    counts = tokens[questions].sum(axis=1)                      # replicates
    draws = _seed_draws(nll.shape[0], len(questions), np.random.default_rng(seed))
    mean_nll = np.take_along_axis(per_seed, draws, axis=1).mean(axis=1)
    return np.exp(mean_nll / counts)


def interval(replicates: np.ndarray) -> list[float]:
    """The 95% percentile interval of bootstrap replicates."""
    low, high = np.percentile(replicates, [2.5, 97.5])
    return [float(low), float(high)]


# --- Paired tests -------------------------------------------------------------


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes (one seed each)."""
    from scipy.stats import binomtest

    only_a = int(np.sum((a == 1) & (b == 0)))
    only_b = int(np.sum((a == 0) & (b == 1)))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def sign_flip_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact sign-flip test on per-question differences of seed means.

    a, b: seeds x questions 0/1 matrices.  Under the null hypothesis that the
    two methods are exchangeable on every question, each question's difference
    is as likely positive as negative; the p-value is the share of the 2^n
    sign patterns whose total is at least as far from zero as the observed one,
    computed exactly by convolution (differences are multiples of
    1/(seeds_a * seeds_b)).  With one seed each it equals mcnemar_exact.
    """
    scale = a.shape[0] * b.shape[0]
    diffs = np.rint((a.mean(axis=0) - b.mean(axis=0)) * scale).astype(np.int64)
    steps = np.abs(diffs[diffs != 0])
    observed = abs(int(diffs.sum()))
    if len(steps) == 0:
        return 1.0
    total = int(steps.sum())
    dist = np.zeros(2 * total + 1)
    dist[total] = 1.0                                           # index = sum + total
    for step in steps:
        dist = 0.5 * (np.roll(dist, step) + np.roll(dist, -step))
    sums = np.arange(-total, total + 1)
    return float(min(1.0, dist[np.abs(sums) >= observed].sum()))


def paired_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """McNemar's exact test for one seed each; its sign-flip generalisation for several."""
    if a.shape[0] == 1 and b.shape[0] == 1:
        return mcnemar_exact(a[0], b[0])
    return sign_flip_exact(a, b)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# --- Putting it together ------------------------------------------------------


def method_intervals(runs: dict[str, list[list[dict]]], nll: dict[str, np.ndarray],
                     tokens: np.ndarray, metrics: list[str]) -> dict[str, dict]:
    """Per method: mean and 95% interval of each metric (in %) and of answer perplexity."""
    questions = bootstrap_indices(len(tokens))
    out = {}
    for index, (name, records) in enumerate(runs.items()):
        row = {}
        for metric in metrics:
            matrix = score_matrix(records, metric)
            row[metric] = [100 * v for v in interval(replicate_means(matrix, questions, index))]
        row["answer_perplexity"] = interval(
            replicate_perplexity(nll[name], tokens, questions, index))
        out[name] = row
    return out


def pairwise(runs: dict[str, list[list[dict]]], metric: str, base: str = "base") -> list[dict]:
    """Every pair of methods and every method against the base: difference, interval, p-values.

    difference = a - b in points; a positive value means a scored higher.
    """
    names = list(runs)
    pairs = [(a, b) for a, b in itertools.combinations([n for n in names if n != base], 2)]
    pairs += [(a, base) for a in names if a != base and base in runs]
    questions = bootstrap_indices(len(next(iter(runs.values()))[0]))
    matrices = {name: score_matrix(records, metric) for name, records in runs.items()}
    seeds = {name: 1000 + i for i, name in enumerate(names)}
    rows = []
    for a, b in pairs:
        ma, mb = matrices[a], matrices[b]
        diff = (replicate_means(ma, questions, seeds[a])
                - replicate_means(mb, questions, seeds[b]))
        rows.append({"a": a, "b": b, "metric": metric,
                     "difference": 100 * float(ma.mean() - mb.mean()),
                     "ci95": [100 * v for v in interval(diff)],
                     "p_value": paired_p_value(ma, mb)})
    for row, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
        row["p_adjusted"] = adjusted
        row["significant"] = is_significant(row)
    return rows


def _find(pairs: list[dict], a: str, b: str) -> tuple[float, dict]:
    """The comparison of a with b, as (difference a - b, its row), whichever way it was stored."""
    for row in pairs:
        if (row["a"], row["b"]) == (a, b):
            return row["difference"], row
        if (row["a"], row["b"]) == (b, a):
            return -row["difference"], row
    raise KeyError((a, b))


def is_significant(row: dict, alpha: float = ALPHA) -> bool:
    """Whether a comparison shows a difference: Holm-adjusted p < alpha AND a 95% interval without 0.

    The exact test holds each question's seed mean fixed, so it sees only the sampling
    of questions; the interval also resamples seeds.  A difference that training noise
    could undo (the interval reaches 0) is not called significant, so the text never
    says "worse" beside an interval that includes "no difference".
    """
    low, high = row["ci95"]
    return row["p_adjusted"] < alpha and row["difference"] != 0 and not low <= 0 <= high


def significantly(pairs: list[dict], a: str, b: str, alpha: float = ALPHA) -> int:
    """+1 if a is significantly better than b, -1 if significantly worse, 0 if not shown."""
    difference, row = _find(pairs, a, b)
    if not is_significant(row, alpha):
        return 0
    return 1 if difference > 0 else -1


def recommend(rows: list[dict], pairs: list[dict], metric: str, label: str,
              alpha: float = ALPHA) -> str:
    """A recommendation that follows from the paired tests, never contradicting them.

    rows: one per model (base first) with the metric's mean (in %),
    train_seconds and peak_memory_mb.
    """
    by_name = {r["method"]: r for r in rows}
    trained = [r for r in rows if r["method"] != "base"]
    best = max(trained, key=lambda r: r[metric])
    lines = [f"Best {label}: {best['method']} ({best[metric]:.1f}%)."]
    base = by_name.get("base")
    if base is None:
        qualified = list(trained)
        lines.append("The untuned base was not evaluated, so no method is shown to help.")
    else:
        qualified = [r for r in trained if significantly(pairs, r["method"], "base", alpha) > 0]
        others = [r["method"] for r in trained if r not in qualified]
        if qualified:
            lines.append("Significantly better than the untuned base "
                         f"({base[metric]:.1f}%): "
                         + "; ".join(_versus(pairs, r["method"], "base") for r in qualified) + ".")
        if others:
            lines.append("Not shown better than the base: "
                         + "; ".join(_versus(pairs, m, "base") for m in others) + ".")
    if not qualified:
        lines.append("Recommendation: none. No method is significantly better than the untuned "
                     "base model on this data; train longer (--epochs), tune the rate "
                     "(--tune-lr) or add data, then compare again.")
        return " ".join(lines)
    near = [r for r in qualified
            if r is best or significantly(pairs, r["method"], best["method"], alpha) >= 0]
    worse = [r["method"] for r in qualified if r not in near]
    if not near:
        lines.append(f"Recommendation: none. {best['method']} is not significantly better than "
                     "the base, and every method that is, is significantly worse than it.")
        return " ".join(lines)
    choice = min(near, key=lambda r: (r["train_seconds"], r["peak_memory_mb"]))
    if worse:
        lines.append(f"Significantly worse than {best['method']}: "
                     + "; ".join(_versus(pairs, m, best["method"]) for m in worse) + ".")
    if choice is best:
        cheaper = [r["method"] for r in near if r is not best]
        lines.append(f"Recommendation: {best['method']}."
                     + (f" {', '.join(cheaper)} {'is' if len(cheaper) == 1 else 'are'} not "
                        "significantly worse, but not cheaper to train."
                        if cheaper else " No other qualifying method is within reach of it."))
        return " ".join(lines)
    speed = best["train_seconds"] / max(choice["train_seconds"], 1e-9)
    memory = best["peak_memory_mb"] - choice["peak_memory_mb"]
    lines.append(
        f"Recommendation: {choice['method']}, the cheapest method not significantly worse than "
        f"{best['method']} ({_versus(pairs, choice['method'], best['method'])}): it trains "
        f"{speed:.1f}x faster" + (f" with {memory:,.0f} MB less peak memory." if memory > 0 else
                                  f" though with {-memory:,.0f} MB more peak memory."))
    return " ".join(lines)


def _versus(pairs: list[dict], a: str, b: str) -> str:
    """'a +3.2 points [0.4, 6.0], p_adj 0.012' for a compared with b."""
    difference, row = _find(pairs, a, b)
    low, high = row["ci95"] if (row["a"], row["b"]) == (a, b) else [-row["ci95"][1],
                                                                    -row["ci95"][0]]
    caveat = (" (the interval includes 0)" if row["p_adjusted"] < ALPHA and low <= 0 <= high
              else "")
    return (f"{a} {difference:+.1f} points [{low:+.1f}, {high:+.1f}], "
            f"p_adj {_p(row['p_adjusted'])}{caveat}")


def _p(value: float) -> str:
    """A p-value for text: three decimals, or '<0.001'."""
    return "<0.001" if value < 0.001 else f"{value:.3f}"

