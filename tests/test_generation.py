"""generation.py: greedy_rows calls the model with the current argument names (no deprecation
warning from our own call) and decodes as transformers' own greedy generate() does; its
per-token savings give the same answers: rows kept in the batch and read back every
CHECK_EVERY steps (the GPU way) as rows dropped at once (the CPU way), and a row's text
decoded only after a token that can complete the stop string as after every token."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

import common
import generation
import models
from helpers import write_split

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_greedy_rows_warns_of_nothing_and_matches_generate(name):
    model, tokenizer, _ = models.load_model(name, CPU)
    model.eval()
    ids = torch.tensor([common.prompt_ids(tokenizer, "User: What is the capital of France?\n"
                                                     "Assistant:")])
    mask = torch.ones_like(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad():
            ours = generation.greedy_rows(model, tokenizer, ids, mask, 12, None)
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    assert ours == [theirs[0, ids.shape[1]:].tolist()]


def test_an_adapted_model_takes_the_same_call_without_a_warning():
    model, tokenizer, _ = models.load_model("tiny-llama", CPU)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=models.target_modules(
        "all-linear"), task_type="CAUSAL_LM"))
    model.eval()
    batch = common.collate([{"input_ids": common.prompt_ids(tokenizer, p)}
                            for p in ("User: Hi\nAssistant:", "User: Who are you?\nAssistant:")],
                           tokenizer.pad_token_id, side="left")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad():
            rows = generation.greedy_rows(model, tokenizer, batch["input_ids"],
                                          batch["attention_mask"], 6, None)
    assert len(rows) == 2 and all(rows)


# --- the per-token savings -----------------------------------------------------------


def left_padded(tokenizer, prompts):
    """A left-padded batch of prompts: (input_ids, attention_mask)."""
    batch = common.collate([{"input_ids": common.prompt_ids(tokenizer, p)} for p in prompts],
                           tokenizer.pad_token_id, side="left")
    return batch["input_ids"], batch["attention_mask"]


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def random_model(request, tmp_path_factory):
    """A random tiny model, 12 prompts of varied length, and an end token and a stop string
    taken from the model's own unstopped output, so rows end at different steps."""
    model, tokenizer, _ = models.load_model(request.param, CPU)
    model.eval()
    data = write_split(tmp_path_factory.mktemp("data"))
    prompts = [r["prompt"] for r in common.load_split(data, "train")[:10]]
    prompts += ["User: Hi\nAssistant:", "User: Hello there, who are you today?\nAssistant:"]
    ids, mask = left_padded(tokenizer, prompts)
    with torch.no_grad():
        free = generation.greedy_rows(model, tokenizer, ids, mask, 16, None)
    # a token the rows make at different steps stands in for EOS; some rows never make it
    counts = {}
    for row in free:
        for token in set(row[2:]):
            counts[token] = counts.get(token, 0) + 1
    end = max(counts, key=lambda t: (0 < counts[t] < len(free), counts[t]))
    texts = [tokenizer.decode(row) for row in free]
    stop = next(text[4:7] for text in texts if len(text) > 8 and text[6].isascii()
                and not text[6].isspace())
    return model, tokenizer, ids, mask, end, stop


def run(model, tokenizer, ids, mask, stop, **kwargs):
    with torch.no_grad():
        return generation.greedy_rows(model, tokenizer, ids, mask, 20, stop, **kwargs)


def test_rows_kept_in_the_batch_give_the_rows_dropped(random_model):
    model, tokenizer, ids, mask, end, stop = random_model
    ending = SimpleNamespace(eos_token_id=end, decode=tokenizer.decode)
    for tok, stop_text in ((ending, None), (tokenizer, stop), (ending, stop)):
        dropped = run(model, tok, ids, mask, stop_text, drop_finished=True)
        kept = run(model, tok, ids, mask, stop_text, drop_finished=False)
        assert kept == dropped
        lengths = {len(row) for row in dropped}
        assert len(lengths) > 1 and max(lengths) == 20  # rows ended at different steps


def test_decoding_only_after_closers_ends_rows_where_decoding_always_does(random_model):
    model, tokenizer, ids, mask, _, stop = random_model
    for drop in (True, False):
        lazy = generation.StopCheck(tokenizer, stop)
        every = generation.StopCheck(tokenizer, stop, every_token=True)
        assert (run(model, tokenizer, ids, mask, stop, stop_check=lazy, drop_finished=drop)
                == run(model, tokenizer, ids, mask, stop, stop_check=every, drop_finished=drop))
        assert not lazy.every_token and False in lazy.closes.values()  # rows were skipped


def test_stops_ending_in_a_space_or_beyond_ascii_are_decoded_after_every_token():
    _, tokenizer, _ = models.load_model("tiny-gpt2", CPU)
    assert generation.StopCheck(tokenizer, "User: ").every_token
    assert generation.StopCheck(tokenizer, "Benutzer\u00b7").every_token
    check = generation.StopCheck(tokenizer, "\nUser:")
    row = common.prompt_ids(tokenizer, "Paris.\nUser:")
    assert check(row) and not check(row[:-1])


def test_the_batch_size_follows_the_device():
    assert generation.generation_batch_size(CPU) == 64
    assert generation.generation_batch_size("cuda") > generation.generation_batch_size(CPU)
