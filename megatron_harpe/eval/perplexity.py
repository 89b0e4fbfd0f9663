"""Perplexity as the context grows: sliding windows with a fixed stride (256), as in transformers' perplexity guide.

For a context length ``L``, windows of up to ``L`` tokens end every ``stride`` tokens; each window scores only the
tokens not scored before, so every token (after the first) is predicted from up to ``L`` tokens of context.
"""

from __future__ import annotations

import math

import torch

from megatron_harpe.eval.model import EvalModel


@torch.no_grad()
def sliding_window_perplexity(model: EvalModel, ids: list[int], context_length: int, stride: int = 256) -> float:
    if len(ids) < 2:
        raise ValueError("the text is too short to score: give at least two tokens")
    tokens = torch.tensor(ids, device=model.device)
    nll, scored, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context_length, len(ids))
        window = tokens[begin:end][None]
        labels = window.clone()
        new = end - previous_end
        labels[:, :-new] = -100  # already scored by an earlier window
        count = int((labels[:, 1:] != -100).sum())
        if count:
            loss = model.model(window, labels=labels).loss
            nll += float(loss) * count
            scored += count
        previous_end = end
        if end == len(ids):
            break
    return math.exp(nll / scored)
