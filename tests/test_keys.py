"""Key matching (common.key_match) and derived keys (format_dataset.derive_key)."""

import shutil

import pytest

import common
import format_dataset
import generate_dataset

# --- Every generated answer satisfies its own key -----------------------------


def pool_rows():
    """(question, answer, key) for every wording of every fact generate_dataset can make."""
    return [(question, fact.answer, fact.key)
            for facts in generate_dataset.fact_pool().values()
            for fact in facts for question in fact.questions]


def test_every_generated_answer_satisfies_its_key():
    rows = pool_rows()
    categories = {fact.category for facts in generate_dataset.fact_pool().values() for fact in facts}
    assert categories == set(generate_dataset.CATEGORIES) and len(rows) > 5000
    failing = [row for row in rows if not common.key_match(row[1], row[2], row[0])]
    assert failing == []


# --- key_match's rules, both directions --------------------------------------


def test_key_the_question_contains_needs_more_than_the_echo():
    question = "What is Earth's moon called?"
    assert not common.key_match("Earth's moon is Earth.", "Moon", question)
    assert not common.key_match("What is Earth's moon called?", "Moon", question)
    assert common.key_match("It is called the Moon.", "Moon", question)
    assert common.key_match("The Moon.", "Moon", question)
    assert common.key_match("Nice to meet you too!", "Nice to meet you", "Nice to meet you.")
    assert not common.key_match("It is nice to meet you.", "Nice to meet you", "It is nice to meet you.")


def test_numeric_key_is_the_stated_result():
    question = "What is 100 divided by 5?"
    assert not common.key_match("100mm / 20mm = 0.5cm. The answer is: 0.5", "20", question)
    assert common.key_match("100 divided by 5 is 20.", "20", question)
    assert not common.key_match("It is 20, no, 25.", "20", question)
    assert not common.key_match("20 or so, say 21", "20")
    assert common.key_match("There are 120 minutes in 2 hours.", "120",
                            "How many minutes are in 2 hours?")
    assert not common.key_match("There are 120 minutes in 2 hours.", "60",
                                "How many minutes are in 2 hours?")
    assert common.key_match("It is 5.0.", "5")


@pytest.mark.parametrize("symbol", ["I", "He", "Be"])
def test_short_symbols_only_as_the_answer(symbol):
    assert common.key_match(f"The symbol is {symbol}.", symbol)
    assert common.key_match(symbol, symbol)
    assert common.key_match(f"Its symbol ({symbol}) is short.", symbol)
    assert not common.key_match(f"{symbol} do not know.", symbol)
    assert not common.key_match("I do not know. He does not either. Be patient.", symbol)


def test_plurals_and_unit_forms_count_alike():
    for prediction in ("joules", "joule", "joules (J)", "It is measured in joules."):
        for key in ("joule", "joules", "joules (J)"):
            assert common.key_match(prediction, key), (prediction, key)
    assert not common.key_match("watts", "joules (J)")
    assert common.key_match("Twelve inches.", "inch")


def test_yes_and_no_open_or_end_the_reply():
    assert common.key_match("No, most birds fly.", "No")
    assert common.key_match("The opposite of yes is no.", "no")
    assert not common.key_match("I have no idea.", "no")
    assert not common.key_match("Yes, they all do.", "No")


# --- Derived keys ---------------------------------------------------------------

# Keys the old derivation got wrong: "our solar system", "has eight", "than", "thing",
# "equals 4", "No, most".
CATALOGUE = [
    ("What is the largest planet?", "Jupiter is the largest planet in our solar system.", {"Jupiter"}),
    ("How many legs does a spider have?", "A spider has eight legs.", {"eight", "eight legs"}),
    ("Which is bigger, the Sun or the Moon?", "The Sun is bigger than the Moon.",
     {"The Sun is bigger than the Moon", "Sun is bigger"}),
    ("What is item 7?", "Item 7 is thing 7.", {"thing 7"}),
    ("What is 2 + 2?", "2 + 2 equals 4.", {"4"}),
    ("Do all birds fly?", "No, most birds fly but penguins cannot.", {"No"}),
]
# Cases in the style of public Q&A sets.
MORE = [
    # trivia
    ("What is the capital of Italy?", "The capital of Italy is Rome.", {"Rome"}),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.", {"William Shakespeare"}),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci.", {"Leonardo da Vinci", "Leonardo"}),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa.", {"Nile"}),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest.", {"Pacific Ocean", "Pacific"}),
    ("In which year did World War II end?", "World War II ended in 1945.", {"1945"}),
    ("What is the currency of the United Kingdom?", "The currency of the United Kingdom is the pound sterling.", {"pound sterling"}),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain on Earth.", {"Mount Everest"}),
    # science
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", {"Au"}),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air.", {"carbon dioxide"}),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius.", {"100 degrees Celsius"}),
    ("How many bones are in the adult human body?", "The adult human body has 206 bones.", {"206"}),
    ("What planet is known as the Red Planet?", "Mars is known as the Red Planet.", {"Mars"}),
    ("What is the speed of light?", "The speed of light is about 300,000 kilometres per second.", {"300,000 kilometres per second"}),
    ("What is the SI unit of energy?", "The SI unit of energy is the joule.", {"joule"}),
    ("How many chambers does the human heart have?", "The human heart has four chambers.", {"four", "four chambers"}),
    # arithmetic
    ("What is 12 times 12?", "12 times 12 is 144.", {"144"}),
    ("What is 100 divided by 4?", "100 divided by 4 equals 25.", {"25"}),
    ("What is 15 minus 20?", "15 minus 20 is -5.", {"-5"}),
    ("What is 7 plus 8?", "The answer is 15.", {"15"}),
    ("What is half of 9?", "Half of 9 is 4.5.", {"4.5"}),
    # unit conversion
    ("How many metres are in a kilometre?", "There are 1000 metres in a kilometre.", {"1000"}),
    ("How many centimetres are in 2 metres?", "2 metres is 200 centimetres.", {"200"}),
    ("What is 0 degrees Celsius in Fahrenheit?", "0 degrees Celsius is 32 degrees Fahrenheit.", {"32"}),
    ("How many grams are in 3 kilograms?", "3 kilograms equals 3000 grams.", {"3000"}),
    ("How many minutes are in 2 hours?", "There are 120 minutes in 2 hours.", {"120"}),
    # small talk
    ("Hello!", "Hello! How can I help you today?", {"How can I help you today", "I help you today", "help you today"}),
    ("Can you help me?", "Yes, I can help you.", {"Yes"}),
    ("Are you a human?", "No, I am an AI assistant.", {"No"}),
    ("Thank you!", "You are welcome!", {"You are welcome", "welcome"}),
    # definitions
    ("What is photosynthesis?", "Photosynthesis is the process by which plants turn light into food.",
     {"plants turn light into food", "process"}),
    ("What does a thermometer measure?", "A thermometer measures temperature.", {"temperature"}),
    ("What is a noun?", "A noun is a word that names a person, place or thing.",
     {"names a person, place or thing", "person, place"}),
    ("What is the plural of mouse?", "The plural of mouse is mice.", {"mice"}),
    ("What is the opposite of hot?", "The opposite of hot is cold.", {"cold"}),
]


@pytest.mark.parametrize("question, answer, acceptable", CATALOGUE + MORE)
def test_derived_key_is_the_answer_part(question, answer, acceptable):
    """The derived key is an acceptable key, lies in the answer, and the answer satisfies it."""
    key = format_dataset.derive_key(question, answer)
    assert key in acceptable
    assert key in answer
    assert common.key_match(answer, key, question)


def test_enough_derived_cases():
    assert len(MORE) >= 30


# --- Bad fact tables stop generation with one line ------------------------------


@pytest.mark.parametrize("broken, field", [
    ("Japan,Japanese yen,euro", "field key 'euro' is not in its answer"),
    ("Japan,Japanese yen,Japan", "does not give field key 'Japan'"),
])
def test_bad_fact_key_is_a_pipeline_error(tmp_path, broken, field):
    """A key the answer lacks, or gives only as an echo of the question, names the fact."""
    facts = tmp_path / "facts"
    shutil.copytree(generate_dataset.FACTS_DIR, facts)
    lines = (facts / "currencies.csv").read_text(encoding="utf-8").splitlines()
    lines[1] = broken
    (facts / "currencies.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(common.PipelineError) as exc:
        generate_dataset.fact_pool(facts)
    assert str(exc.value).startswith(f"{facts}: fact geography/")
    assert field in str(exc.value)
