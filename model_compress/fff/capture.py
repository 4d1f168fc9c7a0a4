"""Recording what each FF block sees and answers on calibration text, in one pass of the original model.

Calibration text is cut into windows of real documents, each framed by the tokenizer's own special
tokens ([CLS] ... [SEP] for BERT, <s> for Llama), so every block sees inputs like those it was
trained on. Padding positions are dropped from the record. Records stay on the CPU, in float32 when
they fit in RECORD_LIMIT bytes and in bfloat16 (same range, 3 significant digits) beyond that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.text import Text, special_framing
from ..core.errors import UserError
from .blocks import Block, hidden_size

RECORD_LIMIT = 2 * 1024**3
MIN_WINDOW = 16  # shorter pieces (a document's tail) teach little; they are skipped


@dataclass
class Calibration:
    """Windows of token ids (padded) with their attention mask; ``tokens`` counts the real ones."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class BlockRecord:
    """A block's inputs and outputs, one row per calibration token (fit rows first, held-out rows last)."""

    inputs: torch.Tensor
    outputs: torch.Tensor


def calibration_windows(tokenizer, text: Text, seq_len: int, max_tokens: int, min_tokens: int, why: str = "") -> Calibration:
    """Up to ``max_tokens`` tokens of ``text`` in windows of at most ``seq_len``, or a UserError if under ``min_tokens``
    (``why`` says what needs them)."""
    prefix, suffix = special_framing(tokenizer)
    special = len(prefix) + len(suffix)
    body = seq_len - special
    windows: list[list[int]] = []
    total = 0
    for document in text.documents:
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            piece = ids[start : start + body]
            if len(piece) < MIN_WINDOW or total >= max_tokens:
                continue
            piece = piece[: max(MIN_WINDOW, max_tokens - total - special)]
            window = prefix + piece + suffix
            windows.append(window)
            total += len(window)
    if total < min_tokens:
        raise UserError(f"the calibration text '{text.name}' gives {total:,} tokens; at least {min_tokens:,} are needed{why} (pass a longer --calib)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    longest = max(len(window) for window in windows)
    input_ids = torch.full((len(windows), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), longest), dtype=torch.long)
    for row, window in enumerate(windows):
        input_ids[row, : len(window)] = torch.tensor(window)
        attention_mask[row, : len(window)] = 1
    return Calibration(input_ids, attention_mask)


def record_blocks(
    model: nn.Module,
    blocks: list[Block],
    calibration: Calibration,
    device: torch.device,
    batch_size: int = 8,
    advance: Callable[[int], None] | None = None,
) -> dict[int, BlockRecord]:
    """Run ``model`` (on ``device``) over the windows and keep each block's input and output rows.

    The base model runs without its head: the blocks are all we listen to, and a causal LM's logits
    over the vocabulary would cost more memory than the whole record.
    """
    hidden = [hidden_size(model, block) for block in blocks]
    tokens = calibration.tokens
    store = torch.float32 if 2 * tokens * sum(hidden) * 4 <= RECORD_LIMIT else torch.bfloat16
    records = {b.index: BlockRecord(torch.empty(tokens, h, dtype=store), torch.empty(tokens, h, dtype=store)) for b, h in zip(blocks, hidden)}
    state = {"mask": None, "row": 0}
    handles = []

    def keep(index: int, field: str):
        def hook(tensor: torch.Tensor) -> None:
            rows = tensor.reshape(-1, tensor.shape[-1])[state["mask"]].to("cpu", store)  # OPT flattens (batch, seq)
            getattr(records[index], field)[state["row"] : state["row"] + rows.shape[0]] = rows
        return hook

    for block in blocks:
        take_input, take_output = keep(block.index, "inputs"), keep(block.index, "outputs")
        first, last = model.get_submodule(block.input_name), model.get_submodule(block.output_name)
        handles.append(first.register_forward_pre_hook(lambda m, args, f=take_input: f(args[0])))
        handles.append(last.register_forward_hook(lambda m, args, out, f=take_output: f(out)))
    body = getattr(model, "base_model", model)
    try:
        with torch.inference_mode():
            for start in range(0, calibration.input_ids.shape[0], batch_size):
                ids = calibration.input_ids[start : start + batch_size].to(device)
                mask = calibration.attention_mask[start : start + batch_size].to(device)
                state["mask"] = mask.bool().flatten()
                body(input_ids=ids, attention_mask=mask)
                state["row"] += int(mask.sum())
                if advance is not None:
                    advance(ids.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return records
