"""How close a compressed sentence-embedding model stays to its original (no LM head, no perplexity).

Both models embed the same sentences; we compare the mean-pooled embeddings (the pooling of
sentence-transformers models such as all-MiniLM-L6-v2) by cosine similarity, and the final hidden
states by relative error over the real (unpadded) tokens. The original's outputs are kept on the CPU
so that only one model need be on the device at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..core.pooling import mean_pooled

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_WORDS = 4


@dataclass
class SentenceBatch:
    """Tokenized sentences, padded to the longest in each batch."""

    input_ids: list[torch.Tensor]
    attention_mask: list[torch.Tensor]

    @property
    def tokens(self) -> int:
        return int(sum(mask.sum() for mask in self.attention_mask))

    @property
    def sentences(self) -> int:
        return sum(ids.shape[0] for ids in self.input_ids)


@dataclass
class EmbeddingOutputs:
    """One model's pooled embeddings (sentences, hidden) and its real tokens' final hidden states."""

    pooled: torch.Tensor
    hidden: torch.Tensor


def split_sentences(text: str) -> list[str]:
    """Sentences of at least MIN_WORDS words, one per line of the text's paragraphs."""
    sentences = []
    for paragraph in text.splitlines():
        sentences += [s.strip() for s in SENTENCE_END.split(paragraph) if len(s.split()) >= MIN_WORDS]
    return sentences


def sentence_batches(tokenizer, text: str, seq_len: int, max_tokens: int | None, batch_size: int) -> SentenceBatch:
    """Tokenize sentences (each truncated at ``seq_len``) until ``max_tokens`` real tokens are reached."""
    sentences = split_sentences(text)
    if not sentences:
        raise UserError(f"the text holds no sentences of {MIN_WORDS} or more words to embed")
    chosen, total = [], 0
    for sentence, length in zip(sentences, _lengths(tokenizer, sentences, seq_len)):
        if max_tokens is not None and total + length > max_tokens:
            break
        chosen.append(sentence)
        total += length
    if not chosen:
        raise UserError(f"--max-tokens {max_tokens} is smaller than the first sentence ({length} tokens)")
    ids, masks = [], []
    for start in range(0, len(chosen), batch_size):
        encoded = tokenizer(chosen[start : start + batch_size], padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
        ids.append(encoded["input_ids"])
        masks.append(encoded["attention_mask"])
    return SentenceBatch(ids, masks)


def _lengths(tokenizer, sentences: list[str], seq_len: int) -> list[int]:
    return [min(len(ids), seq_len) for ids in tokenizer(sentences, verbose=False)["input_ids"]]


def embed(model: nn.Module, batches: SentenceBatch, on_batch: Callable[[int], None] | None = None) -> EmbeddingOutputs:
    """Mean-pooled embeddings and real-token hidden states, in float32 on the CPU."""
    device = next(model.parameters()).device
    pooled, hidden = [], []
    with torch.inference_mode():
        for ids, mask in zip(batches.input_ids, batches.attention_mask):
            states = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float().cpu()
            pooled.append(mean_pooled(states, mask))
            hidden.append(states[mask.bool()])
            if on_batch is not None:
                on_batch(ids.shape[0])
    return EmbeddingOutputs(torch.cat(pooled), torch.cat(hidden))


def compare(original: EmbeddingOutputs, compressed: EmbeddingOutputs) -> dict[str, float]:
    """Cosine similarity of pooled embeddings (mean, min) and relative error of the hidden states."""
    cosine = F.cosine_similarity(compressed.pooled, original.pooled, dim=-1)
    error = (compressed.hidden - original.hidden).norm() / original.hidden.norm()
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(), "hidden_rel_error": error.item()}
