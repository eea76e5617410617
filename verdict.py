"""The verdict: intervals, comparisons with the best, and a recommendation that proves its claim.

evaluate.py scores every model on the same questions; this module turns those
per-question scores into the statements a user acts on.  Each method may have
several training seeds (unequal counts allowed); the untuned base model has one.
No random numbers are drawn: the same scores always give the same verdict.

The estimate (one pair a, b; also one model alone):

  unit          the fact group: the wordings of one fact are one cluster, because
                they succeed or fail together.  Rows without a `group` are each
                their own cluster (Miller 2024, clustered standard errors).
  score         per question, the mean over a method's seeds; a - b is the mean
                over questions of the paired differences of those seed means
                (Miller 2024: average repeated samples, then pair).
  model         y_msq = mu_m + a_ms + b_mq + e_msq: seed effect a (variance s2_a),
                question effect b, seed-by-question noise e that is correlated
                within a fact group.  Var(a - b) = V_Q + sum_m B_m / k_m, where V_Q
                is the variance of the question effects' mean difference and
                B_m = s2_a,m + I_m is the variance of one seed's mean score, I_m
                being the (clustered) variance of the mean of one seed's noise
                (Owen 2007's crossed-design variance, with clusters in place of
                independent questions).
  estimators    V_q = CR1 variance over fact groups of the per-question differences
                of seed means, G/(G-1) sum_g (sum_{q in g} e_q)^2 / n^2; it
                estimates V_Q + sum_m I_m / k_m.
                B_m = between-seed variance of method m's seed means (k_m - 1 df),
                unbiased for s2_a,m + I_m whatever the clustering.
                I_m = CR1 variance of the mean of each seed's two-way residuals,
                summed over seeds / (k_m - 1): the fact group is the unit here too
                (the old estimator divided the interaction mean square by n, as if
                questions were independent, which overstated s2_a).
                SE^2 = (V_q - sum_m I_m / k_m) + sum_m B_m / k_m.  Nothing is
                floored at a seed term: the question part is floored at 0 only when
                the data make it negative, so every part varies continuously.
  df            Welch-Satterthwaite over the parts: the question part with G - 1,
                each B_m / k_m with k_m - 1 (Satterthwaite 1946).  With equal scores
                the df move smoothly with the data; they no longer jump from ~4 to
                ~275 when a floored seed term reaches 0.
  one seed      B_m is unknown and left out: the noise of that one seed is inside
                V_q, but training variation is not measured (procedure() says so).
  pooling       s2_a is not pooled across methods.  Pooling would give more df, but
                the seed SDs measured on the published run differ by a factor of
                ~4 between methods (QLoRA's is the largest), and pooling would lend
                the noisiest method the others' small variance: exactly the method
                whose noise the old rule rewarded.

The decisions (all hold together with probability >= 1 - alpha):

  gate          each trained method against the untuned base: one-sided lower bound
                at level 1 - alpha_base / m (Bonferroni over the m methods), with
                alpha_base = BASE_SHARE * alpha.  A method "helps" when its bound > 0.
                These effects are large (tens of points), so a small share of alpha
                costs them nothing.
  pairs         every pair of trained methods: a two-sided interval D_ij +- d_ij SE_ij,
                d_ij = t(df_ij, 1 - alpha_best / (m (m - 1))), Bonferroni over the
                m(m-1)/2 pairs (the pairs share questions and have unequal variances,
                so no Tukey or Dunnett constant applies exactly); alpha_best is the
                rest of alpha.  On the event that every interval holds:
  best          i is shown worse than j when D_ij + d_ij SE_ij < 0; the best set B is
                every method shown worse than none, so it holds every true best.
                Bounds on i's gap to the best of the others, theta_i - max_{j != i}
                theta_j (comparisons with the best derived from all pairs, Hsu 1996,
                ch. 4; Hsu 1984, Ann. Statist. 12(3)):
                  U_i = min_{j != i} (D_ij + d_ij SE_ij)
                  L_i = min(0, min_{j in B, j != i} (D_ij - d_ij SE_ij)), or, when
                        B = {i}, min_{j != i} (D_ij - d_ij SE_ij): i is ahead of all.
                Hsu's one-sided MCB (d at alpha_best / (m - 1)) is narrower, but its
                "not the best" is not "worse" when methods tie: in a null simulation
                of four equal methods it called one worse in 11% of trials.
  margin        delta (--margin, in points of the headline metric), declared before
                the run.  The recommendation is the cheapest method that helps and
                whose L_i > -delta: "at most |L_i| points below the best".  If none
                clears it the verdict is "inconclusive at delta", with the best set,
                each member's worst case, and a plan (seeds and/or questions) that
                would settle it, projected from the variance components.  No
                statement rests on a test failing to reject (CONSORT non-inferiority:
                Piaggio et al., JAMA 2012; EMA CPMP/EWP/482/99; Schuirmann 1987).

Per-model intervals are 95% t intervals with the same standard error.  Answer
perplexity is a ratio (summed NLL / summed tokens): delta-method cluster-robust
SE on the log scale, with the seed parts, then exp.  Bonferroni and Holm both
have simultaneous intervals (Holm's step-down ones are Strassburger & Bretz 2008);
the gap to the best is reported because it answers the question asked: "how far
from the best could this method be?"

Forgetting (nll_difference and after): a model's mean NLL per token on the
general-text probe minus the base's is one ratio of sums over documents,
linearised and estimated as above with the document as the cluster.  It is
stated and flagged, never used to choose (FORGETTING_RULE).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
INTERVAL_LEVEL = 0.95  # per-model intervals: one model at a time, no adjustment
MARGIN = 5.0          # points of the headline metric; README "The verdict" argues it
BASE_SHARE = 0.2      # share of alpha spent on the gate against the untuned base
MAX_PLAN_SEEDS = 30   # the plan looks no further than this many seeds a method
QUESTION_FACTORS = (1.5, 2, 3, 4, 6, 8)  # and no further than 8x the questions

REFERENCES = (
    "Miller 2024, Adding Error Bars to Evals: A Statistical Approach to Language Model "
    "Evaluations, arXiv:2411.00640 (clustered standard errors, paired differences, "
    "averaging repeated samples per question)",
    "Owen 2007, The pigeonhole bootstrap, Annals of Applied Statistics 1(2) "
    "(variance of a mean over a crossed seeds x questions design)",
    "Satterthwaite 1946, An approximate distribution of estimates of variance components, "
    "Biometrics Bulletin 2(6) (degrees of freedom)",
    "Hsu 1984, Constrained simultaneous confidence intervals for multiple comparisons with "
    "the best, Annals of Statistics 12(3); Hsu 1996, Multiple Comparisons: Theory and "
    "Methods, ch. 4 (comparisons with the best, the best set)",
    "Piaggio et al. 2012, Reporting of noninferiority and equivalence randomized trials, "
    "JAMA 308(24) (a margin declared in advance; a bound that must clear it)",
    "Schuirmann 1987, A comparison of the two one-sided tests procedure, J. Pharmacokinet. "
    "Biopharm. 15(6) (one-sided bounds against a margin)")


# --- Per-question scores and clusters ----------------------------------------


def group_ids(records: list[dict]) -> list[str]:
    """Cluster id per question: its fact group when recorded, else the question alone."""
    return [str(r["group"]) if r.get("group") not in (None, "") else f"#question {i}"
            for i, r in enumerate(records)]


def score_matrix(runs: list[list[dict]], metric: str) -> np.ndarray:
    """seeds x questions array of one record field; NaN where the record lacks it (no key)."""
    return np.array([[np.nan if record.get(metric) is None else float(record[metric])
                      for record in records] for records in runs])


def group_codes(groups) -> np.ndarray:
    """Cluster ids (group_ids(), or any labels) as integer codes 0..G-1."""
    return np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]


def _check_groups(groups, runs: dict[str, list[list[dict]]]) -> np.ndarray:
    """Cluster ids as integer codes 0..G-1, after checking every run has one record a question."""
    codes = group_codes(groups)
    for name, seeds in runs.items():
        for records in seeds:
            if len(records) != len(codes):
                raise ValueError(f"{name}: {len(records)} records for {len(codes)} questions; "
                                 "every model must be scored on the same questions")
    return codes


def _codes(runs: dict, groups) -> np.ndarray:
    """Cluster codes of the runs' questions (from the first run's records unless given)."""
    groups = group_ids(next(iter(runs.values()))[0]) if groups is None else groups
    return _check_groups(groups, runs)


def cluster_variance(values: np.ndarray, codes: np.ndarray) -> tuple[float, int]:
    """CR1 variance of the mean of values with clusters, and the cluster count G.

    G/(G-1) * sum over clusters of (sum of residuals)^2 / n^2; with one question a
    cluster this is the usual s^2/n.  NaN when G < 2 (nothing to estimate from).
    """
    counts = np.bincount(codes)
    n, n_groups = len(values), int(np.count_nonzero(counts))
    if n_groups < 2:
        return float("nan"), n_groups
    sums = np.bincount(codes, weights=values - values.mean())
    return float(n_groups / (n_groups - 1) * np.sum(sums ** 2) / n ** 2), n_groups


def seed_components(matrix: np.ndarray, codes: np.ndarray) -> dict:
    """A seeds x questions matrix's seed parts: k, B (variance of a seed's mean), I (its noise).

    B = between-seed variance of the seed means (k - 1 df), which estimates
    s2_seed + I; I = CR1 variance over fact groups of the mean of one seed's two-way
    residuals, summed over seeds / (k - 1) (one df a seed goes to the question means).
    Both NaN with one seed: training variation is then not measured.
    """
    k, n = matrix.shape
    if k < 2 or n < 2:
        return {"k": k, "between": float("nan"), "noise": float("nan")}
    seed_means = matrix.mean(axis=1)
    residual = matrix - seed_means[:, None] - matrix.mean(axis=0)[None, :] + matrix.mean()
    noise = sum(cluster_variance(row, codes)[0] for row in residual) / (k - 1)
    return {"k": k, "between": float(seed_means.var(ddof=1)), "noise": float(noise)}


def seed_sd(parts: dict) -> float | None:
    """SD of a method's seed effect from its seed_components() (s2_seed = B - I, shown floored
    at 0), or None with one seed."""
    if not np.isfinite(parts["between"]):
        return None
    return float(np.sqrt(max(0.0, parts["between"] - parts["noise"])))


def _satterthwaite(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """(sum of the variance parts, Welch-Satterthwaite df) of (variance, df) parts."""
    variance = sum(v for v, _ in parts)
    denominator = sum(v ** 2 / df for v, df in parts if v > 0 and df > 0)
    return variance, (variance ** 2 / denominator if denominator > 0 else float("inf"))


def _combine(question: float, n_groups: int, seeds: list[dict]) -> dict:
    """SE^2 = (V_q - sum I/k) + sum B/k and its Satterthwaite df (see the module docstring)."""
    measured = [s for s in seeds if np.isfinite(s["between"])]
    question_part = max(0.0, question - sum(s["noise"] / s["k"] for s in measured))
    variance, df = _satterthwaite([(question_part, n_groups - 1)]
                                  + [(s["between"] / s["k"], s["k"] - 1) for s in measured])
    return {"se": float(np.sqrt(variance)) if np.isfinite(variance) else float("nan"),
            "df": float(df), "question_part": question_part}


def _estimate(values: np.ndarray, codes: np.ndarray, matrices: list[np.ndarray],
              seeds: list[dict] | None = None) -> dict:
    """Mean of per-question values, its SE (clusters + seed parts), df and the components.

    seeds: the matrices' seed_components() when the caller already has them.
    """
    question, n_groups = cluster_variance(values, codes)
    seeds = seeds or [seed_components(m, codes) for m in matrices]
    found = _combine(question, n_groups, seeds)
    return {"mean": float(values.mean()), **found, "n_questions": len(values),
            "n_groups": n_groups, "seeds": seeds}


def _t(df: float, level: float) -> float:
    """The level quantile of Student's t with df degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(level, df))


def _t_interval(estimate: dict, level: float) -> list[float]:
    """mean +- t(df, (1+level)/2) * SE; [-inf, inf] when the SE cannot be estimated."""
    if not np.isfinite(estimate["se"]):
        return [float("-inf"), float("inf")]
    half = _t(estimate["df"], 0.5 + level / 2) * estimate["se"]
    return [estimate["mean"] - half, estimate["mean"] + half]


def _finite(value: float) -> float | None:
    """value for JSON: None in place of inf or NaN (e.g. df when the standard error is 0)."""
    return float(value) if value is not None and np.isfinite(value) else None


def _kept(matrices: list[np.ndarray]) -> np.ndarray:
    """Questions scored by every seed of every matrix (key_match is absent on unkeyed rows)."""
    return np.all([~np.isnan(m).any(axis=0) for m in matrices], axis=0)


# --- One model alone ------------------------------------------------------------


def method_intervals(runs: dict[str, list[list[dict]]], nll: dict[str, np.ndarray],
                     tokens: np.ndarray, metrics: list[str], groups=None) -> dict[str, dict]:
    """Per model: 95% interval of each metric (in %), of answer perplexity, and the seed SD.

    Each row also has "n_questions" and "n_groups" per metric: key_match counts
    only the questions that have a key.
    """
    codes = _codes(runs, groups)
    tokens = np.asarray(tokens, dtype=float)
    out = {}
    for name, records in runs.items():
        row, counts, clusters, spread = {}, {}, {}, {}
        for metric in metrics:
            matrix = score_matrix(records, metric)
            keep = _kept([matrix])
            if not keep.any():                                  # e.g. no question has a key
                row[metric], counts[metric], clusters[metric], spread[metric] = None, 0, 0, None
                continue
            found = _estimate(matrix[:, keep].mean(axis=0), codes[keep], [matrix[:, keep]])
            low, high = _t_interval(found, INTERVAL_LEVEL)
            # a mean score lies in [0, 100]%; None when one group leaves nothing to estimate
            row[metric] = [max(0.0, 100 * low), min(100.0, 100 * high)] if np.isfinite(
                found["se"]) else None
            counts[metric], clusters[metric] = found["n_questions"], found["n_groups"]
            sd = seed_sd(found["seeds"][0])
            spread[metric] = None if sd is None else 100 * sd
        row["answer_perplexity"] = perplexity_interval(np.asarray(nll[name], dtype=float),
                                                       tokens, codes)
        row["n_questions"], row["n_groups"], row["seed_sd"] = counts, clusters, spread
        out[name] = row
    return out


def linearised_ratio(values: np.ndarray, tokens: np.ndarray) -> tuple[float, np.ndarray]:
    """R = sum(values) / sum(tokens) and its delta-method terms per question, whose mean is R.

    (values_q - R tokens_q) / mean(tokens) + R: the variance of their mean (clustered,
    cluster_variance) is the delta-method variance of R.
    """
    ratio = float(values.sum() / tokens.sum())
    return ratio, (values - ratio * tokens) / tokens.mean() + ratio


def perplexity_interval(nll: np.ndarray, tokens: np.ndarray, codes: np.ndarray,
                        level: float = INTERVAL_LEVEL) -> list[float] | None:
    """Interval of exp(summed NLL / summed tokens): delta method on the log scale, then exp.

    None when there are fewer than two groups.  The log perplexity
    R = mean_q(nll_q) / mean_q(tokens_q) is linearised as (nll_q - R tokens_q) / mean(tokens);
    the seed parts are those of the seeds x questions matrix nll / mean(tokens), whose seed
    means are the per-seed R.
    """
    ratio, linear = linearised_ratio(nll.mean(axis=0), tokens)
    found = _estimate(linear, codes, [nll / tokens.mean()])
    low, high = _t_interval(found, level)
    return [float(np.exp(low)), float(np.exp(high))] if np.isfinite(found["se"]) else None


# --- Pairs ----------------------------------------------------------------------


def _pair(matrices: dict[str, np.ndarray], codes: np.ndarray, a: str, b: str,
          cache: dict | None = None) -> dict:
    """The paired estimate of a - b on the questions both scored (a fraction, not points).

    cache: seed_components() by (method, kept questions), shared across a family's pairs.
    """
    keep = _kept([matrices[a], matrices[b]])
    if not keep.any():
        return {"mean": 0.0, "se": float("nan"), "df": float("nan"), "n_questions": 0,
                "n_groups": 0, "seeds": [], "question_part": float("nan")}
    ma, mb = matrices[a][:, keep], matrices[b][:, keep]
    cache = {} if cache is None else cache
    seeds = []
    for name, matrix in ((a, ma), (b, mb)):
        key = (name, keep.tobytes())
        if key not in cache:
            cache[key] = seed_components(matrix, codes[keep])
        seeds.append(cache[key])
    return _estimate(ma.mean(axis=0) - mb.mean(axis=0), codes[keep], [ma, mb], seeds)


@dataclass(frozen=True)
class Estimates:
    """The score matrices and every pair's paired estimate, made once for the whole verdict.

    pairs holds (a, b) for every pair of trained methods in both orders (b, a being
    a, b negated) and (a, base) for each trained method; pairwise(), compare_with_best()
    and settle_plan() all read these, so each pair is estimated once.
    """

    metric: str | None
    base: str
    codes: np.ndarray
    matrices: dict[str, np.ndarray]
    pairs: dict[tuple[str, str], dict]

    @property
    def trained(self) -> list[str]:
        return [n for n in self.matrices if n != self.base]

    def seeds(self, name: str) -> int:
        return int(self.matrices[name].shape[0])


def estimate(runs: dict[str, list[list[dict]]], metric: str, base: str = "base",
             groups=None) -> Estimates:
    """Score matrices of one record field (metric) and every pair's estimate, from the runs."""
    codes = _codes(runs, groups)
    matrices = {name: score_matrix(records, metric) for name, records in runs.items()}
    return estimate_matrices(matrices, codes, base, metric)


def estimate_matrices(matrices: dict[str, np.ndarray], codes: np.ndarray, base: str = "base",
                      metric: str | None = None) -> Estimates:
    """estimate() on seeds x questions score matrices (NaN: not scored)."""
    trained = [n for n in matrices if n != base]
    cache: dict = {}
    pairs = {}
    for a, b in itertools.combinations(trained, 2):
        found = _pair(matrices, codes, a, b, cache)
        pairs[(a, b)] = found
        pairs[(b, a)] = {**found, "mean": -found["mean"], "seeds": found["seeds"][::-1]}
    if base in matrices:
        for a in trained:
            pairs[(a, base)] = _pair(matrices, codes, a, base, cache)
    return Estimates(metric, base, codes, matrices, pairs)


def pairwise(found: Estimates) -> list[dict]:
    """Every pair of trained methods, then each against the base: difference, SE and df.

    difference = a - b in points (positive: a scored higher).  These are the
    estimates the decisions use; the decisions themselves, with their simultaneous
    bounds, are compare_with_best()'s.  No p-value is given here on purpose: an
    unadjusted p-value beside a family of decisions invites reading it as one.
    """
    trained, base = found.trained, found.base
    family = list(itertools.combinations(trained, 2)) + [(a, base) for a in trained
                                                          if base in found.matrices]
    rows = []
    for a, b in family:
        pair = found.pairs[(a, b)]
        rows.append({"a": a, "b": b, "metric": found.metric, "difference": 100 * pair["mean"],
                     "se": _finite(100 * pair["se"]), "df": _finite(pair["df"]),
                     "n_questions": pair["n_questions"], "n_groups": pair["n_groups"],
                     "seeds": [found.seeds(a), found.seeds(b)]})
    return rows


# --- Comparisons with the best, and the gate against the base -------------------


def compare_with_best(found: Estimates, alpha: float = ALPHA, margin: float = MARGIN) -> dict:
    """Bounds on every trained method's gap to the best of the others, the best set, the gate.

    Returns {"alpha", "alpha_best", "alpha_base", "margin", "best_set", "methods",
    "critical", "metric"}; each method's entry has its mean, its gap to the best of the
    others (estimate, lower and upper simultaneous bounds, in points), shown_worse_than,
    in_best_set, clears_margin and "base" (difference, one-sided lower bound, helps).
    See the module docstring.
    """
    return {**_best(found, alpha, margin), "metric": found.metric}


def pair_level(alpha_best: float, m: int) -> float:
    """The t quantile level of every pair's bound: two-sided Bonferroni over m(m-1)/2 pairs."""
    return 1 - alpha_best / max(m * (m - 1), 1)


def best_of_matrices(matrices: dict[str, np.ndarray], codes: np.ndarray, base: str = "base",
                     alpha: float = ALPHA, margin: float = MARGIN) -> dict:
    """compare_with_best() on seeds x questions score matrices (NaN: not scored)."""
    return _best(estimate_matrices(matrices, codes, base), alpha, margin)


def _best(estimates: Estimates, alpha: float, margin: float) -> dict:
    """compare_with_best() without the metric's name."""
    matrices, trained, base = estimates.matrices, estimates.trained, estimates.base
    has_base = base in matrices
    alpha_base = BASE_SHARE * alpha if has_base else 0.0
    alpha_best = alpha - alpha_base
    m = len(trained)
    pairs = {pair: found for pair, found in estimates.pairs.items() if base not in pair}
    level = pair_level(alpha_best, m)

    def bounds(found: dict) -> tuple[float, float]:
        """(D - d SE, D + d SE) in points; infinite where the SE is unknown."""
        if not np.isfinite(found["se"]):
            return float("-inf"), float("inf")
        half = _t(found["df"], level) * found["se"] if found["se"] else 0.0
        return 100 * (found["mean"] - half), 100 * (found["mean"] + half)

    low_high = {pair: bounds(found) for pair, found in pairs.items()}
    worse = {a: [b for b in trained if b != a and low_high[(a, b)][1] < 0] for a in trained}
    best_set = [a for a in trained if not worse[a]]
    out = {}
    for a in trained:
        others = [b for b in trained if b != a]
        rivals = [b for b in best_set if b != a]
        if rivals:
            lower = min([0.0] + [low_high[(a, b)][0] for b in rivals])
        else:  # the only member of the best set: ahead of every other by at least this
            lower = min((low_high[(a, b)][0] for b in others), default=0.0)
        scored = matrices[a][:, _kept([matrices[a]])]
        out[a] = {
            "mean": _finite(100 * float(scored.mean())) if scored.size else None,
            "gap": min((100 * pairs[(a, b)]["mean"] for b in others), default=0.0),
            "lower": _finite(lower),
            "upper": _finite(min((low_high[(a, b)][1] for b in others), default=0.0)),
            "shown_worse_than": worse[a], "in_best_set": a in best_set,
            "clears_margin": bool(np.isfinite(lower) and lower > -margin),
            "seeds": int(matrices[a].shape[0]),
            "base": _gate(estimates.pairs[(a, base)], alpha_base, m) if has_base else None}
    return {"alpha": alpha, "alpha_best": alpha_best, "alpha_base": alpha_base,
            "margin": margin, "best_set": best_set, "methods": out,
            "critical": (f"t at {alpha_best:g}/{max(m * (m - 1), 1)} a side "
                         f"(Bonferroni over the {m * (m - 1) // 2} pairs of methods, two-sided)")}


def _gate(found: dict, alpha_base: float, m: int) -> dict:
    """a against the base (found: their pair estimate): difference, one-sided lower bound at
    1 - alpha_base/m, helps."""
    if not np.isfinite(found["se"]):
        lower = float("-inf")
    elif found["se"] == 0:
        lower = found["mean"]
    else:
        lower = found["mean"] - _t(found["df"], 1 - alpha_base / m) * found["se"]
    return {"difference": 100 * found["mean"], "lower": _finite(100 * lower),
            "helps": bool(np.isfinite(lower) and lower > 0)}


# --- The plan that would settle an inconclusive verdict --------------------------


def _projected_bound(a: str, b: str, found: dict, seeds: dict[str, int], scale: float,
                     alpha_best: float, m: int) -> float:
    """D_ab - d SE_ab (points) if a and b had seeds[...] seeds and scale x the fact groups.

    The point estimate is kept; the question part shrinks as 1/scale; each method's
    seed part becomes B / k' at today's questions, else (s2_seed + I / scale) / k' with
    s2_seed = max(0, B - I).  A method with one seed has no measured seed part: projected
    as if s2_seed were 0.
    """
    question = found["question_part"] / scale
    parts = [(question, found["n_groups"] * scale - 1)]
    for name, part in zip((a, b), found["seeds"]):
        if np.isfinite(part["between"]):
            # at today's questions B itself (so today's design projects today's bound);
            # with more questions the noise part shrinks and s2_seed, floored at 0, stays
            one = (part["between"] if scale == 1 else
                   max(0.0, part["between"] - part["noise"]) + part["noise"] / scale)
            parts.append((one / seeds[name], seeds[name] - 1))
    variance, df = _satterthwaite(parts)
    se = math.sqrt(variance)
    return 100 * (found["mean"] - (_t(df, pair_level(alpha_best, m)) * se if se > 0 else 0.0))


def settle_plan(found: Estimates, best: dict, cost_order: list[str]) -> dict | None:
    """How many seeds, or how many more questions and seeds, would let a method clear -margin.

    For each method that helps, in cost order (cheapest first), whose estimated gap to every other
    member of the best set is above -margin (else no amount of data clears it at these
    estimates), two options are sized:
      seeds      the fewest seeds K (for it and the best set's other members; finished
                 seeds are kept) at which its projected lower bound clears -margin;
      questions  for each question factor f, the fewest seeds K with a data set f times
                 as large (new facts, every method retrained), keeping the cheapest f x K.
    Cost is counted in training runs of the present data size: seeds cost the runs
    they add, a larger data set costs f x K runs of every compared method.  The target
    is the method with the cheapest option; "considered" lists every method in cost
    order.  None with fewer than two methods.
    """
    m, margin, alpha_best = len(found.trained), best["margin"], best["alpha_best"]
    if m < 2:
        return None
    current = {name: found.seeds(name) for name in found.matrices}
    considered = []
    for a in cost_order:
        entry = best["methods"][a]
        rivals = [b for b in best["best_set"] if b != a]
        if not (entry["base"] is None or entry["base"]["helps"]) or not rivals:
            continue
        pairs = {b: found.pairs[(a, b)] for b in rivals}
        if any(100 * p["mean"] <= -margin for p in pairs.values()):
            considered.append({"method": a, "reachable": False})
            continue
        group = [a] + rivals

        def fewest_seeds(scale: float, start: int) -> int | None:
            """The fewest seeds a group member at which every bound of a clears -margin."""
            for k in range(start, MAX_PLAN_SEEDS + 1):
                seeds = {**current, **{n: max(k, current[n]) if scale == 1 else k
                                       for n in group}}
                if all(_projected_bound(a, b, pairs[b], seeds, scale, alpha_best, m) > -margin
                       for b in rivals):
                    return k
            return None

        option = {"method": a, "reachable": True, "with": rivals,
                  "seed_count_now": {n: current[n] for n in group}}
        k = fewest_seeds(1.0, max(current[n] for n in group))
        if k is not None:
            option["seeds"] = {"seeds": k, "runs": sum(max(0, k - current[n]) for n in group)}
        larger = [(f, fewest_seeds(f, 2)) for f in QUESTION_FACTORS]
        larger = [(f, k) for f, k in larger if k is not None]
        if larger:
            f, k = min(larger, key=lambda fk: (fk[0] * fk[1], fk[0]))
            option["questions"] = {"factor": f, "seeds": k, "runs": math.ceil(f * k * m)}
        considered.append(option)
    settled = [c for c in considered if "seeds" in c or "questions" in c]
    cheapest = min(settled, key=lambda c: min(c.get(o, {}).get("runs", math.inf)
                                              for o in ("seeds", "questions")), default=None)
    return {"target": cheapest["method"] if cheapest else None, "considered": considered,
            "assumes": "the point estimates stay as measured; the seed terms rest on k - 1 "
                       "degrees of freedom each, so the seed count is a rough guide, not a "
                       "promise"}


# --- Forgetting: the NLL change on the general-text probe ------------------------------

FORGETTING_RULE = ("forgetting does not change the recommendation, which answers quality, "
                   "speed and memory on the user's data; a method that helps and forgets "
                   "significantly more than another that helps and ties with it on the "
                   "headline (neither shown worse) is flagged in the recommendation's text")


def nll_difference(a: np.ndarray, b: np.ndarray, tokens: np.ndarray, codes=None) -> dict:
    """Mean NLL per token of a minus that of b, in nats, with its standard error and df.

    a, b: seeds x documents matrices of summed NLL over the same tokens (tokens: per
    document).  Each side is a ratio, summed NLL / summed tokens, so the difference is
    one ratio, sum_d (mean_s a_sd - mean_s b_sd) / sum_d tokens_d, linearised per
    document (linearised_ratio) and given perplexity_interval's standard error: CR1 over
    clusters (codes; default, each document its own), plus each side's between-seed
    variance of its per-seed ratios (a side with one seed adds none).
    """
    tokens = np.asarray(tokens, dtype=float)
    codes = np.arange(len(tokens)) if codes is None else group_codes(codes)
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    _, linear = linearised_ratio(a.mean(axis=0) - b.mean(axis=0), tokens)
    return _estimate(linear, codes, [a / tokens.mean(), b / tokens.mean()])


def forgetting_intervals(nll: dict[str, np.ndarray], tokens: np.ndarray, base: str = "base",
                         level: float = INTERVAL_LEVEL, codes=None) -> dict[str, dict]:
    """Per trained model: its NLL change against the base (nats per token) and its interval.

    Also as a perplexity ratio, exp(change), with the interval's ends exponentiated.
    Positive: the model finds the probe's text less likely than the base did (forgot).
    """
    out = {}
    for name, matrix in nll.items():
        if name == base:
            continue
        found = nll_difference(matrix, nll[base], tokens, codes)
        low, high = _t_interval(found, level)
        known = bool(np.isfinite(found["se"]))  # else None: too few documents to estimate
        out[name] = {"change": found["mean"], "interval": [low, high] if known else None,
                     "ratio": float(np.exp(found["mean"])),
                     "ratio_interval": [float(np.exp(low)), float(np.exp(high))] if known
                     else None,
                     "se": _finite(found["se"]), "df": _finite(found["df"]),
                     "documents": found["n_groups"]}
    return out


def forgetting_pairs(nll: dict[str, np.ndarray], tokens: np.ndarray, best: dict,
                     base: str = "base", codes=None) -> list[dict]:
    """Every pair of measured trained methods: a - b in nats per token, bounds at the verdict's
    pair level (Bonferroni over the verdict's pairs, at its alpha_best), and which forgets more.
    """
    trained = [n for n in best["methods"] if n in nll and n != base]
    level = pair_level(best["alpha_best"], len(best["methods"]))
    rows = []
    for a, b in itertools.combinations(trained, 2):
        found = nll_difference(nll[a], nll[b], tokens, codes)
        if np.isfinite(found["se"]):
            half = _t(found["df"], level) * found["se"] if found["se"] else 0.0
            low, high = found["mean"] - half, found["mean"] + half
        else:
            low, high = float("-inf"), float("inf")
        rows.append({"a": a, "b": b, "difference": found["mean"], "se": _finite(found["se"]),
                     "df": _finite(found["df"]), "lower": _finite(low), "upper": _finite(high),
                     "forgets_more": a if low > 0 else b if high < 0 else None})
    return rows


def forgetting_flags(pairs: list[dict], best: dict) -> list[dict]:
    """The pairs where one candidate forgets significantly more than another it ties with.

    Candidates are the methods that help (or every method, with no base); two tie when
    neither is shown worse than the other on the headline.  Each flag names the method
    that forgets more ("method"), the one it ties with ("than") and the pair's bounds
    oriented as method - than.
    """
    methods = best["methods"]

    def helps(name: str) -> bool:
        return methods[name]["base"] is None or methods[name]["base"]["helps"]

    flags = []
    for pair in pairs:
        more = pair["forgets_more"]
        if more is None:
            continue
        other = pair["b"] if more == pair["a"] else pair["a"]
        ties = (other not in methods[more]["shown_worse_than"]
                and more not in methods[other]["shown_worse_than"])
        if ties and helps(more) and helps(other):
            sign = 1 if more == pair["a"] else -1
            ends = sorted(sign * v for v in (pair["lower"], pair["upper"]))
            flags.append({"method": more, "than": other, "difference": sign * pair["difference"],
                          "lower": ends[0], "upper": ends[1]})
    return flags


def forgetting_lines(found: dict, label: str, alpha: float) -> list[str]:
    """The recommendation's sentences on forgetting: each method's change, then any flag."""
    if not found.get("measured"):
        return [f"Forgetting was not measured: {found.get('note', 'no probe scores')}."]
    probe = found["probe"]
    level = f"simultaneous {100 * (1 - alpha):g}%"
    lines = [f"Forgetting (change in NLL per token on {probe['documents']} documents of "
             f"general English prose, {probe['file']}, against the base; 95%; it does not "
             "change the choice): " + "; ".join(
                 f"{name} {_nats(entry['change'])} "
                 f"[{', '.join(_nats(v) for v in entry['interval'] or (None, None))}] nats, "
                 f"perplexity x{entry['ratio']:.3f}"
                 for name, entry in found["methods"].items()) + "."]
    missing = found.get("not_measured") or []
    if missing:
        lines.append(f"Forgetting not measured for {', '.join(missing)} (no probe scores "
                     "matching the base's).")
    if found["flags"]:
        lines.extend(f"Flag: {f['method']} forgets more than {f['than']}, which it ties with "
                     f"on {label}: {_nats(f['difference'])} nats per token "
                     f"[{_nats(f['lower'])}, {_nats(f['upper'])}] ({level})."
                     for f in found["flags"])
    elif len(found["methods"]) > 1:
        lines.append(f"No method is shown to forget more than another it ties with on {label} "
                     f"({level}).")
    return lines


def _nats(value: float | None) -> str:
    """A change in nats for text: '+0.012', or 'unknown'."""
    return "unknown" if value is None else f"{value:+.3f}"


def gain_intervals(found: Estimates, level: float = INTERVAL_LEVEL) -> dict[str, dict]:
    """Per trained method, its headline gain over the base in points, with a level t interval
    (one method at a time, as the per-model intervals): what it learned."""
    out = {}
    for name in found.trained:
        pair = found.pairs.get((name, found.base))
        if pair is None:
            continue
        low, high = _t_interval(pair, level)
        out[name] = {"gain": 100 * pair["mean"], "interval": [_finite(100 * low),
                                                              _finite(100 * high)]}
    return out


# --- The recommendation -----------------------------------------------------------


def cost_order(rows: list[dict]) -> list[str]:
    """Trained methods from cheapest to dearest: mean training time, then peak memory."""
    trained = [r for r in rows if r["method"] != "base"]
    return [r["method"] for r in sorted(trained, key=lambda r: (
        r.get("train_seconds") or float("inf"), r.get("peak_memory_mb") or float("inf")))]


def recommend(rows: list[dict], best: dict, plan: dict | None, label: str,
              rates: str = "", forgetting: list[str] | None = None) -> dict:
    """The decision that follows from the bounds: recommend, inconclusive or none.

    rows: one per model (base first) with train_seconds, peak_memory_mb and their
    per-seed ranges ("train_seconds_range", "peak_memory_mb_range") and lr_source.
    rates: rate_text()'s sentence, appended.  forgetting: forgetting_lines()'s sentences,
    placed before it; they are text only, so the decision never depends on them
    (FORGETTING_RULE).  Returns {"outcome", "method", "text",
    "lines"}: the text is the lines (one statement each) joined.  A method is
    recommended only when its simultaneous lower bound against the best clears
    -margin; a test that fails to reject never counts as evidence of anything.
    """
    by_name = {r["method"]: r for r in rows}
    order = cost_order(rows)
    methods, margin = best["methods"], best["margin"]
    level = f"simultaneous {100 * (1 - best['alpha']):g}%"
    lines, after = [], (forgetting or []) + [rates]
    helps = [a for a in order if methods[a]["base"] is None or methods[a]["base"]["helps"]]
    if "base" not in by_name:
        lines.append("The untuned base was not evaluated, so no method is shown to help.")
    else:
        fails = [a for a in order if a not in helps]
        if fails:
            lines.append(f"Not shown better than the untuned base on {label}: " + ", ".join(
                f"{a} ({methods[a]['base']['difference']:+.1f} points, lower bound "
                f"{_signed(methods[a]['base']['lower'])})" for a in fails) + ".")
    if not helps:
        lines.insert(0, "Recommendation: none. No method is shown better than the untuned base "
                     "model on this data; train longer (--epochs), tune the rate (--tune-lr) "
                     "or add data, then compare again.")
        return _decision("none", None, lines + after, rows)
    lines.append(f"Best set by {label} ({level}): " + ", ".join(best["best_set"]) + "; "
                 + "; ".join(_gap_text(a, methods[a]) for a in best["best_set"]) + ".")
    worse = [a for a in order if not methods[a]["in_best_set"]]
    if worse:
        lines.append("Shown worse than the best: " + "; ".join(
            f"{a} (worse than {', '.join(methods[a]['shown_worse_than'])}; "
            f"{_gap_text(a, methods[a], named=False)})" for a in worse) + ".")
    chosen = next((a for a in helps if methods[a]["clears_margin"]), None)
    if chosen is not None:
        lower = methods[chosen]["lower"]
        text = (f"Recommendation: {chosen}, at most {-lower:.1f} points of {label} below the "
                f"best method ({level}), within the declared margin of {margin:g} points"
                if lower < 0 else
                f"Recommendation: {chosen}, the best: at least {lower:.1f} points of {label} "
                f"above every other method ({level})")
        cheaper = helps[:helps.index(chosen)]
        text += ("." if not cheaper else "; " + ", ".join(cheaper) + (
            " is" if len(cheaper) == 1 else " are") + " cheaper but not shown within it.")
        lines.insert(0, text)  # the answer first; the evidence after it
        costs = _cost_text(by_name, chosen, [a for a in best["best_set"] if a != chosen])
        if costs:
            lines.append(costs)
        return _decision("recommend", chosen, lines + after, rows)
    lines.insert(0, f"Verdict: inconclusive at a margin of {margin:g} points. No method that "
                 f"helps is shown within {margin:g} points of the best ({level}); the data "
                 "cannot yet tell the best set apart, so none of them is recommended over "
                 "the others.")
    lines.extend(_plan_lines(plan, margin))
    return _decision("inconclusive", None, lines + after, rows)


def _decision(outcome: str, method: str | None, lines: list[str], rows: list[dict]) -> dict:
    """The recommendation's record, with the untuned-rate caveat appended to its text."""
    untuned = [r["method"] for r in rows
               if r["method"] != "base" and not str(r.get("lr_source") or "").startswith("search")]
    if untuned:
        rates = ("The learning rate of " + untuned[0] + " was" if len(untuned) == 1 else
                 "The learning rates of " + ", ".join(untuned) + " were")
        lines.append(f"{rates} not searched, so this may not hold at tuned rates: rerun with "
                     "`make all ... TUNE=1` (or `--tune-lr`) before acting on it.")
    lines = [line for line in lines if line]
    return {"outcome": outcome, "method": method, "text": " ".join(lines), "lines": lines}


def _signed(value: float | None) -> str:
    """A bound for text: '+1.2', '-3.4', or 'unknown' where it could not be estimated."""
    return "unknown" if value is None else f"{value:+.1f}"


def _gap_text(method: str, entry: dict, named: bool = True) -> str:
    """'lora -2.7 points from the best of the others [-6.5, +0.0]': estimate and bounds."""
    return (f"{method + ' ' if named else ''}{entry['gap']:+.1f} points from the best of the "
            f"others [{_signed(entry['lower'])}, {_signed(entry['upper'])}]")


COSTS = (("train_seconds", "training time", "s"), ("peak_memory_mb", "peak memory", "MB"))


def _cost_text(by_name: dict, chosen: str, others: list[str]) -> str:
    """Cost differences that exceed their seed-to-seed spread; the rest are called unresolved.

    Each cost is a range over seeds ("<field>_range"); a difference is stated only when
    the two ranges do not overlap.
    """
    found, unresolved = [], []
    for other in others:
        for field, what, unit in COSTS:
            mine, theirs = by_name[chosen].get(f"{field}_range"), by_name[other].get(
                f"{field}_range")
            if not mine or not theirs or None in (*mine, *theirs):
                continue
            if mine[1] < theirs[0] or mine[0] > theirs[1]:
                word = "less" if mine[1] < theirs[0] else "more"
                found.append(f"{word} {what} than {other} ({_range(*mine)} against "
                             f"{_range(*theirs)} {unit})")
            else:
                unresolved.append(f"{what} against {other}")
    text = f"Over every seed, {chosen} used " + "; ".join(found) + "." if found else ""
    if unresolved:
        text += (" " if text else "") + ("Within the seed-to-seed spread, so not claimed: "
                                         + ", ".join(unresolved) + ".")
    return text


def _range(low: float, high: float) -> str:
    """A measured range for text: '95-101' (one value when they are equal)."""
    return f"{low:,.0f}" if round(low) == round(high) else f"{low:,.0f}-{high:,.0f}"


def _plan_lines(plan: dict | None, margin: float) -> list[str]:
    """The plan as statements, cheapest method first (the commands are in plan["commands"])."""
    if not plan or plan.get("target") is None:
        return [("No plan within reach settles it: at the measured estimates no method comes "
                f"within {margin:g} points of every other member of the best set with up to "
                f"{MAX_PLAN_SEEDS} seeds or {QUESTION_FACTORS[-1]}x the questions. Either "
                "declare the margin you would accept (--margin) or take the best set as it is.")]
    sentences = []
    for c in plan["considered"]:
        a = c["method"]
        if not c["reachable"]:
            sentences.append(f"{a} cannot: its estimated gap is already beyond the margin.")
            continue
        options = []
        if c.get("seeds"):
            now = ", ".join(f"{n} {k}" for n, k in c["seed_count_now"].items())
            options.append(f"{c['seeds']['seeds']} seeds each of {', '.join([a] + c['with'])} "
                           f"(now {now}; {c['seeds']['runs']} more training runs)")
        if c.get("questions"):
            q = c["questions"]
            options.append(f"{q['factor']:g}x the questions, as new facts, and {q['seeds']} "
                           f"seeds of every method (about {q['runs']} runs of today's size)")
        sentences.append(f"{a} would need " + (" or ".join(options) if options else
                                               f"more than {MAX_PLAN_SEEDS} seeds and "
                                               f"{QUESTION_FACTORS[-1]:g}x the questions") + ".")
    return (["Plan: what would show each method within the margin if its estimated gaps held, "
             "projected from the measured variance, cheapest method first."] + sentences
            + [f"The cheapest option is {plan['target']}'s; the commands are under 'Plan'. "
               f"This assumes {plan['assumes']}."])


def rate_sensitivity(searches: dict[str, dict]) -> list[dict]:
    """Per searched method: the chosen rate and the rates the search could not tell from it.

    A search that chose by validation answer NLL records each rate's paired difference
    and near_tie (within 2 clustered SEs); an older one that chose by key accuracy has no
    uncertainty, and is flagged as such.
    """
    found = []
    for method, search in searches.items():
        entry = {"method": method, "chosen_lr": search["chosen_lr"],
                 "metric": search.get("metric"), "edge": bool(search.get("edge"))}
        if search.get("metric") == "valid_answer_nll":
            entry["near_ties"] = [r["lr"] for r in search["results"] if r.get("near_tie")]
        else:
            entry["near_ties"] = None
        found.append(entry)
    return found


def rate_text(sensitivity: list[dict]) -> str:
    """One sentence on how far the verdict rests on the rates: near-ties and unmeasured choices."""
    ties = [s for s in sensitivity if s["near_ties"]]
    unmeasured = [s["method"] for s in sensitivity if s["near_ties"] is None]
    edges = [s["method"] for s in sensitivity if s["edge"]]
    parts = []
    if ties:
        parts.append("; ".join(
            f"{s['method']} at {s['chosen_lr']:g} could not be told from "
            + ", ".join(f"{lr:g}" for lr in s["near_ties"]) for s in ties)
            + " on validation answer NLL (within 2 clustered SEs), so the verdict holds at the "
              "rates used and may move at those: train one with --lr to check")
    if unmeasured:
        parts.append(f"the rates of {', '.join(unmeasured)} were chosen by validation key "
                     "accuracy, recorded without its uncertainty; rerun the search "
                     "(--tune-lr), which now chooses by answer NLL and records how close each "
                     "rate was")
    if edges:
        parts.append(f"the search of {', '.join(edges)} ended at the edge of its grid")
    return ("Rates: " + "; ".join(parts) + ".") if parts else (
        "Rates: every searched rate was clear of its neighbours on validation answer NLL."
        if sensitivity else "")


# --- How it was done ---------------------------------------------------------------


def procedure(best: dict, n_questions: int | None = None, n_groups: int | None = None,
              seeds: dict[str, int] | None = None, metric: str | None = None) -> dict:
    """How the bounds and decisions were made, for comparison.json and the report."""
    seeds = seeds or {}
    single = sorted(name for name, k in seeds.items() if k < 2 and name != "base")
    m = len([n for n in seeds if n != "base"])
    return {
        "unit": "fact group (all wordings of one fact form one cluster; rows without a group "
                "are their own cluster)",
        "metric": metric, "questions": n_questions, "groups": n_groups, "seeds": seeds,
        "method": "paired differences of per-question seed means; cluster-robust (CR1) "
                  "question part plus each method's between-seed variance of seed means, "
                  "the seed-by-question noise estimated with the fact group as unit; t with "
                  "Welch-Satterthwaite degrees of freedom",
        "comparisons_with_the_best": f"two-sided t bounds on every pair of methods, "
                                     f"{best['alpha_best']:g} over {max(m * (m - 1) // 2, 1)} "
                                     "pairs (Bonferroni), and from them each method's gap to "
                                     "the best of the others (Hsu 1996, ch. 4)",
        "gate_against_base": (f"one-sided lower bounds, {best['alpha_base']:g} over {m} "
                              "(Bonferroni)" if best["alpha_base"] else "no base evaluated"),
        "alpha": best["alpha"], "margin": best["margin"],
        "rule": "recommend the cheapest method that helps and whose lower bound against the "
                "best clears -margin; otherwise inconclusive at the margin, with a plan",
        "per_model_intervals": "95% t interval, same standard error, no adjustment",
        "perplexity": "delta-method cluster-robust interval on the log scale, then exp",
        "resampling": "none (analytic); no result depends on an RNG seed",
        "training_variation": ("not measured for " + ", ".join(single) + " (one seed)"
                               if single else "measured (every trained method has 2+ seeds)"),
        "references": list(REFERENCES)}


def procedure_text(found: dict) -> str:
    """procedure()'s dict in three sentences for comparison.md and the HTML report."""
    return (f"Scores on the same {found['questions']} questions in {found['groups']} fact "
            "groups, standard errors clustered by group, with each method's seed-to-seed "
            "variation added; t bounds with Satterthwaite degrees of freedom. Gap to the best "
            f"of the others: {found['comparisons_with_the_best']}; against the base, "
            f"{found['gate_against_base']}; all statements hold together at "
            f"{100 * (1 - found['alpha']):g}%. Declared margin: {found['margin']:g} points; "
            f"training variation {found['training_variation']}.")
