"""Calibration windows for data-aware fitting, cut from a text that is never the evaluation text.

Causal LMs: the text joined with "\\n\\n" is tokenized once and cut into consecutive windows of
``seq_len`` tokens, the convention ``compress eval`` scores perplexity with, so fitting sees inputs
shaped like those it is judged on. Encoders (tokenizers that close a text with [SEP]): each window
is framed by the tokenizer's own special tokens. Where the text holds more windows than asked for,
the windows taken are spread evenly over all of it, so a mixed text (the packaged default: web pages,
code, several languages) gives every part its share even when a CPU run takes only a few windows.
When the conversion fine-tunes, a tenth of the windows (at least one, when there are two or more),
spread the same way, is held out: fine-tuning is judged on them, never trained or fitted on them;
without fine-tuning every window is fitted on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...core.text import Text, special_framing
from ...core.errors import UserError

HELD_OUT_FRACTION = 0.1


@dataclass
class CalibrationSet:
    """Token windows (count, seq_len) to fit on and held-out windows to judge fine-tuning on."""

    fit: torch.Tensor
    held_out: torch.Tensor
    text: Text
    tokens_in_text: int

    @property
    def seq_len(self) -> int:
        return self.fit.shape[1]

    def to_json(self) -> dict:
        return {
            "text": self.text.name,
            "source": self.text.source,
            "tokens_in_text": self.tokens_in_text,
            "seq_len": self.seq_len,
            "fit_windows": self.fit.shape[0],
            "fit_tokens": self.fit.numel(),
            "held_out_windows": self.held_out.shape[0],
            "held_out_tokens": self.held_out.numel(),
        }


def calibration_set(tokenizer, text: Text, seq_len: int, max_tokens: int, hold_out: bool = True) -> CalibrationSet:
    """Up to ``max_tokens`` tokens of ``text`` in windows of ``seq_len``; a UserError when not even one window fits.

    ``hold_out`` False: every window is fitted on (nothing will be judged on held-out windows).
    """
    if max_tokens < 1:
        raise UserError(f"--calib-tokens must be a positive number of tokens, got {max_tokens}")
    seq_len = min(seq_len, max_tokens)  # fewer tokens than a window asked for: one shorter window
    if seq_len < 2:
        raise UserError(f"a calibration window must hold at least 2 tokens, got {seq_len}")
    prefix, suffix = special_framing(tokenizer)
    if suffix:  # an encoder's framing: every window is a text of its own
        body = seq_len - len(prefix) - len(suffix)
        stream = torch.tensor(tokenizer(text.joined, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
        available_windows = stream.numel() // body
        count = min(available_windows, max_tokens // seq_len)
        bodies = stream[: available_windows * body].view(available_windows, body)[spread(available_windows, count)]
        frame = lambda ids: torch.tensor(ids, dtype=torch.long).expand(count, -1)  # noqa: E731
        windows = torch.cat([frame(prefix), bodies, frame(suffix)], dim=1) if count else bodies
        available = stream.numel() + (len(prefix) + len(suffix)) * max(1, count)
    else:
        stream = torch.tensor(tokenizer(text.joined, verbose=False)["input_ids"], dtype=torch.long)
        available_windows = stream.numel() // seq_len
        count = min(available_windows, max_tokens // seq_len)
        windows = stream[: available_windows * seq_len].view(available_windows, seq_len)[spread(available_windows, count)]
        available = stream.numel()
    if count < 1:
        raise UserError(
            f"the calibration text '{text.name}' has {available:,} tokens; one window needs {seq_len:,} "
            "(pass a longer --calib or a smaller --calib-seq-len)"
        )
    held = math.ceil(HELD_OUT_FRACTION * count) if count >= 2 and hold_out else 0
    held_mask = torch.zeros(count, dtype=torch.bool)
    held_mask[spread(count, held)] = True
    return CalibrationSet(windows[~held_mask], windows[held_mask], text, stream.numel())


def spread(total: int, wanted: int) -> torch.Tensor:
    """``wanted`` distinct indices of ``range(total)``, evenly spaced, in order (all of them when wanted >= total)."""
    if wanted >= total:
        return torch.arange(total)
    return (torch.arange(wanted) * total // max(1, wanted) + total // (2 * max(1, wanted))).clamp(max=total - 1)
