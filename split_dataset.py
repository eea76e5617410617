"""Split formatted rows into training, validation and evaluation sets with no question shared.

Run from the repository root, after `python format_dataset.py`:

    python split_dataset.py   # data/formatted.jsonl -> data/train.jsonl, valid.jsonl, eval.jsonl
    python split_dataset.py --seed 7 --holdout-facts 0.2 --valid-share 0.15

Generated rows are split by fact group (a fact together with its restatements,
such as "What is the capital of Ethiopia?" and "Addis Ababa is the capital of which
country?"). A fraction of whole groups is held out for evaluation (eval_kind
"unseen_fact"). Of the other groups, --valid-share is reserved for validation: the
--holdout-facts fraction of those goes wholly to valid.jsonl ("unseen_fact"), the
rest give one wording per fact to valid.jsonl ("unseen_wording") and the others to
training. Every remaining fact gives one wording to evaluation ("unseen_wording")
and the rest to training. So a held-out group has no row in training, and valid and
eval share no group. User rows (no fact group) are split by normalised question
("unseen_question"): eval takes --eval-fraction of the questions and valid
--valid-share of the rest. No normalised question is in two of the three files;
data/split_report.json records the counts and these checks. Tune choices such as
the learning rate on valid.jsonl; eval.jsonl is for the final comparison only.
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
# Kinds whose whole group is kept out of training.
HELD_OUT_KINDS = ("unseen_fact", "unseen_question")
FILES = ("train", "valid", "eval")


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1 (both excluded)")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="data/formatted.jsonl",
                        help="formatted rows (default data/formatted.jsonl: what "
                             "format_dataset.py writes)")
    parser.add_argument("--output-dir", default="data",
                        help="folder for train.jsonl, valid.jsonl, eval.jsonl and "
                             "split_report.json (default data: where training and "
                             "evaluation look)")
    parser.add_argument("--seed", type=int, default=42,
                        help="random seed (default 42: fixed, so the split is the same "
                             "every run)")
    parser.add_argument("--eval-fraction", type=fraction, default=None,
                        help="share of groups that give rows to evaluation (default 1.0 "
                             "for generated facts: one wording of every fact, the rest "
                             "train; 0.2 for user questions: a common held-out share)")
    parser.add_argument("--holdout-facts", type=fraction, default=0.1,
                        help="share of generated fact groups held out whole (per category), "
                             "from eval and likewise from valid (default 0.1: tests recall "
                             "of unseen facts while training keeps most of them)")
    parser.add_argument("--valid-share", type=open_fraction, default=0.2,
                        help="share of the training side's groups reserved for valid.jsonl, "
                             "on which choices such as the learning rate are tuned; at least "
                             "one group, above 0 and below 1 (default 0.2: twice 0.1's "
                             "questions, which were too few to rank learning rates, while "
                             "training keeps most rows; the counts are in "
                             "results/smollm2-135m/split_report.json)")
    return parser.parse_args(argv)


def is_fact_row(row: dict) -> bool:
    """Generated-style rows carry a fact group or fact id; user rows carry neither."""
    return any(row.get(field) not in (None, "") for field in ("fact_group", "fact_id"))


def split_key(row: dict) -> str:
    """What is held out together: the fact group (formatted as `group`), else the question."""
    return str(row["group"]) if is_fact_row(row) else normalize_question(row["question"])


def take_count(total: int, share: float, keep: int) -> int:
    """How many of total items a share picks: rounded, at least one if share > 0, leaving keep."""
    count = int(total * share + 0.5)
    if share > 0 and count == 0:
        count = 1
    return max(0, min(count, total - keep))


def spread(sizes: dict[str, int], share: float, caps: dict[str, int],
           at_least_one: bool = False) -> dict[str, int]:
    """Items per category: the overall share rounded, by largest remainder, each within its cap."""
    target = int(sum(sizes.values()) * share + 0.5)
    if at_least_one and share > 0:
        target = max(target, 1)
    counts = {cat: max(0, min(int(size * share), caps[cat])) for cat, size in sizes.items()}
    # Categories with the largest unrounded remainder get the leftover items first.
    order = sorted(sizes, key=lambda cat: (-(sizes[cat] * share - int(sizes[cat] * share)), cat))
    while sum(counts.values()) < target:
        open_cats = [cat for cat in order if counts[cat] < caps[cat]]
        if not open_cats:
            break
        for cat in open_cats[: target - sum(counts.values())]:
            counts[cat] += 1
    return counts


def holdout_counts(sizes: dict[str, int], share: float) -> dict[str, int]:
    """Groups to hold out per category: the overall share, each category keeping one."""
    return spread(sizes, share, {cat: size - 1 for cat, size in sizes.items()})


def sample_groups(by_category: dict[str, list[str]], counts: dict[str, int],
                  rng: random.Random) -> set[str]:
    """counts[category] groups drawn from each category's sorted list."""
    chosen = set()
    for category in sorted(by_category):
        chosen.update(rng.sample(by_category[category], counts.get(category, 0)))
    return chosen


def lenders(groups: dict[str, dict[str, list[int]]], names,
            shared: set[int]) -> list[list[int]]:
    """Per fact of the named groups with two or more wordings, the rows it may lend.

    A fact with one wording cannot lend it without leaving training, and a wording
    another row also asks (shared) is lent only when the fact has no other.
    """
    facts = [groups[group][fact] for group in sorted(names) for fact in sorted(groups[group])
             if len(groups[group][fact]) > 1]
    return [[i for i in indices if i not in shared] or indices for indices in facts]


def split_facts(rows: list[tuple[int, dict]], rng: random.Random, holdout: float,
                eval_share: float, valid_share: float,
                shared: set[int]) -> dict[int, tuple[str, str]]:
    """(file, eval kind) per row index for generated rows, split by fact group (see the top)."""
    groups: dict[str, dict[str, list[int]]] = {}  # group -> fact_id -> row indices
    category_of: dict[str, str] = {}
    for index, row in rows:
        group = split_key(row)
        groups.setdefault(group, {}).setdefault(str(row.get("fact_id") or group), []).append(index)
        category_of.setdefault(group, str(row.get("category", "")))
    by_category: dict[str, list[str]] = {}
    for group in sorted(groups):
        by_category.setdefault(category_of[group], []).append(group)

    # Whole groups for eval; then a share of the rest for valid, some of them whole too.
    # Each category keeps at least one group that gives rows to training.
    held = sample_groups(by_category, holdout_counts(
        {cat: len(names) for cat, names in by_category.items()}, holdout), rng)
    rest = {cat: [g for g in names if g not in held] for cat, names in by_category.items()}
    sizes = {cat: len(names) for cat, names in rest.items()}
    reserved = sample_groups(rest, spread(sizes, valid_share, sizes, at_least_one=True), rng)
    in_valid = {cat: [g for g in names if g in reserved] for cat, names in rest.items()}
    caps = {cat: min(len(in_valid[cat]), sizes[cat] - 1) for cat in rest}
    valid_held = sample_groups(in_valid, spread(
        {cat: len(names) for cat, names in in_valid.items()}, holdout, caps, at_least_one=True),
        rng)

    kinds = {index: ("eval", "unseen_fact") for group in held
             for indices in groups[group].values() for index in indices}
    kinds.update({index: ("valid", "unseen_fact") for group in valid_held
                  for indices in groups[group].values() for index in indices})
    # Every other fact lends one wording: in reserved groups to valid, elsewhere to eval.
    for indices in lenders(groups, reserved - valid_held, shared):
        kinds[rng.choice(indices)] = ("valid", "unseen_wording")
    eligible = lenders(groups, set(groups) - held - reserved, shared)
    for position in sorted(rng.sample(range(len(eligible)),
                                      take_count(len(eligible), eval_share, 0))):
        kinds[rng.choice(eligible[position])] = ("eval", "unseen_wording")
    return kinds


def split_questions(rows: list[tuple[int, dict]], rng: random.Random, eval_share: float,
                    valid_share: float) -> dict[int, tuple[str, str]]:
    """(file, eval kind) per row index for user rows: whole normalised-question groups."""
    groups: dict[str, list[int]] = {}
    for index, row in rows:
        groups.setdefault(split_key(row), []).append(index)
    chosen = set(rng.sample(sorted(groups), take_count(len(groups), eval_share, 1)))
    rest = [group for group in sorted(groups) if group not in chosen]
    valid = rng.sample(rest, take_count(len(rest), valid_share, 1))
    kinds = {index: ("eval", "unseen_question") for group in chosen for index in groups[group]}
    kinds.update({index: ("valid", "unseen_question") for group in valid
                  for index in groups[group]})
    return kinds


def remove_overlap(train: list[dict], candidates: dict[str, list[dict]]) -> tuple[dict, Counter]:
    """Keep each question in one file; returns the eval and valid rows and what was done.

    A candidate whose question is already trained on moves to training if it is an
    unseen wording (its fact is trained anyway) and is dropped if its whole group is
    held out (moving it would put the group in training).  A question already kept
    for eval (filled first) or valid is dropped as a duplicate.
    """
    # Two facts can share a wording; the copy held out would then be a seen question.
    trained = {normalize_question(row["question"]) for row in train}
    kept, held_questions, counts = {"eval": [], "valid": []}, set(), Counter()
    for name in ("eval", "valid"):
        for row in candidates[name]:
            key = normalize_question(row["question"])
            if key in trained and row["eval_kind"] == "unseen_wording":
                train.append({k: v for k, v in row.items() if k != "eval_kind"})
                counts["moved_for_overlap"] += 1
            elif key in trained:
                counts["dropped_for_overlap"] += 1
            elif key in held_questions:
                counts["duplicates_removed"] += 1
            else:
                held_questions.add(key)
                kept[name].append(row)
    return kept, counts


def overlaps(splits: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    """Questions shared by two files, and held-out groups that another file touches."""
    questions = {name: {normalize_question(row["question"]) for row in rows}
                 for name, rows in splits.items()}
    groups = {name: {split_key(row) for row in rows} for name, rows in splits.items()}
    held = {name: {split_key(row) for row in rows if row.get("eval_kind") in HELD_OUT_KINDS}
            for name, rows in splits.items()}
    pairs = (("train", "valid"), ("train", "eval"), ("valid", "eval"))
    return {"questions": {f"{a}_{b}": len(questions[a] & questions[b]) for a, b in pairs},
            # Train may share an unseen wording's group, never a held-out one; valid
            # and eval share no group at all.
            "groups": {"train_valid": len(groups["train"] & held["valid"]),
                       "train_eval": len(groups["train"] & held["eval"]),
                       "valid_eval": len(groups["valid"] & groups["eval"])}}


def category_counts(rows: list[dict]) -> dict[str, int]:
    """Rows per category, sorted by name."""
    return dict(sorted(Counter(str(row["category"]) for row in rows if "category" in row).items()))


def kind_counts(rows: list[dict]) -> dict[str, int]:
    """Rows per eval_kind, sorted by name."""
    return dict(sorted(Counter(row["eval_kind"] for row in rows).items()))


def main(args: argparse.Namespace) -> None:
    """Read, assign rows to eval and valid, verify no overlap, then write the split and report."""
    source = Path(args.input)
    out_dir = Path(args.output_dir)
    rows = read_jsonl(source, REQUIRED_FIELDS, hint="python format_dataset.py")
    print(f"read {len(rows)} rows from {source}")

    # Assign held-out rows: generated facts and user questions each by their own rule.
    rng = random.Random(args.seed)
    fact_rows = [(i, row) for i, row in enumerate(rows) if is_fact_row(row)]
    question_rows = [(i, row) for i, row in enumerate(rows) if not is_fact_row(row)]
    shares = {kind: (args.eval_fraction if args.eval_fraction is not None else default)
              for kind, default in DEFAULT_EVAL_FRACTION.items()}
    asked = Counter(normalize_question(row["question"]) for row in rows)
    shared = {i for i, row in enumerate(rows) if asked[normalize_question(row["question"])] > 1}
    kinds = {}
    if fact_rows:
        kinds.update(split_facts(fact_rows, rng, args.holdout_facts, shares["fact"],
                                 args.valid_share, shared))
    if question_rows:
        kinds.update(split_questions(question_rows, rng, shares["question"], args.valid_share))
    train = [row for i, row in enumerate(rows) if i not in kinds]
    candidates = {name: [{**row, "eval_kind": kinds[i][1]} for i, row in enumerate(rows)
                         if kinds.get(i, ("",))[0] == name] for name in ("eval", "valid")}

    # Verify: no question in two files, no held-out group touched by another file.
    kept, counts = remove_overlap(train, candidates)
    splits = {"train": train, "valid": kept["valid"], "eval": kept["eval"]}
    found = overlaps(splits)
    leaks = [f"{what} {pair}: {n}" for what, pairs in found.items()
             for pair, n in pairs.items() if n]
    if leaks:  # remove_overlap should leave none; writing the files would leak held-out data
        raise PipelineError(f"field question/fact_group shared between files after removing "
                            f"overlap ({', '.join(leaks)}); no files written", source)
    empty = [name for name in FILES if not splits[name]]
    if empty:
        raise PipelineError(
            f"the {' and '.join(empty)} set would be empty ({len(rows)} rows: "
            f"{len(train)} train, {len(kept['valid'])} valid, {len(kept['eval'])} eval after "
            f"removing overlapping and duplicate questions); add more distinct questions or "
            f"change --eval-fraction / --holdout-facts / --valid-share", source)

    # Write the split and the report together, only now that all checks passed.
    report = {
        "input": str(source), "input_sha256": file_sha256(source), "seed": args.seed,
        # The eval fraction actually used, per kind of row present (facts, questions).
        "options": {"eval_fraction": {kind: share for kind, share in shares.items()
                                      if (fact_rows if kind == "fact" else question_rows)},
                    "holdout_facts": args.holdout_facts, "valid_share": args.valid_share},
        "rows": len(rows),
        "groups": {"fact_groups": len({split_key(row) for _, row in fact_rows}),
                   "facts": len({str(row.get("fact_id") or row["group"])
                                 for _, row in fact_rows}),
                   "questions": len({split_key(row) for _, row in question_rows})},
        "held_out_fact_groups": {name: len({split_key(row) for row in splits[name]
                                            if row["eval_kind"] == "unseen_fact"})
                                 for name in ("eval", "valid")},
        "train_rows": len(train), "valid_rows": len(kept["valid"]),
        "eval_rows": len(kept["eval"]),
        "eval_by_kind": kind_counts(kept["eval"]), "valid_by_kind": kind_counts(kept["valid"]),
        "duplicates_removed": counts["duplicates_removed"],
        "moved_for_overlap": counts["moved_for_overlap"],
        "dropped_for_overlap": counts["dropped_for_overlap"],
        # Verified above: every count is 0.
        "overlaps": found,
        "overlap_after_normalisation": sum(found["questions"].values()),
    }
    if any("category" in row for row in rows):
        report["categories"] = {name: category_counts(splits[name]) for name in FILES}
    for name in FILES:
        write_jsonl(out_dir / f"{name}.jsonl", splits[name])
    write_json(out_dir / "split_report.json", report)
    print_summary(report, out_dir)


def print_summary(report: dict, out_dir: Path) -> None:
    """Say what was written: rows per file and kind, and the overlap checks."""
    print(f"wrote {report['train_rows']} train, {report['valid_rows']} valid and "
          f"{report['eval_rows']} eval rows to {out_dir}/ (train.jsonl, valid.jsonl, eval.jsonl)")
    print(f"  eval  {report['eval_by_kind']}")
    print(f"  valid {report['valid_by_kind']}  (tune on this, never on eval)")
    if report["groups"]["fact_groups"]:
        held = report["held_out_fact_groups"]
        print(f"  fact groups held out whole: {held['eval']} in eval, {held['valid']} in valid "
              f"(of {report['groups']['fact_groups']})")
    print(f"  moved {report['moved_for_overlap']} overlapping wordings to train, dropped "
          f"{report['dropped_for_overlap']} held-out rows asked in train and "
          f"{report['duplicates_removed']} duplicate questions; questions or held-out groups "
          f"shared between files: 0; report {out_dir / 'split_report.json'}")


if __name__ == "__main__":
    run_main(main, parse_args())
