"""Key matching (common.key_match): when a reply counts as giving the key.

Derived keys are format_dataset's and tested in test_format_dataset.py; the generated
facts' keys are generate_dataset's and tested in test_generate_dataset.py.
"""

import pytest

import common

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
