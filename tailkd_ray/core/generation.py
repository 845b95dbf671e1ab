r"""Task accuracy from generated text (DESIGN §7): greedy decoding, final-answer exact match and ROUGE-L.

    greedy_decode     prompts (token ids) -> completions (token ids): batches of prompts left-padded, one argmax
                      token per step from the model's KV cache, until EOS or ``max_new_tokens``
    extract_answer    the final answer a regex captures in a text, normalised
    score_example     one completion against its reference: the answers, exact match, ROUGE-L
    summarize_scores  the examples' scores -> ``exact_match``, ``rouge_l`` and the counts behind them

Exact match compares the final answers: the first match of ``answer_regex`` (its first group, or the whole match
when it has none) in the reference and in the completion, each normalised (surrounding whitespace and thousands
commas removed, a number written in its plain shortest form: ``1,000.50`` and ``1000.5`` are equal). It is the
fraction of examples whose reference holds an answer; a completion without one is wrong (and counted). ROUGE-L
is Google's ``rouge-score`` (the F-measure of the longest common subsequence of words, lowercased, without
stemming) of the whole completion against the whole reference; a text of no ASCII letter or digit has no words for
it and scores 0.

Pure torch: the model is any causal LM taking ``input_ids``, ``attention_mask``, ``position_ids``, its KV cache,
``use_cache`` and ``logits_to_keep`` and returning ``.logits`` and the cache (every Hugging Face ``*ForCausalLM``;
the cache is ``cache`` since transformers 5, ``past_key_values`` before). The decoding is greedy over all of the model's logit rows, its own
generation config (sampling, penalties, forced tokens) set aside: the metrics measure the model's argmax.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable, Optional, Sequence

import torch


@dataclass(frozen=True)
class Completion:
    """A decoded completion: its ids (without the EOS that ended it) and whether an EOS ended it (else the
    ``max_new_tokens`` limit did)."""

    ids: list[int]
    stopped_at_eos: bool


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  eos_ids: Sequence[int], pad_id: int, batch_size: int,
                  on_batch: Optional[Callable[[int], None]] = None) -> list[Completion]:
    """The greedy completion of every prompt (lists of token ids), in the prompts' order.

    Prompts are decoded ``batch_size`` at a time, longest first (similar lengths share a batch: less padding),
    left-padded with ``pad_id`` under an attention mask and position ids that start at each prompt's first token,
    so a prompt's completion is the one it gets alone. ``on_batch(n)`` is called after each batch with the number
    of prompts it finished.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_decode: every prompt needs at least one token")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    completions: list[Optional[Completion]] = [None] * len(prompts)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        for index, completion in zip(members, _decode_batch(model, [prompts[i] for i in members], max_new_tokens,
                                                             eos, pad_id, device)):
            completions[index] = completion
        if on_batch is not None:
            on_batch(len(members))
    return completions


def _decode_batch(model, prompts: list, max_new_tokens: int, eos: torch.Tensor, pad_id: int,
                  device: torch.device) -> list[Completion]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    generated = torch.empty((len(prompts), 0), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = None
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{cache_name: cache})
        cache = getattr(out, cache_name)
        token = out.logits[:, -1].argmax(-1).masked_fill_(finished, pad_id)
        generated = torch.cat([generated, token[:, None]], dim=1)
        finished |= torch.isin(token, eos)
        if bool(finished.all()):
            break
        ids, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    stops, completions = set(eos.tolist()), []
    for row in generated.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        completions.append(Completion(ids=row if end is None else row[:end], stopped_at_eos=end is not None))
    return completions


def extract_answer(text: str, pattern: re.Pattern) -> Optional[str]:
    """The normalised final answer ``pattern`` finds in ``text`` (its first match), None when there is none."""
    match = pattern.search(text)
    if match is None:
        return None
    answer = (match.group(1) if pattern.groups else match.group(0)).strip()
    try:
        number = Decimal(answer.replace(",", ""))
    except InvalidOperation:
        return answer
    return format(number.normalize(), "f") if number.is_finite() else answer


@functools.cache
def _rouge_l():
    from rouge_score.rouge_scorer import RougeScorer  # deferred: it imports nltk (seconds); only tailkd eval needs it

    return RougeScorer(["rougeL"], use_stemmer=False)


def score_example(completion: str, reference: str, pattern: re.Pattern) -> dict:
    """``answer`` and ``reference_answer`` (normalised, or None), ``exact_match`` (None when the reference has no
    answer) and ``rouge_l`` of one completion."""
    answer, wanted = extract_answer(completion, pattern), extract_answer(reference, pattern)
    return {"answer": answer, "reference_answer": wanted, "exact_match": None if wanted is None else answer == wanted,
            "rouge_l": _rouge_l().score(reference, completion)["rougeL"].fmeasure}


def summarize_scores(scores: Sequence[dict], completions: Sequence[Completion]) -> dict:
    """The metrics of ``score_example`` results and their completions: ``exact_match`` (over the examples whose
    reference has an answer; None when none has), ``rouge_l`` (mean), and the counts ``examples``,
    ``with_answer`` (references holding an answer), ``no_answer`` (of those, completions without one) and
    ``hit_max_new_tokens`` (completions the limit cut, not an EOS)."""
    judged = [s for s in scores if s["exact_match"] is not None]
    return {
        "exact_match": sum(s["exact_match"] for s in judged) / len(judged) if judged else None,
        "rouge_l": math.fsum(s["rouge_l"] for s in scores) / len(scores) if scores else None,
        "examples": len(scores),
        "with_answer": len(judged),
        "no_answer": sum(s["answer"] is None for s in judged),
        "hit_max_new_tokens": sum(not c.stopped_at_eos for c in completions),
    }
