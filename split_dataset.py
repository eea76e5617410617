"""Split formatted rows into training and evaluation sets with no question on both sides.

Run from the repository root, after `python format_dataset.py`:

    python split_dataset.py            # data/formatted.jsonl -> data/train.jsonl, data/eval.jsonl
    python split_dataset.py --seed 7 --holdout-facts 0.2

Generated rows (with fact_id): a fraction of whole facts is held out
(eval_kind "unseen_fact"), and each remaining fact gives one of its wordings to
evaluation ("unseen_wording"). User rows (no fact_id) are split by normalised
question ("unseen_question"). Afterwards no evaluation question equals a training
question after normalisation; data/split_report.json records the counts and the check.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

from common import (PipelineError, file_sha256, normalize_question, read_jsonl, run_main,
                    write_json, write_jsonl)

REQUIRED_FIELDS = ("prompt", "completion", "question", "answer", "group")
# --eval-fraction defaults per kind of row: generated facts have several wordings,
# so every fact can lend one to evaluation; a user question exists once, so eval
# takes a fifth of them and training keeps the rest.
DEFAULT_EVAL_FRACTION = {"fact": 1.0, "question": 0.2}


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="data/formatted.jsonl",
                        help="formatted rows; the default is what format_dataset.py writes")
    parser.add_argument("--output-dir", default="data",
                        help="folder for train.jsonl, eval.jsonl and split_report.json; the "
                             "default is where training and evaluation look")
    parser.add_argument("--seed", type=int, default=42,
                        help="random seed; fixed by default so the split is the same every run")
    parser.add_argument("--eval-fraction", type=fraction, default=None,
                        help="share of groups that give rows to evaluation; default 1.0 for "
                             "generated facts (one wording of every fact, the rest train) and "
                             "0.2 for user questions (a common held-out share)")
    parser.add_argument("--holdout-facts", type=fraction, default=0.1,
                        help="share of generated facts held out whole (per category); 0.1 "
                             "tests recall of unseen facts while training keeps most of them")
    return parser.parse_args(argv)


def take_count(total: int, share: float, keep: int) -> int:
    """How many of total items a share picks: rounded, at least one if share > 0, leaving keep."""
    count = int(total * share + 0.5)
    if share > 0 and count == 0:
        count = 1
    return max(0, min(count, total - keep))


def holdout_counts(sizes: dict[str, int], share: float) -> dict[str, int]:
    """Facts to hold out per category: the overall share, by largest remainder, each keeping one."""
    target = int(sum(sizes.values()) * share + 0.5)
    counts = {cat: min(int(size * share), size - 1) for cat, size in sizes.items()}
    # Categories with the largest unrounded remainder get the leftover facts first.
    order = sorted(sizes, key=lambda cat: (-(sizes[cat] * share - int(sizes[cat] * share)), cat))
    while sum(counts.values()) < target:
        open_cats = [cat for cat in order if counts[cat] < sizes[cat] - 1]
        if not open_cats:
            break
        for cat in open_cats[: target - sum(counts.values())]:
            counts[cat] += 1
    return counts


def split_facts(rows: list[tuple[int, dict]], rng: random.Random, holdout: float,
                eval_share: float) -> dict[int, str]:
    """Eval kind per row index for generated rows: whole held-out facts, then one wording each."""
    facts: dict[str, list[int]] = {}
    category_of: dict[str, str] = {}
    for index, row in rows:
        facts.setdefault(str(row["fact_id"]), []).append(index)
        category_of.setdefault(str(row["fact_id"]), str(row.get("category", "")))
    by_category: dict[str, list[str]] = {}
    for fact_id in sorted(facts):
        by_category.setdefault(category_of[fact_id], []).append(fact_id)
    kinds: dict[int, str] = {}
    counts = holdout_counts({cat: len(ids) for cat, ids in by_category.items()}, holdout)
    held = set()
    for category in sorted(by_category):
        held.update(rng.sample(by_category[category], counts[category]))
    for fact_id in sorted(held):
        kinds.update({index: "unseen_fact" for index in facts[fact_id]})
    # A fact with one wording cannot lend it to eval without leaving training.
    eligible = [fid for fid in sorted(facts) if fid not in held and len(facts[fid]) > 1]
    for fact_id in sorted(rng.sample(eligible, take_count(len(eligible), eval_share, 0))):
        kinds[rng.choice(facts[fact_id])] = "unseen_wording"
    return kinds


def split_questions(rows: list[tuple[int, dict]], rng: random.Random,
                    eval_share: float) -> dict[int, str]:
    """Eval kind per row index for user rows: whole normalised-question groups go to eval."""
    groups: dict[str, list[int]] = {}
    for index, row in rows:
        groups.setdefault(normalize_question(row["question"]), []).append(index)
    chosen = rng.sample(sorted(groups), take_count(len(groups), eval_share, 1))
    return {index: "unseen_question" for group in chosen for index in groups[group]}


def remove_overlap(train: list[dict], candidates: list[dict]) -> tuple[list[dict], int, int]:
    """Move eval rows whose question is in train to train, drop repeats; return eval and counts."""
    # Two facts can share a wording; the copy in eval would then be a seen question.
    train_questions = {normalize_question(row["question"]) for row in train}
    evaluation, eval_questions = [], set()
    moved = duplicates = 0
    for row in candidates:
        key = normalize_question(row["question"])
        if key in train_questions:
            train.append({k: v for k, v in row.items() if k != "eval_kind"})
            moved += 1
        elif key in eval_questions:
            duplicates += 1
        else:
            eval_questions.add(key)
            evaluation.append(row)
    return evaluation, moved, duplicates


def category_counts(rows: list[dict]) -> dict[str, int]:
    """Rows per category, sorted by name."""
    return dict(sorted(Counter(str(row["category"]) for row in rows if "category" in row).items()))


def main(args: argparse.Namespace) -> None:
    """Read, assign rows to eval, verify no overlap, then write the split and its report."""
    source = Path(args.input)
    out_dir = Path(args.output_dir)
    rows = read_jsonl(source, REQUIRED_FIELDS, hint="python format_dataset.py")
    print(f"read {len(rows)} rows from {source}")

    # Assign eval rows: generated facts and user questions each by their own rule.
    rng = random.Random(args.seed)
    fact_rows = [(i, row) for i, row in enumerate(rows) if row.get("fact_id") not in (None, "")]
    question_rows = [(i, row) for i, row in enumerate(rows) if row.get("fact_id") in (None, "")]
    shares = {kind: (args.eval_fraction if args.eval_fraction is not None else default)
              for kind, default in DEFAULT_EVAL_FRACTION.items()}
    kinds = {}
    if fact_rows:
        kinds.update(split_facts(fact_rows, rng, args.holdout_facts, shares["fact"]))
    if question_rows:
        kinds.update(split_questions(question_rows, rng, shares["question"]))
    train = [row for i, row in enumerate(rows) if i not in kinds]
    candidates = [{**row, "eval_kind": kinds[i]} for i, row in enumerate(rows) if i in kinds]

    # Verify: no eval question may equal a training one after normalisation.
    evaluation, moved, duplicates = remove_overlap(train, candidates)
    train_questions = {normalize_question(row["question"]) for row in train}
    overlap = sum(normalize_question(row["question"]) in train_questions for row in evaluation)
    if not train or not evaluation:
        empty = "training" if not train else "evaluation"
        raise PipelineError(
            f"the {empty} set would be empty ({len(rows)} rows, {len(train)} train, "
            f"{len(evaluation)} eval after removing {moved} overlapping and {duplicates} "
            f"duplicate questions); add more distinct questions or change --eval-fraction "
            f"/ --holdout-facts", source)

    # Write the split and the report together, only now that all checks passed.
    report = {
        "input": str(source), "input_sha256": file_sha256(source), "seed": args.seed,
        # The eval fraction actually used, per kind of row present (facts, questions).
        "options": {"eval_fraction": {kind: share for kind, share in shares.items()
                                      if (fact_rows if kind == "fact" else question_rows)},
                    "holdout_facts": args.holdout_facts},
        "rows": len(rows),
        "groups": {"facts": len({str(row["fact_id"]) for _, row in fact_rows}),
                   "questions": len({normalize_question(row["question"])
                                     for _, row in question_rows})},
        "train_rows": len(train), "eval_rows": len(evaluation),
        "eval_by_kind": dict(sorted(Counter(row["eval_kind"] for row in evaluation).items())),
        "duplicates_removed": duplicates, "moved_for_overlap": moved,
        "overlap_after_normalisation": overlap,
    }
    if any("category" in row for row in rows):
        report["categories"] = {"train": category_counts(train),
                                "eval": category_counts(evaluation)}
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "eval.jsonl", evaluation)
    write_json(out_dir / "split_report.json", report)
    print(f"wrote {len(train)} train rows to {out_dir / 'train.jsonl'}, {len(evaluation)} eval "
          f"rows to {out_dir / 'eval.jsonl'} ({report['eval_by_kind']}); moved {moved} "
          f"overlapping to train, dropped {duplicates} duplicate eval questions; overlap "
          f"after normalisation {overlap}; report {out_dir / 'split_report.json'}")


if __name__ == "__main__":
    run_main(main, parse_args())
