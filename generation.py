"""Batched greedy answers: what evaluate.py and the learning-rate search decode.

The search and evaluate.py both answer through generate_answers, so a question
is answered the same way everywhere (the loss lives in answer_loss.py):

    answers = generate_answers(model, tokenizer, prompts, max_new, device, stop="User:")
"""

from __future__ import annotations

import torch

from common import collate, prompt_ids
from models import autocast_dtype, causal_lm, virtual_prefix


def max_new_tokens_for(tokenizer, references: list[str]) -> int:
    """A bound on generated tokens from the longest reference: 1.5x its length plus EOS."""
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references)
    return int(longest * 1.5) + 2


# Rows per generation batch.  On the CPU a step's cost grows with its rows (64: the size
# tuned there).  A CUDA decoding step of a small model is bound by kernel launches rather
# than rows, so there a batch holds more rows, and an evaluation set takes fewer steps.
BATCH_BY_DEVICE = {"cpu": 64, "cuda": 256}
# Where rows stay in the batch (CUDA), read the new tokens back every this many steps: one
# host-device sync per CHECK_EVERY tokens instead of one per token, for at most
# CHECK_EVERY - 1 wasted steps after the last row ends.
CHECK_EVERY = 8


def generation_batch_size(device) -> int:
    """The default rows per generation batch on this device (BATCH_BY_DEVICE)."""
    return BATCH_BY_DEVICE.get(torch.device(device).type, BATCH_BY_DEVICE["cpu"])


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, device,
                     stop: str | None = None, batch_size: int | None = None,
                     desc: str | None = None, shrink: bool = True,
                     precision: str = "fp32") -> list[str]:
    """Greedy answers for prompts, in batches, each stopping at EOS or at a new turn (stop).

    Prompts are left-padded so every continuation starts right after its own
    prompt; batches hold prompts of similar length, and results come back in
    the original order.  The same settings are used for every model.  With
    shrink (the default) greedy_rows decodes: on the CPU a row leaves the batch as
    soon as its answer ends.  shrink=False runs transformers' generate(), which
    computes every row until the batch's last answer ends: the same answers, more
    work.  batch_size None: generation_batch_size(device).
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    config = None if shrink else GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        stop_strings=[stop] if stop else None)
    batch_size = batch_size or generation_batch_size(device)
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


class StopCheck:
    """Whether a row's text holds stop, decoding the row only after a token that can complete it.

    Text that did not hold stop comes to hold it only once the character that ends
    it arrives, and that character comes with the newest token; so the row needs
    decoding only after a token whose own text holds that character (each token's
    text is decoded once, when first met).  every_token=True decodes the row after
    every token, as does a stop whose last character is not plain ASCII (it may
    arrive split over byte tokens) or is a space (decoders drop or add spaces).
    """

    def __init__(self, tokenizer, stop: str, every_token: bool = False):
        self.tokenizer, self.stop = tokenizer, stop
        self.every_token = every_token or not stop[-1].isascii() or stop[-1].isspace()
        self.closes: dict[int, bool] = {}

    def __call__(self, row: list[int]) -> bool:
        token = row[-1]
        if not self.every_token:
            if token not in self.closes:
                self.closes[token] = self.stop[-1] in self.tokenizer.decode([token])
            if not self.closes[token]:
                return False
        return self.stop in self.tokenizer.decode(row)


def greedy_rows(model, tokenizer, input_ids, attention_mask, max_new_tokens: int,
                stop: str | None, drop_finished: bool | None = None,
                stop_check: StopCheck | None = None) -> list[list[int]]:
    """Greedy continuations of a left-padded batch; each row ends at EOS or once its text holds
    stop, as generate() ends it.

    drop_finished (default: on the CPU only): the key/value cache, mask and
    positions of finished rows are dropped and every token is read at once, so
    each later step computes only the answers still running (on a CPU a step's
    cost grows with the rows in it).  Elsewhere every row stays in the batch and
    new tokens are read back every CHECK_EVERY steps: re-indexing the cache and
    reading each token would stall the GPU at every step; tokens a row makes
    after its end are dropped, so the answers are the same.  stop_check: how stop
    is looked for (default StopCheck(tokenizer, stop)).  Positions follow the attention mask, as generate() computes
    them for left-padded rows.
    """
    from transformers import DynamicCache

    if drop_finished is None:
        drop_finished = input_ids.device.type == "cpu"
    check_every = 1 if drop_finished else CHECK_EVERY
    if stop and stop_check is None:
        stop_check = StopCheck(tokenizer, stop)
    eos = tokenizer.eos_token_id
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    active = list(range(input_ids.shape[0]))  # the rows in the batch, in batch order
    running = set(active)  # the rows whose answer has not ended
    mask = attention_mask
    lm = causal_lm(model)
    prefix = virtual_prefix(model, input_ids.shape[0])
    if prefix is not None:  # prompt tuning: its virtual tokens stand before the left padding
        mask = torch.cat([mask.new_ones(prefix.shape[:2]), mask], dim=1)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache(config=lm.config)
    ids, pending = input_ids, []
    for step in range(max_new_tokens):
        if prefix is not None and step == 0:  # the prefix enters the cache once, with the prompt
            embeds = lm.get_input_embeddings()(ids)
            logits = lm(inputs_embeds=torch.cat([prefix.to(embeds.dtype), embeds], dim=1),
                        attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True, logits_to_keep=1).logits
        else:
            logits = (lm if prefix is not None else model)(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1).logits
        tokens = logits[:, -1].argmax(-1)
        pending.append(tokens)
        if len(pending) == check_every or step == max_new_tokens - 1:
            new = torch.stack(pending, dim=1).tolist()  # the one read back to the host
            pending = []
            for row, row_tokens in zip(active, new):
                if row in running and not extend_until_end(out[row], row_tokens, eos,
                                                           stop_check):
                    running.discard(row)
            if not running:
                break
            if drop_finished and len(running) < len(active):
                keep = [j for j, row in enumerate(active) if row in running]
                chosen = torch.tensor(keep, device=input_ids.device)
                cache.batch_select_indices(chosen)
                mask, positions, tokens = mask[chosen], positions[chosen], tokens[chosen]
                active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        positions = positions[:, -1:] + 1
        ids = tokens[:, None]
    return out


def extend_until_end(out: list[int], tokens: list[int], eos: int,
                     stop_check: StopCheck | None) -> bool:
    """Append tokens to a row's answer up to its end (EOS, or stop_check finding the stop string);
    whether it is still running."""
    for token in tokens:
        out.append(token)
        if token == eos or (stop_check is not None and stop_check(out)):
            return False
    return True


def clean_answer(text: str, stop: str | None) -> str:
    """Cut a generated continuation at the start of a new turn and trim it."""
    if stop:
        for marker in (stop, stop.strip()):
            text = text.split(marker)[0]
    return text.strip()


