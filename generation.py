"""Batched greedy answers: what evaluate.py and the learning-rate search decode.

The search and evaluate.py both answer through generate_answers, so a question
is answered the same way everywhere (the loss lives in answer_loss.py):

    answers = generate_answers(model, tokenizer, prompts, max_new, device, stop="User:")
"""

from __future__ import annotations

import torch

from common import collate, prompt_ids
from models import autocast_dtype, causal_lm


def max_new_tokens_for(tokenizer, references: list[str]) -> int:
    """A bound on generated tokens from the longest reference: 1.5x its length plus EOS."""
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references)
    return int(longest * 1.5) + 2


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, device,
                     stop: str | None = None, batch_size: int = 64, desc: str | None = None,
                     shrink: bool = True, precision: str = "fp32") -> list[str]:
    """Greedy answers for prompts, in batches, each stopping at EOS or at a new turn (stop).

    Prompts are left-padded so every continuation starts right after its own
    prompt; batches hold prompts of similar length, and results come back in
    the original order.  The same settings are used for every model.  With
    shrink (the default) a row leaves the batch as soon as its answer ends
    (greedy_rows); shrink=False runs transformers' generate(), which computes
    every row until the batch's last answer ends: the same answers, more work.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    config = None if shrink else GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        stop_strings=[stop] if stop else None)
    encoded = [{"input_ids": prompt_ids(tokenizer, p)} for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]["input_ids"]))
    answers: list[str] = [""] * len(prompts)
    model.eval()
    dtype = autocast_dtype(device, precision)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None,
                      leave=False):
        idx = order[start:start + batch_size]
        batch = collate([encoded[i] for i in idx], tokenizer.pad_token_id, side="left")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if shrink:
                rows = greedy_rows(model, tokenizer, ids, mask, max_new_tokens, stop)
            else:
                out = model.generate(input_ids=ids, attention_mask=mask,
                                     generation_config=config, tokenizer=tokenizer)
                rows = out[:, ids.shape[1]:].tolist()
        for row, i in zip(rows, idx):
            answers[i] = clean_answer(tokenizer.decode(row, skip_special_tokens=True), stop)
    return answers


def greedy_rows(model, tokenizer, input_ids, attention_mask, max_new_tokens: int,
                stop: str | None) -> list[list[int]]:
    """Greedy continuations of a left-padded batch; a row leaves the batch once it has ended.

    A row ends at EOS or once its text holds stop, as generate() ends it.  The
    key/value cache, mask and positions of finished rows are dropped, so each
    later step computes only the answers still running: on a CPU a step's cost
    grows with the rows in it.  Positions follow the attention mask, as
    generate() computes them for left-padded rows.
    """
    from transformers import DynamicCache

    eos = tokenizer.eos_token_id
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    active = list(range(input_ids.shape[0]))
    mask = attention_mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache(config=causal_lm(model).config)
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        tokens = logits[:, -1].argmax(-1).tolist()
        keep = []
        for j, (row, token) in enumerate(zip(active, tokens)):
            out[row].append(token)
            ended = token == eos or (stop and stop in tokenizer.decode(out[row]))
            if not ended:
                keep.append(j)
        if not keep:
            break
        step = torch.tensor([[tokens[j]] for j in keep], device=input_ids.device)
        if len(keep) < len(active):
            chosen = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(chosen)
            mask, positions = mask[chosen], positions[chosen]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        positions = positions[:, -1:] + 1
        ids = step
    return out


def clean_answer(text: str, stop: str | None) -> str:
    """Cut a generated continuation at the start of a new turn and trim it."""
    if stop:
        for marker in (stop, stop.strip()):
            text = text.split(marker)[0]
    return text.strip()


