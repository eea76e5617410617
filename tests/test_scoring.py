"""scoring.py: the text metrics against hand-computed values, and the records they make."""

import math

import pytest

import scoring

# --- Metrics against hand-computed values ------------------------------------


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert scoring.normalize_answer("  The capital of France is PARIS! ") == "capital of france is paris"
    assert scoring.normalize_answer("An apple, a day.") == "apple day"


def test_exact_match_after_normalisation():
    assert scoring.exact_match("the capital of France is Paris.", "The capital of France is Paris")
    assert not scoring.exact_match("Paris", "The capital of France is Paris.")


def test_numbers_keep_their_punctuation():
    assert scoring.normalize_answer("It is 4.5 km.") == "it is 4.5 km"
    assert not scoring.exact_match("4.5", "45")
    assert not scoring.key_match("It is 40 degrees.", "-40")
    assert scoring.key_match("It is -40 degrees.", "-40")
    assert not scoring.key_match("It is 45.", "4.5")
    assert scoring.key_match("About 1,000 metres.", "1000")
    assert scoring.key_match("It is 9.", "9")  # a sentence's full stop is not a decimal point


def test_key_match_keeps_articles_and_whole_keys():
    assert not scoring.key_match("Vitamin B", "Vitamin A")
    assert scoring.key_match("It is vitamin A.", "Vitamin A")
    assert not scoring.key_match("The Canadian dollar.", "US dollar")
    assert scoring.key_match("The currency is the US dollar.", "US dollar")


def test_short_symbol_keys_match_case_and_whole_words():
    assert not scoring.key_match("Earth's core is hot.", "S")
    assert scoring.key_match("Its symbol is S.", "S")
    assert not scoring.key_match("It is measured in SI units.", "Si")
    assert scoring.key_match("The symbol of silicon is Si.", "Si")
    assert not scoring.key_match("It may be so.", "Be")
    assert scoring.key_match("Paris", "paris")  # longer keys ignore case


def test_key_match_is_not_satisfied_by_echoing_the_question():
    question = "What is 8 times 1?"
    assert not scoring.key_match("8 times 1 equals 9.", "8", question)
    assert scoring.key_match("8 times 1 equals 8.", "8", question)
    assert scoring.key_match("8", "8", question)
    assert scoring.key_match("The answer is 8.", "8", question)
    assert not scoring.key_match("What is 8 times 1? I do not know.", "8", question)
    # the question need not be worded like the answer: the operand is still not the answer
    assert not scoring.key_match("8 times 1 equals 9.", "8", "Calculate 8 * 1.")
    assert scoring.key_match("8 times 1 equals 8.", "8", "Calculate 8 * 1.")
    assert scoring.key_match("It is 8.", "8", "Calculate 8 * 1.")
    assert not scoring.key_match("8 minus 8 is 8.", "0", "What is 8 minus 8?")
    assert scoring.key_match("8 minus 8 is 0.", "0", "What is 8 minus 8?")
    # a numeric key is the stated result, the last number, with or without the question
    assert not scoring.key_match("8 times 1 equals 9.", "8")


def test_key_match_needs_whole_words():
    assert scoring.key_match("The capital of France is Paris.", "Paris")
    assert scoring.key_match("It is 12.", "12")
    assert not scoring.key_match("It is 120.", "12")
    assert not scoring.key_match("Parisian food", "Paris")
    assert scoring.key_match("It is artificial intelligence.", "Artificial Intelligence")
    assert not scoring.key_match("anything", "")


def test_token_f1_by_hand():
    # "cat sat" vs "cat sat down": precision 2/2, recall 2/3, F1 = 0.8
    assert scoring.token_f1("The cat sat", "the cat sat down") == pytest.approx(0.8)
    assert scoring.token_f1("dog", "cat") == 0.0
    assert scoring.token_f1("", "") == 1.0
    assert scoring.token_f1("x b b", "b b c") == pytest.approx(2 / 3)  # 2 of 3 each way


def test_perplexity_is_exp_of_mean_token_loss():
    assert scoring.perplexity(3 * math.log(4), 3) == pytest.approx(4.0)
    assert math.isnan(scoring.perplexity(0.0, 0))


def test_score_rows_and_summarise_by_hand():
    rows = [{"prompt": "User: Capital of France?\nAssistant:", "completion": " Paris.",
             "question": "Capital of France?", "answer": "Paris.", "key": "Paris",
             "category": "geography", "group": "france"},
            {"prompt": "User: 2 + 2?\nAssistant:", "completion": " 4", "question": "2 + 2?"}]
    records = scoring.score_rows(rows, ["It is Paris.", "4"])
    assert records[0]["exact_match"] is False and records[0]["key_match"] is True
    assert records[0]["token_f1"] == 0.5  # precision 1/3 (it, is, paris), recall 1
    assert records[0]["category"] == "geography" and records[0]["group"] == "france"
    assert "key" not in records[1] and records[1]["exact_match"] is True
    summary = scoring.summarise(records)
    assert summary == {"n": 2, "exact_match": 50.0, "token_f1": pytest.approx(
        100 * (records[0]["token_f1"] + 1.0) / 2), "key_accuracy": 100.0, "keyed": 1}
    assert scoring.quality_key([summary]) == ("key_accuracy", "key_match",
                                              "key-answer accuracy (1 of 2 questions have keys)")
    assert scoring.quality_key([{**summary, "key_accuracy": None}])[0] == "token_f1"


def test_run_perplexity_pools_tokens_over_questions():
    records = [{"answer_nll": 2 * math.log(3), "answer_tokens": 2},
               {"answer_nll": 0.0, "answer_tokens": 0}]
    assert scoring.run_perplexity(records) == pytest.approx(3.0)

# --- key_match's rules, both directions --------------------------------------


def test_key_the_question_contains_needs_more_than_the_echo():
    question = "What is Earth's moon called?"
    assert not scoring.key_match("Earth's moon is Earth.", "Moon", question)
    assert not scoring.key_match("What is Earth's moon called?", "Moon", question)
    assert scoring.key_match("It is called the Moon.", "Moon", question)
    assert scoring.key_match("The Moon.", "Moon", question)
    assert scoring.key_match("Nice to meet you too!", "Nice to meet you", "Nice to meet you.")
    assert not scoring.key_match("It is nice to meet you.", "Nice to meet you", "It is nice to meet you.")


def test_numeric_key_is_the_stated_result():
    question = "What is 100 divided by 5?"
    assert not scoring.key_match("100mm / 20mm = 0.5cm. The answer is: 0.5", "20", question)
    assert scoring.key_match("100 divided by 5 is 20.", "20", question)
    assert not scoring.key_match("It is 20, no, 25.", "20", question)
    assert not scoring.key_match("20 or so, say 21", "20")
    assert scoring.key_match("There are 120 minutes in 2 hours.", "120",
                            "How many minutes are in 2 hours?")
    assert not scoring.key_match("There are 120 minutes in 2 hours.", "60",
                                "How many minutes are in 2 hours?")
    assert scoring.key_match("It is 5.0.", "5")


@pytest.mark.parametrize("symbol", ["I", "He", "Be"])
def test_short_symbols_only_as_the_answer(symbol):
    assert scoring.key_match(f"The symbol is {symbol}.", symbol)
    assert scoring.key_match(symbol, symbol)
    assert scoring.key_match(f"Its symbol ({symbol}) is short.", symbol)
    assert not scoring.key_match(f"{symbol} do not know.", symbol)
    assert not scoring.key_match("I do not know. He does not either. Be patient.", symbol)


def test_plurals_and_unit_forms_count_alike():
    for prediction in ("joules", "joule", "joules (J)", "It is measured in joules."):
        for key in ("joule", "joules", "joules (J)"):
            assert scoring.key_match(prediction, key), (prediction, key)
    assert not scoring.key_match("watts", "joules (J)")
    assert scoring.key_match("Twelve inches.", "inch")


def test_yes_and_no_open_or_end_the_reply():
    assert scoring.key_match("No, most birds fly.", "No")
    assert scoring.key_match("The opposite of yes is no.", "no")
    assert not scoring.key_match("I have no idea.", "no")
    assert not scoring.key_match("Yes, they all do.", "No")
