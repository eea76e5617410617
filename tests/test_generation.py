"""generation.greedy_rows calls the model with the current argument names (no deprecation
warning from our own call) and decodes as transformers' own greedy generate() does."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

import common
import generation
import models

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
