"""How an answer is scored: normalisation, exact match, key match, token F1 and perplexity.

    records = score_rows(rows, predictions)   # one record a question, each metric's verdict
    summarise(records)                        # exact match, key accuracy and F1, as %
    quality_key([summary, ...])               # the headline measure: key accuracy, else F1

evaluate.py and the learning-rate search (tuning.py) score with these, and the
data stage checks its keys with key_match.  Standard library only.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_ARTICLES = {"a", "an", "the"}
# A word, or a number with its sign, decimal point and thousands separators kept
# ("-40", "4.5", "1,000"): deleting punctuation inside numbers would make 4.5 equal 45.
# An apostrophe inside a word stays ("Earth's" is not "Earth" + "s", which would match sulfur's "S").
_TOKEN = re.compile(r"(?<!\w)-?\d+(?:[.,]\d+)*|\w+(?:['\u2019]\w+)*")


def answer_tokens(text: str, lower: bool = True) -> list[str]:
    """Words and numbers, lower-cased; punctuation dropped except inside numbers ("1,000" -> "1000")."""
    text = str(text).replace("\u2019", "'")
    tokens = _TOKEN.findall(text.lower() if lower else text)
    return [t.replace(",", "") if t[-1].isdigit() else t for t in tokens]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)*")
# Keys that answer a yes/no question count only as the reply's first or last word
# ("No, ...", "The opposite of yes is no."), not inside "I have no idea".
_YES_NO = {"yes", "no"}
# A bracketed part of a key is an alternative spelling or symbol: "joules (J)" is given as "joules".
_BRACKETED = re.compile(r"\s*[(\[][^)\]]*[)\]]")


def _case_sensitive(key: str) -> bool:
    """Short keys with a capital letter are symbols: "Be", "He", "Si" must not match "be", "SI"."""
    return len(key.strip()) <= 2 and any(c.isupper() for c in key)


def _same_word(a: str, b: str) -> bool:
    """Equal, or the same word in the singular and plural ("joule", "joules"; "inch", "inches")."""
    if a == b:
        return True
    short, long_ = sorted((a, b), key=len)
    return (short.isalpha() and len(short) >= 3
            and long_ in (short + "s", short + "es"))


def _same_number(a: str, b: str) -> bool:
    """Numbers compare by value: "5" is "5.0", and "1,000" reached here as "1000"."""
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def _states_number(pred: list[str], key: str, asked: list[str]) -> bool:
    """The key is the prediction's result: its last number, leaving out the question's own
    numbers unless the key is one of them ("There are 120 minutes in 2 hours." states 120)."""
    numbers = [t for t in pred if _NUMBER.fullmatch(t)]
    if not any(_same_number(key, t) for t in asked):
        numbers = [t for t in numbers if not any(_same_number(t, a) for a in asked)]
    return bool(numbers) and _same_number(numbers[-1], key)


def _runs(tokens: list[str]) -> set[tuple[str, ...]]:
    """Every contiguous run of tokens (all lengths)."""
    return {tuple(tokens[i:j]) for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1)}


def _echoed_key(pred: list[str], i: int, n: int, question: list[str]) -> bool:
    """Whether the key at pred[i:i + n] continues the question's own words on either side.

    Only for keys the question contains: "Earth's moon" around the key "Moon" is the
    question's phrase; "the Moon" after "called" is not.  Articles are skipped on both sides.
    """
    runs = _runs([t for t in question if t not in _ARTICLES])
    before = [t for t in pred[:i] if t not in _ARTICLES][-1:]
    after = [t for t in pred[i + n:] if t not in _ARTICLES][:1]
    key = [t for t in pred[i:i + n] if t not in _ARTICLES]
    return ((bool(before) and tuple(before + key) in runs)
            or (bool(after) and tuple(key + after) in runs))


def _stands_alone(prediction: str, symbol: str) -> bool:
    """A one- or two-letter symbol given as the answer: the last word, or in brackets or quotes."""
    s = re.escape(symbol)
    return bool(re.search(rf"(?<!\w){s}\W*$", prediction.strip())
                or re.search(rf"[(\[\"'\u201c\u2018]\s*{s}\s*[)\]\"'\u201d\u2019]", prediction))


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation (lower case, no punctuation or articles), numbers kept whole."""
    return " ".join(t for t in answer_tokens(text) if t not in _ARTICLES)


def exact_match(prediction: str, reference: str) -> bool:
    """Prediction equals reference after normalisation."""
    return normalize_answer(prediction) == normalize_answer(reference)


def _echoed(prediction: list[str], question: list[str], n: int = 3) -> list[bool]:
    """Which prediction tokens lie inside an n-gram (n = 3) that the question also contains."""
    grams = {tuple(question[i:i + n]) for i in range(len(question) - n + 1)}
    marks = [False] * len(prediction)
    for i in range(len(prediction) - n + 1):
        if tuple(prediction[i:i + n]) in grams:
            marks[i:i + n] = [True] * n
    return marks


def key_match(prediction: str, key: str, question: str | None = None) -> bool:
    """The prediction gives the key as its answer, not inside an echo of the question.

    Words compare whole, articles kept ("Vitamin A" is not "Vitamin B"), singular and
    plural alike ("joule", "joules"); a bracketed part of the key is optional ("joules (J)").
    - A numeric key must be the number the prediction states as its result: its last
      number, where a number the question also holds is skipped unless the key is one
      of them.  "8 times 1 equals 9" answers 9, never 8 or 1; "There are 120 minutes
      in 2 hours." answers 120 for "How many minutes are in 2 hours?"; "100mm / 20mm =
      0.5cm, the answer is 0.5" does not answer 20.  Numbers compare by value (5 = 5.0).
    - A one- or two-letter symbol with a capital ("I", "He", "Be") must stand as the
      answer: the last word ("The symbol is I."), the whole reply, or in brackets or
      quotes; "I do not know." does not answer iodine.
    - "yes" and "no" (any case) must open or end the reply.
    Given the question:
    - a key the question already contains counts only where its neighbours are not the
      question's own words: for "What is Earth's moon called?", "It is called the Moon."
      answers "Moon" but "Earth's moon is Earth." does not;
    - any other key does not count where it lies wholly inside a run of three or more
      words copied from the question.
    """
    forms = [key]
    bare = _BRACKETED.sub("", key).strip()
    if bare and bare != key.strip():
        forms.append(bare)
    return any(_gives_key(prediction, form, question) for form in forms)


def _gives_key(prediction: str, key: str, question: str | None) -> bool:
    """key_match for one form of the key."""
    if key.strip().lower() in _YES_NO:  # "No" here is the answer no, not nobelium's symbol
        words = answer_tokens(prediction)
        return key.strip().lower() in words[:1] + words[-1:]
    lower = not _case_sensitive(key)
    key_tokens, pred = answer_tokens(key, lower), answer_tokens(prediction, lower)
    if not key_tokens:
        return False
    if len(key_tokens) == 1 and _NUMBER.fullmatch(key_tokens[0]):
        return _states_number(pred, key_tokens[0], answer_tokens(question) if question else [])
    if len(key_tokens) == 1 and not lower:
        return _stands_alone(prediction, key.strip())
    n = len(key_tokens)
    hits = [i for i in range(len(pred) - n + 1)
            if all(_same_word(p, k) for p, k in zip(pred[i:i + n], key_tokens))]
    asked = answer_tokens(question, lower) if question else []
    if tuple(t for t in key_tokens if t not in _ARTICLES) in _runs(
            [t for t in asked if t not in _ARTICLES]):
        return any(not _echoed_key(pred, i, n, asked) for i in hits)
    echoed = _echoed(pred, asked) if asked else [False] * len(pred)
    return any(not all(echoed[i:i + n]) for i in hits)


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (SQuAD's F1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common_tokens = sum((Counter(pred) & Counter(ref)).values())
    if common_tokens == 0:
        return 0.0
    precision, recall = common_tokens / len(pred), common_tokens / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_rows(rows: list[dict], predictions: list[str]) -> list[dict]:
    """Per-question records: what was asked, expected and said, with each metric's verdict."""
    records = []
    for row, prediction in zip(rows, predictions):
        reference = row.get("answer", row["completion"].strip())
        question = row.get("question", row["prompt"])
        record = {"question": question, "prompt": row["prompt"],
                  "reference": reference, "prediction": prediction,
                  "exact_match": exact_match(prediction, reference),
                  "token_f1": round(token_f1(prediction, reference), 4)}
        if row.get("key"):
            record["key"] = row["key"]
            record["key_match"] = key_match(prediction, row["key"], question)
        for field in ("category", "eval_kind", "group", "key_source"):
            if row.get(field):
                record[field] = row[field]
        records.append(record)
    return records


def summarise(records: list[dict]) -> dict:
    """Exact match, key accuracy and F1 (as %) over a set of records."""
    n = len(records)
    out = {"n": n,
           "exact_match": 100 * sum(r["exact_match"] for r in records) / n,
           "token_f1": 100 * sum(r["token_f1"] for r in records) / n}
    keyed = [r for r in records if r.get("key_match") is not None]
    out["key_accuracy"] = 100 * sum(r["key_match"] for r in keyed) / len(keyed) if keyed else None
    out["keyed"] = len(keyed)  # rows with a key: key accuracy is over these only
    return out


def quality_key(summaries: list[dict]) -> tuple[str, str, str]:
    """The headline measure: key accuracy where the data has keys (given or derived), else F1.

    summaries are summarise()'s results (or table rows holding them).  Returns
    (summary field, per-question record field, label); the learning-rate search
    and evaluate.py both rank by it.
    """
    if all(s.get("key_accuracy") is not None for s in summaries):
        keyed, n = summaries[0].get("keyed"), summaries[0].get("n")
        label = "key-answer accuracy"
        if keyed is not None and n is not None and keyed < n:  # a key column with blank cells
            label += f" ({keyed} of {n} questions have keys)"
        return "key_accuracy", "key_match", label
    return "token_f1", "token_f1", "token F1"


def run_perplexity(records: list[dict]) -> float:
    """Answer perplexity of one run's records (their summed NLL over their summed tokens)."""
    return perplexity(sum(r["answer_nll"] for r in records),
                      sum(r["answer_tokens"] for r in records))


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp of the mean negative log-likelihood per token."""
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")
