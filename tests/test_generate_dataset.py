"""Tests for generate_dataset.py: shape, paraphrase guarantees, determinism, CLI errors, truth,
keys, fact groups and errors in facts/."""

import hashlib
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from common import PipelineError, normalize_question
from scoring import key_match
from generate_dataset import (CATEGORIES, FACT_FILES, FACTS_DIR, fact_pool,
                              load_facts, main, parse_args, row_capacity)

FIELDS = {"question", "answer", "key", "category", "fact_id", "fact_group"}


def generate(tmp_path, *argv, name="qa.jsonl"):
    """Run the generator into tmp_path and return (path, rows)."""
    path = tmp_path / name
    main(parse_args(["--output", str(path), *argv]))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return path, rows


@pytest.fixture(scope="module")
def default_file(tmp_path_factory):
    """The default dataset, built once for the whole module: (path, rows)."""
    return generate(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def default_rows(default_file):
    return default_file[1]


@pytest.fixture(scope="module")
def all_rows(tmp_path_factory):
    """Every wording of every fact: the largest file the generator can write."""
    size = sum(row_capacity(c) for c in CATEGORIES)
    return generate(tmp_path_factory.mktemp("all"), "--size", str(size))[1]


def by_fact(rows):
    """Group rows by fact_id."""
    groups = defaultdict(list)
    for row in rows:
        groups[row["fact_id"]].append(row)
    return groups


def test_default_rows_have_all_fields(default_rows):
    assert len(default_rows) == 1200
    assert {row["category"] for row in default_rows} == set(CATEGORIES)
    for row in default_rows:
        assert set(row) == FIELDS
        assert all(isinstance(row[f], str) and row[f].strip() for f in FIELDS)
        assert row["key"] in row["answer"]


@pytest.mark.parametrize("rows_name", ["default_rows", "all_rows"])
def test_every_fact_has_three_consistent_wordings(rows_name, request):
    rows = request.getfixturevalue(rows_name)
    for fact_id, group in by_fact(rows).items():
        assert len(group) >= 3, fact_id
        assert len({(r["answer"], r["key"], r["category"], r["fact_group"])
                    for r in group}) == 1, fact_id
        assert fact_id.startswith(group[0]["category"] + "/")
        assert group[0]["fact_group"].startswith(group[0]["category"] + "/")


@pytest.mark.parametrize("rows_name", ["default_rows", "all_rows"])
def test_questions_unique_after_normalisation(rows_name, request):
    rows = request.getfixturevalue(rows_name)
    normalised = [normalize_question(row["question"]) for row in rows]
    assert len(set(normalised)) == len(normalised)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, _ = generate(tmp_path, "--size", "300", name="a.jsonl")
    b, _ = generate(tmp_path, "--size", "300", name="b.jsonl")
    c, _ = generate(tmp_path, "--size", "300", "--seed", "7", name="c.jsonl")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert sorted(a.read_text().splitlines()) != sorted(c.read_text().splitlines())


@pytest.mark.parametrize("size", [3, 5, 17, 100, 1001])
def test_size_is_exact(tmp_path, size):
    _, rows = generate(tmp_path, "--size", str(size))
    assert len(rows) == size
    assert all(len(group) >= 3 for group in by_fact(rows).values())


def test_categories_restrict(tmp_path):
    _, rows = generate(tmp_path, "--categories", "science, arithmetic", "--size", "200")
    assert len(rows) == 200
    assert {row["category"] for row in rows} == {"science", "arithmetic"}


def test_hand_written_category_capped_and_computed_fill(tmp_path):
    cap = row_capacity("small_talk")
    _, rows = generate(tmp_path, "--categories", "small_talk,arithmetic", "--size", "1000")
    counts = {c: sum(r["category"] == c for r in rows) for c in ("small_talk", "arithmetic")}
    assert counts == {"small_talk": cap, "arithmetic": 1000 - cap}


@pytest.mark.parametrize("argv", [
    ["--categories", "geography,astrology"],
    ["--categories", "small_talk", "--size", str(10**6)],
    ["--size", "2"],
])
def test_bad_requests_exit_2_and_write_nothing(tmp_path, capsys, argv):
    path = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exc:
        main(parse_args(["--output", str(path), *argv]))
    assert exc.value.code == 2
    assert not path.exists()
    err = capsys.readouterr().err
    if "astrology" in argv[1]:
        assert "astrology" in err and "geography" in err and "small_talk" in err
    else:
        assert "maximum" in err


def test_arithmetic_keys_are_correct(all_rows):
    rows = [r for r in all_rows if r["category"] == "arithmetic"]
    assert len(rows) > 1000
    for row in rows:
        question = row["question"].lower()
        a, b = map(int, re.findall(r"\d+", question))
        if re.search(r"\bplus\b|\+|\bsum\b|\badd\b", question):
            expected = a + b
        elif re.search(r"\bminus\b| - |\bsubtract\b|\btake\b", question):
            expected = max(a, b) - min(a, b)  # only non-negative differences are asked
        elif re.search(r"\btimes\b|\*|multipl|\bproduct\b", question):
            expected = a * b
        else:
            pytest.fail(f"no operator found in {row['question']!r}")
        assert row["key"] == str(expected), row


# (from unit, to unit, factor), written out here rather than imported.
UNIT_FACTORS = [
    ("kilometre", "metre", 1000), ("metre", "centimetre", 100), ("metre", "millimetre", 1000),
    ("centimetre", "millimetre", 10), ("kilogram", "gram", 1000), ("tonne", "kilogram", 1000),
    ("litre", "millilitre", 1000), ("hour", "minute", 60), ("hour", "second", 3600),
    ("minute", "second", 60), ("day", "hour", 24), ("week", "day", 7), ("year", "month", 12),
]


def test_unit_conversion_keys_are_correct(all_rows):
    rows = [r for r in all_rows if r["category"] == "unit_conversion"]
    assert len(rows) > 1000
    for row in rows:
        question = row["question"].lower()
        (n,) = map(int, re.findall(r"\d+", question))
        matches = [factor for src, dst, factor in UNIT_FACTORS
                   if re.search(rf"\b{src}s?\b", question)
                   and re.search(rf"how many {dst}s|to {dst}s|in {dst}s", question)]
        assert len(matches) == 1, row
        assert row["key"] == str(n * matches[0]), row


def facts_by_id(rows):
    """fact_id -> (answer, key) for spot checks."""
    return {r["fact_id"]: (r["answer"], r["key"]) for r in rows}


@pytest.mark.parametrize("fact_id, key", [
    ("geography/capital/france", "Paris"), ("geography/capital/japan", "Tokyo"),
    ("geography/capital/germany", "Berlin"), ("geography/capital/canada", "Ottawa"),
    ("geography/capital/australia", "Canberra"), ("geography/capital/brazil", "Brasilia"),
    ("geography/capital/united_kingdom", "London"), ("geography/capital/kenya", "Nairobi"),
    ("geography/capital_of/paris", "France"), ("geography/capital_of/ottawa", "Canada"),
    ("geography/continent/japan", "Asia"), ("geography/continent/peru", "South America"),
    ("geography/continent/kenya", "Africa"), ("geography/continent/france", "Europe"),
    ("geography/currency/japan", "yen"), ("geography/currency/germany", "euro"),
    ("geography/currency/united_states", "US dollar"),
    ("geography/currency/canada", "Canadian dollar"),
    ("science/symbol/gold", "Au"), ("science/symbol/iron", "Fe"),
    ("science/symbol/sodium", "Na"), ("science/symbol/potassium", "K"),
    ("science/element_of_symbol/ag", "silver"), ("science/element_of_symbol/pb", "lead"),
    ("science/atomic_number/carbon", "6"), ("science/atomic_number/gold", "79"),
    ("science/planet_order/third", "Earth"), ("science/planet_order/fifth", "Jupiter"),
    ("science/si_unit/force", "newton"), ("science/fact/water_formula", "H2O"),
    ("language/plural/child", "children"), ("language/past_tense/go", "went"),
])
def test_spot_checks(all_rows, fact_id, key):
    answer, found = facts_by_id(all_rows)[fact_id]
    assert found == key and key in answer


def test_no_disputed_capitals(all_rows):
    ids = {r["fact_id"] for r in all_rows}
    for country in ("bolivia", "south_africa", "netherlands", "switzerland", "israel"):
        assert f"geography/capital/{country}" not in ids


def test_list_categories_prints_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "out.jsonl"
    main(parse_args(["--output", str(path), "--list-categories"]))
    out = capsys.readouterr().out
    assert all(c in out for c in CATEGORIES)
    assert not path.exists()


def whole_words_in(phrase, text):
    """phrase occurs in text as whole words, case-insensitively."""
    return re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower()) is not None


@pytest.mark.parametrize("category", CATEGORIES)
def test_no_key_inside_another_key(category):
    """A reply naming another fact's key ("Canadian dollar") never matches this one ("dollar")."""
    keys = sorted({fact.key.lower() for fact in fact_pool()[category]})
    clashes = [(key, other) for key in keys for other in keys
               if key != other and whole_words_in(key, other)]
    assert clashes == []


def test_every_generated_answer_satisfies_its_key():
    """Every wording of every fact the generator can make: its answer satisfies its key."""
    rows = [(question, fact.answer, fact.key)
            for facts in fact_pool().values() for fact in facts for question in fact.questions]
    categories = {fact.category for facts in fact_pool().values() for fact in facts}
    assert categories == set(CATEGORIES) and len(rows) > 5000
    failing = [row for row in rows if not key_match(row[1], row[2], row[0])]
    assert failing == []


def test_us_dollar_key_is_specific():
    (fact,) = [f for f in fact_pool()["geography"]
               if f.fact_id == "geography/currency/united_states"]
    assert fact.key == "US dollar"
    assert fact.answer == "The currency of the United States is the US dollar."


def test_fact_groups_join_reverse_facts_only_within_a_category(all_rows):
    """Rows of a group are one category; capitals both ways round share the country's group."""
    groups = defaultdict(set)
    for row in all_rows:
        groups[row["fact_group"]].add(row["category"])
    assert all(len(categories) == 1 for categories in groups.values())
    ids = {r["fact_id"]: r["fact_group"] for r in all_rows}
    assert ids["geography/capital/ethiopia"] == ids["geography/capital_of/addis_ababa"]
    assert ids["science/symbol/zinc"] == ids["science/element_of_symbol/zn"]
    assert ids["language/opposite/sunrise"] == ids["language/opposite/sunset"]
    assert ids["arithmetic/multiply/3_4"] == "arithmetic/multiply/3_4"
    # "Mexico City is the capital of which country?" would hold its answer.
    assert "geography/capital_of/mexico_city" not in ids


def test_reverse_twins_share_a_group():
    """Every fact and its restatement the other way round have one fact_group."""
    pool = {fact.fact_id: fact for facts in fact_pool().values() for fact in facts}
    twins = [("geography/capital/ethiopia", "geography/capital_of/addis_ababa"),
             ("science/symbol/zinc", "science/element_of_symbol/zn"),
             ("science/symbol/beryllium", "science/element_of_symbol/be"),
             ("language/opposite/hot", "language/opposite/cold"),
             ("arithmetic/add/5_7", "arithmetic/subtract/12_5"),
             ("arithmetic/add/5_7", "arithmetic/subtract/12_7")]
    for one, other in twins:
        assert pool[one].group == pool[other].group, (one, other)
    assert pool["geography/capital/ethiopia"].group == "geography/ethiopia"
    assert pool["language/opposite/long"].group != pool["language/opposite/tall"].group


# sha256 of the default output (--size 1200 --seed 42), as written before the tables
# moved from generate_dataset.py into facts/.  Any change to facts/, the templates or
# the picking changes it: update it on purpose, with the reason in the commit.
DEFAULT_SHA256 = "82e56b0f9402760b7c14795b88501706b61ba7d3c0b670760dd5fd8bbab3142a"


def test_default_output_is_pinned(default_file):
    path, _ = default_file
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEFAULT_SHA256


def test_facts_are_read_beside_the_script():
    assert FACTS_DIR == Path(__file__).resolve().parent.parent / "facts"
    assert sorted(p.name for p in FACTS_DIR.iterdir() if p.suffix != ".md") == sorted(FACT_FILES)
    readme = (FACTS_DIR / "README.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in readme for name in FACT_FILES)


def test_tables_keep_their_types():
    tables = load_facts()
    assert ("Russia", "Moscow", None) in tables["countries"]
    assert ("the United States", "Washington, D.C.", "North America") in tables["countries"]
    assert ("gold", "Au", 79) in tables["elements"]
    assert ("hour", "hours", "seconds", 3600) in tables["conversions"]
    *_, questions = tables["small_talk"][0]
    assert isinstance(questions, list) and all(isinstance(q, str) for q in questions)


@pytest.mark.parametrize("name, line, broken, field", [
    ("elements.csv", 4, "lithium,Li,three", "atomic_number"),
    ("countries.csv", 3, "Germany,Berlin", "2 fields, expected 3"),
    ("countries.csv", 2, "France, Paris,Europe", "capital"),
    ("plurals.csv", 1, "word,plurals", "header"),
    ("planets.csv", 3, 'Venus,"second', "unterminated quote"),
    ("small_talk.jsonl", 2, '{"slug": "x", "answer": "A.", "key": "A", "questions": "Hi?"}',
     "questions"),
    ("science_facts.jsonl", 1, '{"slug": "x", "answer": "A.", "key": "A"}', "questions"),
    ("science_facts.jsonl", 3, '{"slug": "x",', "not valid JSON"),
])
def test_malformed_facts_name_file_line_and_field(tmp_path, name, line, broken, field):
    facts = tmp_path / "facts"
    shutil.copytree(FACTS_DIR, facts)
    lines = (facts / name).read_text(encoding="utf-8").splitlines()
    lines[line - 1] = broken
    (facts / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(PipelineError) as exc:
        load_facts(facts)
    message = str(exc.value)
    assert message.startswith(f"{facts / name}, line {line}: ")
    assert field in message


def test_missing_facts_file_is_named(tmp_path):
    facts = tmp_path / "facts"
    shutil.copytree(FACTS_DIR, facts)
    (facts / "opposites.csv").unlink()
    with pytest.raises(PipelineError, match="opposites.csv"):
        fact_pool(facts)


def test_copied_facts_give_the_same_pool(tmp_path):
    facts = tmp_path / "facts"
    shutil.copytree(FACTS_DIR, facts)
    assert fact_pool(facts) == fact_pool()


@pytest.mark.parametrize("broken, field", [
    ("Japan,Japanese yen,euro", "field key 'euro' is not in its answer"),
    ("Japan,Japanese yen,Japan", "does not give field key 'Japan'"),
])
def test_bad_fact_key_is_a_pipeline_error(tmp_path, broken, field):
    """A key the answer lacks, or gives only as an echo of the question, names the fact."""
    facts = tmp_path / "facts"
    shutil.copytree(FACTS_DIR, facts)
    lines = (facts / "currencies.csv").read_text(encoding="utf-8").splitlines()
    lines[1] = broken
    (facts / "currencies.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(PipelineError) as exc:
        fact_pool(facts)
    assert str(exc.value).startswith(f"{facts}: fact geography/")
    assert field in str(exc.value)
