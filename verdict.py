"""The verdict: intervals, paired comparisons and a recommendation that follows from them.

evaluate.py scores every model on the same questions; this module turns those
per-question scores into the statements a user acts on.  Each method may have
several training seeds (unequal counts allowed); the untuned base model has one.

The procedure (analytic; no resampling, so no result depends on an RNG seed):

  unit          the fact group: the wordings of one fact are one cluster, because
                they succeed or fail together.  Rows without a `group` are each
                their own cluster.  Every result reports questions and groups.
  score         per question, the mean over a method's seeds (Miller 2024:
                average repeated samples per question before comparing).
  difference    a - b = mean over questions of the per-question paired differences
                of seed means (Miller 2024: paired differences).
  standard error  SE^2 = V_q + sum over the two methods of s2_seed,m / k_m, where
                V_q is the cluster-robust (CR1) variance of the mean of the
                per-question differences, G/(G-1) * sum_g (sum_{q in g} e_q)^2 / n^2
                (Miller 2024: clustered standard errors), and s2_seed,m
                is method m's seed main effect from the crossed seeds x questions
                design (Owen 2007, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2):
                Var(mean) = s2_seed/k + s2_question/n + s2_interaction/(k n)),
                estimated by the method of moments as the between-seed variance of
                seed means minus s2_interaction/n, floored at 0.  The question and
                interaction parts are already inside V_q (seed means per question),
                so each source of noise is counted once.  One seed: s2_seed = 0
                and training variation is not measured (procedure() says so).
  test          t = difference / SE with Welch-Satterthwaite degrees of freedom
                (V_q has G-1, each seed component k_m - 1); two-sided p.
  family        every pair of trained methods and each method against the base:
                Bonferroni, p_adj = min(1, m p); the adjusted interval is
                difference +- t(df, 1 - alpha/(2m)) * SE.  Significant exactly when
                p_adj < alpha, which is exactly when that interval excludes 0.
                Bonferroni rather than Holm: Holm's step-down has no matching
                simultaneous intervals, so the two could disagree again.
  one model     mean +- t(df, 0.975) * SE with the same SE (no pairing, no adjustment).
  perplexity    exp of the ratio (summed NLL / summed tokens): delta-method
                cluster-robust SE of the ratio on the log scale, plus the seed
                component of the NLL-per-token, then exp of the interval's ends.
  recommendation  only a method significantly better than the base qualifies;
                among those not significantly worse than the best, the cheapest
                (training time, then peak memory).  When a learning rate was not
                searched, the text says the ranking may not hold and names TUNE=1.

Valid for 0/1 scores (key accuracy, exact match) and continuous ones (F1): the
t interval needs only a mean and a variance, not a rounding of differences.
Key accuracy is computed on the questions that have a key; the others are left out
and the count kept is reported.
"""

from __future__ import annotations

import itertools

import numpy as np

ALPHA = 0.05
REFERENCES = (
    "Miller 2024, Adding Error Bars to Evals: A Statistical Approach to Language Model "
    "Evaluations, arXiv:2411.00640 (clustered standard errors, paired differences, "
    "averaging repeated samples per question)",
    "Owen 2007, The pigeonhole bootstrap, Annals of Applied Statistics 1(2) "
    "(variance of a mean over a crossed seeds x questions design)",
    "Satterthwaite 1946, An approximate distribution of estimates of variance components, "
    "Biometrics Bulletin 2(6) (degrees of freedom)")


# --- Per-question scores and clusters ----------------------------------------


def group_ids(records: list[dict]) -> list[str]:
    """Cluster id per question: its fact group when recorded, else the question alone."""
    return [str(r["group"]) if r.get("group") not in (None, "") else f"#question {i}"
            for i, r in enumerate(records)]


def score_matrix(runs: list[list[dict]], metric: str) -> np.ndarray:
    """seeds x questions array of one record field; NaN where the record lacks it (no key)."""
    return np.array([[np.nan if record.get(metric) is None else float(record[metric])
                      for record in records] for records in runs])


def _check_groups(groups, runs: dict[str, list[list[dict]]]) -> np.ndarray:
    """Cluster ids as integer codes 0..G-1, after checking every run has one record a question."""
    codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
    for name, seeds in runs.items():
        for records in seeds:
            if len(records) != len(codes):
                raise ValueError(f"{name}: {len(records)} records for {len(codes)} questions; "
                                 "every model must be scored on the same questions")
    return codes


def cluster_variance(values: np.ndarray, codes: np.ndarray) -> tuple[float, int]:
    """CR1 variance of the mean of values with clusters, and the cluster count G.

    G/(G-1) * sum over clusters of (sum of residuals)^2 / n^2; with one question a
    cluster this is the usual s^2/n.  NaN when G < 2 (nothing to estimate from).
    """
    n, n_groups = len(values), len(np.unique(codes))
    if n_groups < 2:
        return float("nan"), n_groups
    sums = np.bincount(codes, weights=values - values.mean())
    return float(n_groups / (n_groups - 1) * np.sum(sums ** 2) / n ** 2), n_groups


def seed_variance(matrix: np.ndarray) -> float:
    """Method-of-moments seed main effect s2_seed of a seeds x questions matrix (0 with one seed).

    Between-seed variance of the seed means estimates s2_seed + s2_interaction/n;
    the two-way residual mean square estimates s2_interaction (Owen 2007).
    """
    k, n = matrix.shape
    if k < 2 or n < 2:
        return 0.0
    seed_means, question_means = matrix.mean(axis=1), matrix.mean(axis=0)
    between = seed_means.var(ddof=1)
    residual = matrix - seed_means[:, None] - question_means[None, :] + matrix.mean()
    interaction = np.sum(residual ** 2) / ((k - 1) * (n - 1))
    return float(max(0.0, between - interaction / n))


def _estimate(values: np.ndarray, codes: np.ndarray, matrices: list[np.ndarray]) -> dict:
    """Mean of per-question values, its SE (clusters + seed components) and Satterthwaite df."""
    question_part, n_groups = cluster_variance(values, codes)
    parts = [(question_part, n_groups - 1)]
    parts += [(seed_variance(m) / m.shape[0], m.shape[0] - 1) for m in matrices]
    variance = sum(v for v, _ in parts)
    denominator = sum(v ** 2 / df for v, df in parts if v > 0)
    df = variance ** 2 / denominator if denominator > 0 else float("inf")
    return {"mean": float(values.mean()), "se": float(np.sqrt(variance)), "df": float(df),
            "n_questions": len(values), "n_groups": n_groups}


def _t_interval(estimate: dict, level: float) -> list[float]:
    """mean +- t(df, (1+level)/2) * SE; [-inf, inf] when the SE cannot be estimated."""
    from scipy.stats import t

    if not np.isfinite(estimate["se"]):
        return [float("-inf"), float("inf")]
    half = float(t.ppf(0.5 + level / 2, estimate["df"])) * estimate["se"]
    return [estimate["mean"] - half, estimate["mean"] + half]


def _p_value(estimate: dict) -> float:
    """Two-sided t-test p-value of mean = 0."""
    from scipy.stats import t

    if not np.isfinite(estimate["se"]) or estimate["mean"] == 0:
        return 1.0
    if estimate["se"] == 0:
        return 0.0
    return float(min(1.0, 2 * t.sf(abs(estimate["mean"]) / estimate["se"], estimate["df"])))


def _finite(value: float) -> float | None:
    """value for JSON: None in place of inf or NaN (e.g. df when the standard error is 0)."""
    return float(value) if np.isfinite(value) else None


def _kept(matrices: list[np.ndarray]) -> np.ndarray:
    """Questions scored by every seed of every matrix (key_match is absent on unkeyed rows)."""
    return np.all([~np.isnan(m).any(axis=0) for m in matrices], axis=0)


# --- Putting it together ------------------------------------------------------


def method_intervals(runs: dict[str, list[list[dict]]], nll: dict[str, np.ndarray],
                     tokens: np.ndarray, metrics: list[str], groups=None) -> dict[str, dict]:
    """Per model: 95% interval of each metric (in %) and of answer perplexity.

    Each row also has "n_questions" and "n_groups" per metric: key_match counts
    only the questions that have a key.
    """
    groups = group_ids(next(iter(runs.values()))[0]) if groups is None else groups
    codes = _check_groups(groups, runs)
    tokens = np.asarray(tokens, dtype=float)
    out = {}
    for name, records in runs.items():
        row, counts, clusters = {}, {}, {}
        for metric in metrics:
            matrix = score_matrix(records, metric)
            keep = _kept([matrix])
            if not keep.any():                                  # e.g. no question has a key
                row[metric], counts[metric], clusters[metric] = None, 0, 0
                continue
            found = _estimate(matrix[:, keep].mean(axis=0), codes[keep], [matrix[:, keep]])
            low, high = _t_interval(found, 0.95)
            # a mean score lies in [0, 100]%; None when one group leaves nothing to estimate
            row[metric] = [max(0.0, 100 * low), min(100.0, 100 * high)] if np.isfinite(
                found["se"]) else None
            counts[metric], clusters[metric] = found["n_questions"], found["n_groups"]
        row["answer_perplexity"] = perplexity_interval(np.asarray(nll[name], dtype=float),
                                                       tokens, codes)
        row["n_questions"], row["n_groups"] = counts, clusters
        out[name] = row
    return out


def perplexity_interval(nll: np.ndarray, tokens: np.ndarray, codes: np.ndarray,
                        level: float = 0.95) -> list[float]:
    """Interval of exp(summed NLL / summed tokens): delta method on the log scale, then exp.

    None when there are fewer than two groups.

    The log perplexity R = mean_q(nll_q) / mean_q(tokens_q) is linearised as
    (nll_q - R tokens_q) / mean(tokens); the seed component is that of the
    seeds x questions matrix nll / mean(tokens), whose seed means are the per-seed R.
    """
    scale = tokens.mean()
    ratio = nll.mean(axis=0).sum() / tokens.sum()
    linear = (nll.mean(axis=0) - ratio * tokens) / scale + ratio   # mean of this is R
    found = _estimate(linear, codes, [nll / scale])
    low, high = _t_interval(found, level)
    return [float(np.exp(low)), float(np.exp(high))] if np.isfinite(found["se"]) else None


def comparisons(names: list[str], base: str = "base") -> list[tuple[str, str]]:
    """The family: every pair of trained methods, then each method against the base."""
    trained = [n for n in names if n != base]
    pairs = list(itertools.combinations(trained, 2))
    return pairs + [(a, base) for a in trained if base in names]


def pairwise(runs: dict[str, list[list[dict]]], metric: str, base: str = "base", groups=None,
             alpha: float = ALPHA) -> list[dict]:
    """Every comparison in the family: difference, adjusted interval, p-values, decision.

    difference = a - b in points; a positive value means a scored higher.  ci95 is
    the Bonferroni-adjusted interval (each at level 1 - alpha/m, so all m hold
    together with probability at least 1 - alpha; the name is kept for the
    renderers).  significant <=> p_adjusted < alpha <=> ci95 excludes 0.
    """
    groups = group_ids(next(iter(runs.values()))[0]) if groups is None else groups
    codes = _check_groups(groups, runs)
    matrices = {name: score_matrix(records, metric) for name, records in runs.items()}
    family = comparisons(list(runs), base)
    rows = []
    for a, b in family:
        keep = _kept([matrices[a], matrices[b]])
        ma, mb = matrices[a][:, keep], matrices[b][:, keep]
        found = (_estimate(ma.mean(axis=0) - mb.mean(axis=0), codes[keep], [ma, mb])
                 if keep.any() else {"mean": 0.0, "se": float("nan"), "df": float("nan"),
                                     "n_questions": 0, "n_groups": 0})
        p = _p_value(found)
        adjusted = min(1.0, len(family) * p)
        low, high = _t_interval(found, 1 - alpha / len(family))
        rows.append({"a": a, "b": b, "metric": metric, "difference": 100 * found["mean"],
                     # clipped to the possible range of a difference of two % scores
                     "ci95": [max(-100.0, 100 * low), min(100.0, 100 * high)],
                     "se": _finite(100 * found["se"]), "df": _finite(found["df"]),
                     "p_value": p, "p_adjusted": adjusted, "alpha": alpha,
                     "significant": adjusted < alpha, "stable": True,  # analytic: no RNG
                     "n_questions": found["n_questions"], "n_groups": found["n_groups"],
                     "seeds": [ma.shape[0], mb.shape[0]]})
    return rows


def procedure(alpha: float, n_comparisons: int, n_questions: int | None = None,
              n_groups: int | None = None, seeds: dict[str, int] | None = None,
              metric: str | None = None) -> dict:
    """How the intervals and decisions were made, for comparison.json and the report."""
    seeds = seeds or {}
    single = sorted(name for name, k in seeds.items() if k < 2 and name != "base")
    return {
        "unit": "fact group (all wordings of one fact form one cluster; rows without a group "
                "are their own cluster)",
        "metric": metric, "questions": n_questions, "groups": n_groups, "seeds": seeds,
        "method": "analytic paired difference of per-question seed means; cluster-robust (CR1) "
                  "standard error over groups plus each method's seed variance component "
                  "(method of moments, crossed seeds x questions), t with Welch-Satterthwaite "
                  "degrees of freedom",
        "adjustment": "Bonferroni", "n_comparisons": n_comparisons, "alpha": alpha,
        "interval_level": 1 - alpha / max(n_comparisons, 1),
        "rule": "significant exactly when the Bonferroni-adjusted interval excludes 0 "
                "(equivalently p_adjusted < alpha)",
        "per_model_intervals": "95% t interval, same standard error, no adjustment",
        "perplexity": "delta-method cluster-robust interval on the log scale, then exp",
        "resampling": "none (analytic); no result depends on an RNG seed",
        "training_variation": ("not measured for " + ", ".join(single) + " (one seed)"
                               if single else "measured (every trained method has 2+ seeds)"),
        "references": list(REFERENCES)}


def describe(found: dict) -> str:
    """procedure()'s dict as two sentences for comparison.md and the HTML report."""
    return (f"Differences a - b on the same {found['questions']} questions in "
            f"{found['groups']} fact groups, standard errors clustered by group, with each "
            "method's seed-to-seed variation added; t intervals with "
            f"Satterthwaite degrees of freedom, Bonferroni-adjusted over {found['n_comparisons']} "
            f"comparisons (each interval at {100 * found['interval_level']:.2f}%). A difference "
            f"is significant exactly when its adjusted interval excludes 0 (adjusted p < "
            f"{found['alpha']:g}); training variation {found['training_variation']}.")


def _find(pairs: list[dict], a: str, b: str) -> tuple[float, dict]:
    """The comparison of a with b, as (difference a - b, its row), whichever way it was stored."""
    for row in pairs:
        if (row["a"], row["b"]) == (a, b):
            return row["difference"], row
        if (row["a"], row["b"]) == (b, a):
            return -row["difference"], row
    raise KeyError((a, b))


def is_significant(row: dict, alpha: float = ALPHA) -> bool:
    """Whether a comparison shows a difference: Bonferroni-adjusted p < alpha.

    With the alpha pairwise() was given, this is exactly "the adjusted interval excludes 0".
    """
    return row["p_adjusted"] < alpha and row["difference"] != 0


def significantly(pairs: list[dict], a: str, b: str, alpha: float = ALPHA) -> int:
    """+1 if a is significantly better than b, -1 if significantly worse, 0 if not shown."""
    difference, row = _find(pairs, a, b)
    if not is_significant(row, alpha):
        return 0
    return 1 if difference > 0 else -1


def recommend(rows: list[dict], pairs: list[dict], metric: str, label: str,
              alpha: float = ALPHA) -> str:
    """A recommendation that follows from the paired comparisons, never contradicting them.

    rows: one per model (base first) with the metric's mean (in %), train_seconds,
    peak_memory_mb and, for trained methods, lr_source.  When a trained method's
    learning rate was not searched, the text says the ranking may not hold.
    """
    text = _recommendation(rows, pairs, metric, label, alpha)
    untuned = [r["method"] for r in rows
               if r["method"] != "base" and not str(r.get("lr_source") or "").startswith("search")]
    if untuned:
        rates = ("The learning rate of " + untuned[0] + " was" if len(untuned) == 1 else
                 "The learning rates of " + ", ".join(untuned) + " were")
        text += (f" {rates} not searched, so this ranking "
                 "may not hold at tuned rates: rerun with `make all ... TUNE=1` (or "
                 "`--tune-lr`) before acting on it.")
    return text


def _recommendation(rows: list[dict], pairs: list[dict], metric: str, label: str,
                    alpha: float) -> str:
    """The statements of recommend(), from the decisions at level alpha."""
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
    """'a +3.2 points [0.4, 6.0], p_adj 0.012' for a compared with b (the adjusted interval)."""
    difference, row = _find(pairs, a, b)
    low, high = row["ci95"] if (row["a"], row["b"]) == (a, b) else [-row["ci95"][1],
                                                                    -row["ci95"][0]]
    return (f"{a} {difference:+.1f} points [{low:+.1f}, {high:+.1f}], "
            f"p_adj {_p(row['p_adjusted'])}")


def _p(value: float) -> str:
    """A p-value for text: three decimals, or '<0.001'."""
    return "<0.001" if value < 0.001 else f"{value:.3f}"

