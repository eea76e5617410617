"""Write a built-in, offline set of true question-answer rows for fine-tuning.

Run:
    .venv/bin/python generate_dataset.py                      # 1200 rows -> data/qa_pairs.jsonl
    .venv/bin/python generate_dataset.py --size 3000 --categories arithmetic,unit_conversion
    .venv/bin/python generate_dataset.py --list-categories    # what each category can give

Each row is {"question", "answer", "key", "category", "fact_id", "fact_group"}:
`answer` is a full sentence, `key` the short part of it that a correct reply must
contain, and `fact_id` names the underlying fact.  Every fact that is included
appears in at least three wordings that share fact_id, answer and key, so a later
step can hold one wording out and test whether the model learned the fact rather
than the sentence.  `fact_group` joins a fact to its restatements the other way
round ("the capital of Ethiopia is Addis Ababa" / "Addis Ababa is the capital of
which country?", symbol / element of a symbol, 7 + 5 / 12 - 5, hot / cold), so
that a fact held out of training is held out with every row that would state it.

The hand-checked facts are data, in facts/ beside this script (one CSV or JSONL file
per table; facts/README.md gives each file's columns and what was left out and why).
This script reads them, computes the arithmetic and unit conversions, fills in the
question templates, and checks every fact before any row is picked.  Only the
standard library is used (common.read_csv and json read facts/; common.py imports torch
only inside the functions that need it), so this runs anywhere in a fraction of a second.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
from collections import Counter, namedtuple
from pathlib import Path

from common import PipelineError, normalize_question, read_csv, read_text, run_main, write_jsonl
from scoring import key_match

# =============================================================================
# Fact tables: read from facts/ (data only; see facts/README.md for what was checked)
# =============================================================================

FACTS_DIR = Path(__file__).resolve().parent / "facts"

# Each file in facts/ with its columns (CSV) or keys (JSONL), in the order the rows'
# tuples hold them, and each one's type: str (non-empty, no spaces at either end),
# OPTIONAL (a str, or None where the CSV cell is empty), int (a whole number) or
# WORDINGS (a JSON list of such strings).
OPTIONAL, WORDINGS = "optional str", "list of str"
FACT_FILES = {
    "countries.csv": {"country": str, "capital": str, "continent": OPTIONAL},
    "currencies.csv": {"country": str, "currency": str, "key": str},
    "elements.csv": {"element": str, "symbol": str, "atomic_number": int},
    "planets.csv": {"planet": str, "ordinal": str},
    "si_units.csv": {"quantity": str, "unit": str},
    "science_facts.jsonl": {"slug": str, "answer": str, "key": str, "questions": WORDINGS},
    "plurals.csv": {"word": str, "plural": str},
    "opposites.csv": {"word": str, "opposite": str},
    "past_tenses.csv": {"verb": str, "past": str},
    "small_talk.jsonl": {"slug": str, "answer": str, "key": str, "questions": WORDINGS},
    "conversions.csv": {"singular": str, "plural": str, "to": str, "factor": int},
}


def load_facts(facts_dir: str | os.PathLike = FACTS_DIR) -> dict[str, list[tuple]]:
    """Every table of FACT_FILES, read from facts_dir and keyed by file stem ("countries")."""
    return {name.split(".")[0]: read_facts(Path(facts_dir) / name, columns)
            for name, columns in FACT_FILES.items()}


def read_facts(path: Path, columns: dict) -> list[tuple]:
    """The rows of one CSV (header = columns) or JSONL file as tuples; blank lines skipped.

    A malformed entry raises PipelineError naming the file, its line and the field.
    """
    if not path.exists():
        raise PipelineError("fact table not found", path)
    if path.suffix == ".jsonl":
        numbered = [(number, line) for number, line
                    in enumerate(read_text(path).splitlines(), 1) if line.strip()]
        return [tuple(field(path, number, name, kind, value)
                      for name, kind, value in json_fields(path, number, line, columns))
                for number, line in numbered]
    table = read_csv(path)
    if table.header != list(columns):
        raise PipelineError(f"the first line must be the header {','.join(columns)}", path, 1)
    rows = []
    for number, record in table.records:
        if len(record) != len(columns):  # a short row: read_csv leaves its last cells out
            raise PipelineError(f"{len(record)} fields, expected {len(columns)} "
                                f"({','.join(columns)}); quote a field holding a comma",
                                path, number)
        rows.append(tuple(field(path, number, name, kind, record[name])
                          for name, kind in columns.items()))
    return rows


def json_fields(path: Path, number: int, line: str, columns: dict):
    """(name, type, value) for each of columns in one JSONL line, which must hold exactly them."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"not valid JSON ({exc.msg}, column {exc.colno})",
                            path, number) from None
    if not isinstance(entry, dict):
        raise PipelineError("not a JSON object", path, number)
    problems = [f"missing field {name!r}" for name in columns if name not in entry]
    problems += [f"unknown field {name!r}" for name in entry if name not in columns]
    if problems:
        raise PipelineError(f"{', '.join(problems)}; expected {', '.join(columns)}",
                            path, number)
    return [(name, kind, entry[name]) for name, kind in columns.items()]


def field(path: Path, number: int, name: str, kind, value):
    """One value checked against its type and converted: the CSV text "79" -> 79."""
    def bad(why: str) -> PipelineError:
        return PipelineError(f"field {name!r}: {why}, got {value!r}", path, number)

    if kind is OPTIONAL and value == "":
        return None
    if kind is WORDINGS:
        if not isinstance(value, list) or not value:
            raise bad("expected a non-empty list of questions")
        return [field(path, number, f"{name}[{index}]", str, item)
                for index, item in enumerate(value)]
    if not isinstance(value, str):
        raise bad("expected a string")
    if kind is int:
        if not re.fullmatch(r"[0-9]+", value):
            raise bad("expected a whole number")
        return int(value)
    if not value or value != value.strip():
        raise bad("expected non-empty text with no space at either end")
    return value


# --- computed facts: operand ranges --------------------------------------------
ADD_OPERANDS = range(1, 21)        # a + b for 1 <= a <= b <= 20
SUBTRACT_OPERANDS = range(1, 21)   # a - b for 1 <= b <= a <= 20: never negative
MULTIPLY_OPERANDS = range(1, 13)   # the times tables, a * b for 1 <= a <= b <= 12
CONVERSION_AMOUNTS = range(1, 21)  # whole amounts, times facts/conversions.csv's exact factors

# =============================================================================
# Question templates (five or more per fact type; see MIN_POOL_WORDINGS)
# =============================================================================

TEMPLATES = {
    "capital": [
        "What is the capital of {country}?", "Which city is the capital of {country}?",
        "Name the capital city of {country}.", "What city serves as the capital of {country}?",
        "What is the capital city of {country}?", "Tell me the capital of {country}."],
    "capital_of": [
        "{capital} is the capital of which country?",
        "Which country has {capital} as its capital?",
        "Of which country is {capital} the capital?",
        "{capital} is the capital city of which country?",
        "Which country's capital is {capital}?"],
    "continent": [
        "On which continent is {country}?", "Which continent is {country} in?",
        "{country} is located on which continent?",
        "On which continent is {country} located?",
        "What continent is {country} part of?"],
    "currency": [
        "What is the currency of {country}?", "Which currency is used in {country}?",
        "What currency does {country} use?", "What is the official currency of {country}?",
        "What money do people use in {country}?"],
    "symbol": [
        "What is the chemical symbol for {element}?",
        "Which symbol represents {element} on the periodic table?",
        "What is the symbol for the element {element}?",
        "How is {element} written as a chemical symbol?",
        "Give the chemical symbol of {element}."],
    "element_of_symbol": [
        "Which element has the chemical symbol {symbol}?",
        "What element does the symbol {symbol} stand for?",
        "Which chemical element is represented by {symbol}?",
        "The symbol {symbol} stands for which element?",
        "Name the element whose chemical symbol is {symbol}."],
    "atomic_number": [
        "What is the atomic number of {element}?",
        "Which atomic number does {element} have?",
        "How many protons does an atom of {element} have?",
        "What number is {element} on the periodic table?",
        "Give the atomic number of {element}."],
    "planet_order": [
        "Which planet is {ordinal} from the Sun?",
        "What is the {ordinal} planet from the Sun?",
        "Name the {ordinal} planet from the Sun.",
        "Counting outward from the Sun, which planet is {ordinal}?",
        "Which planet comes {ordinal} in order from the Sun?"],
    "si_unit": [
        "What is the SI unit of {quantity}?",
        "Which SI unit is used to measure {quantity}?",
        "In what SI unit is {quantity} measured?",
        "Name the SI unit of {quantity}.",
        "What unit does the SI system use for {quantity}?"],
    # Symbol-only wordings ("3 + 4") use a different opening verb per operation:
    # normalisation strips + - *, so "What is 4 + 3" and "What is 4 - 3" would collide.
    "add": [
        "What is {x} plus {y}?", "What is {x} + {y}?", "How much is {x} plus {y}?",
        "What is the sum of {x} and {y}?", "Add {x} and {y}.",
        "What do you get if you add {x} to {y}?"],
    "subtract": [
        "What is {a} minus {b}?", "Compute {a} - {b}.", "How much is {a} minus {b}?",
        "Subtract {b} from {a}.", "What do you get if you take {b} away from {a}?"],
    "multiply": [
        "What is {x} times {y}?", "What is {x} multiplied by {y}?", "Calculate {x} * {y}.",
        "What is the product of {x} and {y}?", "Multiply {x} by {y}.",
        "How much is {x} times {y}?"],
    "conversion": [
        "How many {to} are in {n} {unit}?", "How many {to} are there in {n} {unit}?",
        "Convert {n} {unit} to {to}.", "{n} {unit} equals how many {to}?",
        "What is {n} {unit} in {to}?", "Express {n} {unit} in {to}."],
    "plural": [
        "What is the plural of {word}?", "What is the plural form of {word}?",
        "How do you say {word} in the plural?", "Give the plural of the word {word}.",
        "One {word}, two what?"],
    "opposite": [
        "What is the opposite of {word}?", "What word means the opposite of {word}?",
        "What is the antonym of {word}?", "Give the opposite of the word {word}.",
        "Which word is opposite in meaning to {word}?"],
    "past_tense": [
        "What is the past tense of {word}?", "What is the simple past of the verb {word}?",
        "How do you write {word} in the past tense?",
        "Give the past tense of the word {word}.",
        "Which word is the past tense of {word}?"],
}

# =============================================================================
# Fact pool
# =============================================================================

CATEGORIES = ("geography", "science", "arithmetic", "unit_conversion", "small_talk",
              "language")

# A fact in the output needs 3 wordings (2 to train on, 1 to hold out).  Every fact
# in the pool has at least 5 so that any share of rows >= 3 can be met: a share of
# 3f + 1 or 3f + 2 rows puts the extra rows on facts as 4th and 5th wordings.
MIN_ROW_WORDINGS = 3
MIN_POOL_WORDINGS = 5

# group: the fact_group, shared with the fact's restatements (see the module docstring).
Fact = namedtuple("Fact", "fact_id category answer key questions group")


def capitalise(text: str) -> str:
    """Upper-case the first letter only ("the United Kingdom ..." -> "The United ...")."""
    return text[:1].upper() + text[1:]


def slug(name: str) -> str:
    """A fact_id part: lower case, no leading "the", runs of other characters as "_"."""
    name = name.lower().removeprefix("the ")
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def templated(fact_id: str, kind: str, answer: str, key: str, group: str | None = None,
              **fields) -> Fact:
    """One fact whose wordings are TEMPLATES[kind] filled in; group is fact_id unless given."""
    category = fact_id.split("/", 1)[0]
    questions = tuple(capitalise(t.format(**fields)) for t in TEMPLATES[kind])
    return Fact(fact_id, category, capitalise(answer), key, questions, group or fact_id)


def written(fact_id: str, answer: str, key: str, questions) -> Fact:
    """One hand-written fact; it has no restatement, so it is its own group."""
    return Fact(fact_id, fact_id.split("/", 1)[0], answer, key, tuple(questions), fact_id)


def geography_facts(tables: dict[str, list[tuple]]) -> list[Fact]:
    """Capitals (both ways round), continents and currencies; one group per country."""
    facts = []
    for country, capital, continent in tables["countries"]:
        name = country.removeprefix("the ")
        group = f"geography/{slug(country)}"
        facts.append(templated(f"geography/capital/{slug(country)}", "capital",
                               f"The capital of {country} is {capital}.", capital,
                               group, country=country))
        # "Mexico City is the capital of which country?" would hold its own answer.
        if not re.search(rf"\b{re.escape(name)}\b", capital):
            facts.append(templated(f"geography/capital_of/{slug(capital)}", "capital_of",
                                   f"{capital} is the capital of {country}.", name,
                                   group, capital=capital))
        if continent:
            facts.append(templated(f"geography/continent/{slug(country)}", "continent",
                                   f"{country} is in {continent}.", continent,
                                   group, country=country))
    for country, currency, key in tables["currencies"]:
        facts.append(templated(f"geography/currency/{slug(country)}", "currency",
                               f"The currency of {country} is the {currency}.", key,
                               f"geography/{slug(country)}", country=country))
    return facts


def science_facts(tables: dict[str, list[tuple]]) -> list[Fact]:
    """Element symbols and numbers, planet order, SI units and hand-written facts."""
    facts = []
    for element, symbol, number in tables["elements"]:
        # Symbol and element-of-symbol state one fact both ways round: one group per
        # element, its atomic number included.
        group = f"science/element/{element}"
        facts.append(templated(f"science/symbol/{element}", "symbol",
                               f"The chemical symbol for {element} is {symbol}.", symbol,
                               group, element=element))
        facts.append(templated(f"science/element_of_symbol/{slug(symbol)}",
                               "element_of_symbol",
                               f"{symbol} is the chemical symbol for {element}.", element,
                               group, symbol=symbol))
        facts.append(templated(f"science/atomic_number/{element}", "atomic_number",
                               f"The atomic number of {element} is {number}.", str(number),
                               group, element=element))
    for planet, ordinal in tables["planets"]:
        facts.append(templated(f"science/planet_order/{ordinal}", "planet_order",
                               f"{planet} is the {ordinal} planet from the Sun.", planet,
                               ordinal=ordinal))
    for quantity, unit in tables["si_units"]:
        facts.append(templated(f"science/si_unit/{slug(quantity)}", "si_unit",
                               f"The SI unit of {quantity} is the {unit}.", unit,
                               quantity=quantity))
    facts.extend(written(f"science/fact/{name}", answer, key, questions)
                 for name, answer, key, questions in tables["science_facts"])
    return facts


def arithmetic_facts(tables: dict[str, list[tuple]]) -> list[Fact]:
    """Sums, differences and products of small integers, computed here (no table used)."""
    facts = []
    for a in ADD_OPERANDS:
        for b in ADD_OPERANDS:
            if a <= b:  # 3 + 4 and 4 + 3 are one fact
                x, y = commuted(a, b)
                facts.append(templated(f"arithmetic/add/{a}_{b}", "add",
                                       f"{x} plus {y} equals {a + b}.", str(a + b),
                                       family(a, b), x=x, y=y))
    for a in SUBTRACT_OPERANDS:
        for b in SUBTRACT_OPERANDS:
            if b <= a:
                facts.append(templated(f"arithmetic/subtract/{a}_{b}", "subtract",
                                       f"{a} minus {b} equals {a - b}.", str(a - b),
                                       family(b, a - b), a=a, b=b))
    for a in MULTIPLY_OPERANDS:
        for b in MULTIPLY_OPERANDS:
            if a <= b:
                x, y = commuted(a, b)
                facts.append(templated(f"arithmetic/multiply/{a}_{b}", "multiply",
                                       f"{x} times {y} equals {a * b}.", str(a * b), x=x, y=y))
    return facts


def family(x: int, y: int) -> str:
    """Group of x + y = s with s - x = y and s - y = x: 7 + 5 = 12 and 12 - 5 = 7 are one fact."""
    if min(x, y) < 1:  # s - s = 0 has no sum among the addition facts: its own group
        return f"arithmetic/subtract/{x + y}_{x + y}"
    return f"arithmetic/family/{min(x, y)}_{max(x, y)}"


def commuted(a: int, b: int) -> tuple[int, int]:
    """Operand order shown for a <= b: mixed by parity so neither order always comes first."""
    return (a, b) if (a + b) % 2 == 0 else (b, a)


def conversion_facts(tables: dict[str, list[tuple]]) -> list[Fact]:
    """Whole-number unit conversions, computed here from facts/conversions.csv's exact factors."""
    facts = []
    for singular, plural, to, factor in tables["conversions"]:
        for n in CONVERSION_AMOUNTS:
            unit = singular if n == 1 else plural
            facts.append(templated(f"unit_conversion/{singular}_to_{to}/{n}", "conversion",
                                   f"{n} {unit} is {n * factor} {to}.", str(n * factor),
                                   n=n, unit=unit, to=to))
    return facts


def small_talk_facts(tables: dict[str, list[tuple]]) -> list[Fact]:
    """The hand-written conversational answers."""
    return [written(f"small_talk/{name}", answer, key, questions)
            for name, answer, key, questions in tables["small_talk"]]


def language_facts(tables: dict[str, list[tuple]]) -> list[Fact]:
    """Plurals, opposites and past tenses."""
    facts = []
    for word, plural in tables["plurals"]:
        facts.append(templated(f"language/plural/{word}", "plural",
                               f"The plural of {word} is {plural}.", plural, word=word))
    for word, opposite in tables["opposites"]:
        # "hot -> cold" and "cold -> hot" state one pair: one group, named by the pair.
        pair = "_".join(sorted((word, opposite)))
        facts.append(templated(f"language/opposite/{word}", "opposite",
                               f"The opposite of {word} is {opposite}.", opposite,
                               f"language/opposite/{pair}", word=word))
    for verb, past in tables["past_tenses"]:
        facts.append(templated(f"language/past_tense/{verb}", "past_tense",
                               f"The past tense of {verb} is {past}.", past, word=verb))
    return facts


BUILDERS = {
    "geography": geography_facts, "science": science_facts,
    "arithmetic": arithmetic_facts, "unit_conversion": conversion_facts,
    "small_talk": small_talk_facts, "language": language_facts,
}


@functools.lru_cache(maxsize=1)
def fact_pool(facts_dir: str | os.PathLike = FACTS_DIR) -> dict[str, tuple[Fact, ...]]:
    """Every fact of every category, checked once: the tables are data and can have typos."""
    tables = load_facts(facts_dir)
    pool = {category: tuple(BUILDERS[category](tables)) for category in CATEGORIES}
    facts = [fact for category in CATEGORIES for fact in pool[category]]
    ids = Counter(fact.fact_id for fact in facts)
    repeated = [i for i, n in ids.items() if n > 1]
    if repeated:
        raise PipelineError(f"field fact_id repeats: {repeated[:5]}", facts_dir)
    for fact in facts:
        where = f"fact {fact.fact_id}"
        if fact.key not in fact.answer:
            raise PipelineError(f"{where}: field key {fact.key!r} is not in its answer "
                                f"{fact.answer!r}", facts_dir)
        unmet = [q for q in fact.questions if not key_match(fact.answer, fact.key, q)]
        if unmet:  # evaluation would score the reference answer itself wrong
            raise PipelineError(f"{where}: its answer {fact.answer!r} does not give field key "
                                f"{fact.key!r} for the question {unmet[0]!r}", facts_dir)
        if len(fact.questions) < MIN_POOL_WORDINGS:
            raise PipelineError(f"{where}: field questions has {len(fact.questions)} wordings, "
                                f"at least {MIN_POOL_WORDINGS} needed", facts_dir)
        if not fact.group.startswith(fact.category + "/"):
            raise PipelineError(f"{where}: fact group {fact.group!r} is not in category "
                                f"{fact.category}", facts_dir)
    for category in CATEGORIES:
        if key_clashes(pool[category]):
            raise PipelineError(f"{category}: field key is whole words inside another key: "
                                f"{key_clashes(pool[category])[:5]}", facts_dir)
    # Checking the whole pool makes every subset the generator can pick unique too.
    assert_unique_questions((q for fact in facts for q in fact.questions), facts_dir)
    return pool


def key_clashes(facts) -> list[tuple[str, str]]:
    """(key, other key) pairs where one key is whole words inside a different one ("dollar")."""
    keys = sorted({fact.key.lower() for fact in facts})
    return [(key, other) for key in keys for other in keys
            if key != other and re.search(rf"(?<!\w){re.escape(key)}(?!\w)", other)]


def assert_unique_questions(questions, path: str | os.PathLike) -> None:
    """Fail if two questions are the same after normalisation (a held-out wording would leak)."""
    seen = Counter(normalize_question(q) for q in questions)
    repeated = sorted(q for q, n in seen.items() if n > 1)
    if repeated:
        raise PipelineError(f"field question repeats after normalisation: {repeated[:5]}", path)


def row_capacity(category: str) -> int:
    """Most rows a category can give: every wording of every fact."""
    return sum(len(fact.questions) for fact in fact_pool()[category])


# =============================================================================
# Picking rows
# =============================================================================


def split_rows(total: int, capacities: dict[str, int]) -> dict[str, int]:
    """Share total rows across categories as evenly as capacities allow; each share 0 or >= 3."""
    # Too few rows for 3 per category: the first categories in order get them.
    names = list(capacities)[: total // MIN_ROW_WORDINGS]
    shares = dict.fromkeys(capacities, 0)
    left = total
    # Smallest capacity first, so what it cannot take spreads over the rest.
    for position, name in enumerate(sorted(names, key=lambda n: capacities[n])):
        waiting = len(names) - position
        shares[name] = min(capacities[name], -(-left // waiting))
        left -= shares[name]
    if left:  # a bug, not bad input: main checks the total against the capacities first
        raise RuntimeError(f"{left} of {total} rows unassigned across {capacities}")
    return shares


def pick_rows(facts: tuple[Fact, ...], count: int, rng: random.Random) -> list[dict]:
    """count rows from facts: as many facts as possible at 3 wordings, extras as 4th, 5th..."""
    chosen = rng.sample(facts, min(len(facts), count // MIN_ROW_WORDINGS))
    wordings = [MIN_ROW_WORDINGS] * len(chosen)
    extra = count - MIN_ROW_WORDINGS * len(chosen)
    # Hand out extra wordings round-robin so no fact gets many more than another.
    while extra:
        before = extra
        for index, fact in enumerate(chosen):
            if extra and wordings[index] < len(fact.questions):
                wordings[index] += 1
                extra -= 1
        if extra == before:  # a bug, not bad input: the size check runs first
            raise RuntimeError("not enough wordings; the size check should have caught this")
    return [{"question": question, "answer": fact.answer, "key": fact.key,
             "category": fact.category, "fact_id": fact.fact_id, "fact_group": fact.group}
            for fact, n in zip(chosen, wordings)
            for question in rng.sample(fact.questions, n)]


def check_rows(rows: list[dict], path: str | os.PathLike) -> None:
    """Check the guarantees later steps rely on, on the rows about to be written to path."""
    assert_unique_questions((row["question"] for row in rows), path)
    per_fact = {}
    for number, row in enumerate(rows, 1):
        if row["key"] not in row["answer"]:
            raise PipelineError(f"field key {row['key']!r} is not in the answer", path, number)
        per_fact.setdefault(row["fact_id"], []).append(row)
    for fact_id, fact_rows in per_fact.items():
        if len(fact_rows) < MIN_ROW_WORDINGS:
            raise PipelineError(f"fact {fact_id}: {len(fact_rows)} wordings, at least "
                                f"{MIN_ROW_WORDINGS} needed", path)
        if len({(r["answer"], r["key"], r["category"], r["fact_group"]) for r in fact_rows}) > 1:
            raise PipelineError(f"fact {fact_id}: fields answer, key, category and fact_group "
                                f"differ between its wordings", path)


def print_summary(rows: list[dict], path: str) -> None:
    """Say what was written, with rows, facts and fact groups per category."""
    facts = {row["fact_id"]: row["category"] for row in rows}
    groups = {row["fact_group"]: row["category"] for row in rows}
    row_counts = Counter(row["category"] for row in rows)
    fact_counts, group_counts = Counter(facts.values()), Counter(groups.values())
    print(f"wrote {len(rows)} rows ({len(facts)} facts in {len(groups)} fact groups) to {path}")
    for category in CATEGORIES:
        if row_counts[category]:
            print(f"  {category:<16} {row_counts[category]:>5} rows  "
                  f"{fact_counts[category]:>4} facts  {group_counts[category]:>4} groups")


def print_capacities() -> None:
    """List each category with how many facts and rows it can give."""
    pool = fact_pool()  # first, so a malformed facts/ file stops it before any output
    print(f"{'category':<16} {'facts':>6} {'max rows':>9}")
    for category in CATEGORIES:
        print(f"{category:<16} {len(pool[category]):>6} {row_capacity(category):>9}")


# =============================================================================
# Command line
# =============================================================================


def parse_args(argv=None) -> argparse.Namespace:
    """Read and check the command line; impossible requests exit with status 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="data/qa_pairs.jsonl",
                        help="where to write the rows (default data/qa_pairs.jsonl: "
                             "where format_dataset.py reads from)")
    parser.add_argument("--size", type=int, default=1200,
                        help="number of question-answer rows (default 1200: three "
                             "wordings each of enough facts for a small model to learn "
                             "from while a fine-tune stays short; the default split's "
                             "counts are in results/smollm2-135m/split_report.json)")
    parser.add_argument("--categories", default=",".join(CATEGORIES),
                        help="comma-separated categories to include (default: all of "
                             f"{', '.join(CATEGORIES)}, for a broad mix of knowledge)")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed for which facts and wordings are picked and their "
                             "order (default 42: fixed, so reruns give the same file "
                             "byte for byte)")
    parser.add_argument("--list-categories", action="store_true",
                        help="print each category with its number of facts and most rows, "
                             "then exit (default off: a plain run writes the dataset)")
    args = parser.parse_args(argv)

    requested = [name.strip() for name in args.categories.split(",") if name.strip()]
    unknown = [name for name in requested if name not in CATEGORIES]
    if unknown or not requested:
        parser.error(f"unknown category {', '.join(unknown) or '(none given)'}; "
                     f"valid: {', '.join(CATEGORIES)}")
    # Canonical order, not the order typed, so the output depends only on the set.
    args.categories = [name for name in CATEGORIES if name in requested]
    if not args.list_categories:
        try:
            maximum = sum(row_capacity(name) for name in args.categories)
        except PipelineError as exc:  # a malformed facts/ file: one line, status 2
            parser.exit(2, f"error: {exc}\n")
        if not MIN_ROW_WORDINGS <= args.size <= maximum:
            parser.error(f"--size {args.size} is out of range: categories "
                         f"{', '.join(args.categories)} give {MIN_ROW_WORDINGS} to "
                         f"{maximum} rows (maximum {maximum})")
    return args


def main(args: argparse.Namespace) -> None:
    """Build the fact pool, pick rows, check them and write them."""
    # --list-categories only reports what is available.
    if args.list_categories:
        print_capacities()
        return

    # Share the rows across categories, then pick facts and wordings in each.
    # One Random(seed) drawn from in a fixed order makes the file reproducible.
    rng = random.Random(args.seed)
    shares = split_rows(args.size, {name: row_capacity(name) for name in args.categories})
    rows = []
    for category in args.categories:
        rows.extend(pick_rows(fact_pool()[category], shares[category], rng))
    # Shuffle so categories and wordings of one fact are not bunched together.
    rng.shuffle(rows)

    # Check before writing, so a broken table never reaches the training step.
    if len(rows) != args.size:
        raise PipelineError(f"picked {len(rows)} rows, expected {args.size}")
    check_rows(rows, args.output)

    # Write atomically and report.
    write_jsonl(args.output, rows)
    print_summary(rows, args.output)


if __name__ == "__main__":
    run_main(main, parse_args())
