"""The answer-only loss: negative log-likelihood over the answer tokens, LM head there only.

Training, the learning-rate search, the validation loss and evaluate.py all
score through this module, so a question's loss is the same number everywhere:

    nll, n = answer_loss(model, **batch)                      # a training batch, summed
    nll, n = answer_loss_at(model, batch["input_ids"], *label_positions(batch["labels"]))
    total, count = answer_nll(model, examples, pad_id, device)  # held-out examples, summed
    per_example = answer_nll_by_example(model, examples, pad_id, device)
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from common import collate
from models import autocast_dtype, causal_lm, virtual_prefix


class AnswerLoss(torch.nn.Module):
    """Module form of the training loss, so DistributedDataParallel can wrap it.

    A batch that carries `positions` and `targets` (label_positions, computed on
    the host) is scored by answer_loss_at, which adds no wait for the device;
    otherwise by answer_loss, the CPU's exact path.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        # FSDP's transformer-based wrapping reads the block classes (GPT2Block,
        # LlamaDecoderLayer) from the module prepared: the model's own list.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, input_ids, attention_mask, labels, positions=None, targets=None):
        if positions is None:
            return answer_loss(self.model, input_ids, attention_mask, labels)
        return answer_loss_at(self.model, input_ids, positions, targets)


def answer_loss(model, input_ids, attention_mask, labels):
    """(summed negative log-likelihood, token count) over positions whose next token has a label.

    The projection onto the vocabulary is a large share of a small model's
    arithmetic; computing LM-head logits only at the positions that carry a
    label gives the same loss as the full computation (tests check this).
    """
    logits, targets, keep = labelled_logits(model, input_ids, attention_mask, labels)
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    return nll, keep.sum()


def labelled_logits(model, input_ids, attention_mask, labels):
    """LM-head logits at the positions whose next token has a label: (logits, labels, mask).

    The mask is batch x (length - 1); answer_loss sums over it, scoring sums per row.
    """
    lm = causal_lm(model)
    hidden = hidden_states(model, input_ids, attention_mask)
    targets = labels[:, 1:]
    keep = targets != -100
    return lm.get_output_embeddings()(hidden[:, :-1][keep]), targets[keep], keep


def hidden_states(model, input_ids, attention_mask=None):
    """The transformer's last hidden states at the tokens' own positions, batch x length x hidden.

    Prompt tuning's virtual tokens (models.virtual_prefix) go before each row, with
    the mask extended over them, and their states are dropped from what is returned:
    labels and positions keep indexing the tokens alone.
    """
    lm = causal_lm(model)
    prefix = virtual_prefix(model, input_ids.shape[0])
    if prefix is None:
        return lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=False).last_hidden_state
    embeds = lm.get_input_embeddings()(input_ids)
    embeds = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask],
                                   dim=1)
    hidden = lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask,
                           use_cache=False).last_hidden_state
    return hidden[:, prefix.shape[1]:]


def label_positions(labels: torch.Tensor, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """On the host: (flat positions, targets) of the positions whose next token has a label.

    Positions index the batch x (length - 1) grid in row order, as answer_loss's
    mask selects them.  Counted here, before the batch goes to the device, the
    number of LM-head rows is known without asking the device (a boolean mask
    there makes the host wait for the GPU in the middle of the forward pass).
    multiple > 1 pads both to a multiple of it with target -100 (no loss, no
    gradient), so compiled steps see few distinct shapes.
    """
    flat = labels[:, 1:].reshape(-1)
    positions = (flat != -100).nonzero().squeeze(1)
    targets = flat[positions]
    extra = -len(positions) % multiple
    if extra:
        positions = torch.cat([positions, positions.new_zeros(extra)])
        targets = torch.cat([targets, targets.new_full((extra,), -100)])
    return positions, targets


class RightPaddedWithoutMask(logging.Filter):
    """Drop transformers' advice to pass an attention mask: answer_loss_at leaves it out on
    purpose (causal attention over right padding), and every other caller passes one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(RightPaddedWithoutMask())


def answer_loss_at(model, input_ids, positions, targets):
    """answer_loss without our wait for the device: label positions come from the host.

    The batch must be right-padded (common.collate's default): causal attention
    then keeps every real token from seeing the padding after it, so no
    attention mask is passed, and the model runs plain causal attention with no
    mask to inspect.  The loss equals answer_loss's up to float rounding (tests
    check it); every shape follows from the inputs' shapes, so torch.compile and
    CUDA graphs can capture the whole forward pass.  Uncompiled, transformers
    still reads one value per forward (its check for packed sequences, and on
    GPT-2 with a pad id its padding warning); compiled, it skips both.
    """
    lm = causal_lm(model)
    hidden = hidden_states(model, input_ids)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)
    logits = lm.get_output_embeddings()(rows)
    nll = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    return nll, (targets != -100).sum()


# score(logits, targets, keep) -> what one batch contributes (its rows are keep's rows)
Score = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]


def score_batches(model, examples: list[dict], pad_id: int, device, score: Score,
                  batch_size: int = 32, desc: str | None = None,
                  precision: str = "fp32") -> list[tuple[list[int], object]]:
    """The evaluation loop: (example indices, score(...)) per batch, in eval mode without gradients.

    Batches hold examples of similar length (less padding); precision "bf16"
    runs the model under bf16 autocast (models.autocast_dtype).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    dtype = autocast_dtype(device, precision)
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None,
                          leave=False):
            idx = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits, targets, keep = labelled_logits(model, **batch)
            out.append((idx, score(logits, targets, keep)))
    model.train(was_training)
    return out


def batch_total(logits, targets, keep) -> tuple[float, int]:
    """A batch's summed NLL and token count, summed as answer_loss sums a training batch."""
    return float(F.cross_entropy(logits.float(), targets, reduction="sum")), int(keep.sum())


def row_totals(logits, targets, keep) -> list[tuple[float, int]]:
    """Each row's summed NLL (in float64) and token count."""
    nll = F.cross_entropy(logits.float(), targets, reduction="none")
    sums = torch.zeros(keep.shape[0], dtype=torch.float64, device=nll.device)
    sums.index_add_(0, keep.nonzero()[:, 0], nll.double())
    return list(zip(sums.tolist(), keep.sum(dim=1).tolist()))


def answer_nll(model, examples: list[dict], pad_id: int, device, batch_size: int = 32,
               desc: str | None = None, precision: str = "fp32") -> tuple[float, int]:
    """Summed NLL and token count over the answer tokens of examples, in eval mode.

    The sum of answer_nll_by_example's rows up to float rounding: each batch is
    summed in one float32 reduction, as a training step sums its loss.
    """
    batches = score_batches(model, examples, pad_id, device, batch_total, batch_size, desc,
                            precision)
    return sum(nll for _, (nll, _) in batches), sum(n for _, (_, n) in batches)


def answer_nll_by_example(model, examples: list[dict], pad_id: int, device,
                          batch_size: int = 32, desc: str | None = None,
                          precision: str = "fp32") -> list[tuple[float, int]]:
    """(summed NLL, token count) over each example's labelled answer tokens, in eval mode.

    Per example, so intervals can resample questions; the LM head runs only at
    labelled positions, as in training.
    """
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for idx, rows in score_batches(model, examples, pad_id, device, row_totals, batch_size, desc,
                                   precision):
        for i, row in zip(idx, rows):
            out[i] = row
    return out
