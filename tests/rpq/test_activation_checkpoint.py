"""Activation checkpointing while fine-tuning: the same gradients with less kept, chosen by the memory estimate."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from model_compress.core.errors import UserError
from model_compress.rpq.fit import activation_checkpoint
from model_compress.rpq.fit.activation_checkpoint import checkpointed_blocks, choose, step_activation_bytes
from model_compress.rpq.fit.stack import find_stack

from ..conftest import tiny_model


def _stack(model):
    return find_stack(model, [name for name, _ in model.named_modules() if name.endswith("q_proj")])


def _step(model, ids):
    """One training step's gradients and the bytes its graph kept for the backward pass."""
    kept = []

    def keep(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad(set_to_none=True)
    with saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, sum(kept)


def test_checkpointed_blocks_give_the_same_gradients_keeping_less_and_are_undone_after():
    model = tiny_model("llama").float().eval()
    stack = _stack(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    plain, plain_bytes = _step(model, ids)
    with checkpointed_blocks(stack):
        assert all("forward" in block.__dict__ for block in stack.blocks)
        recomputed, recomputed_bytes = _step(model, ids)
        with torch.no_grad():  # no graph: the blocks run as they are
            torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not any("forward" in block.__dict__ for block in stack.blocks)
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6)
    assert recomputed_bytes < 0.6 * plain_bytes, (recomputed_bytes, plain_bytes)


def test_a_wrapper_already_on_a_block_is_kept_and_put_back():
    model = tiny_model("llama").float().eval()
    stack = _stack(model)
    calls = []
    earlier = stack.blocks[0].forward

    def hooked(*args, **kwargs):  # as accelerate's hooks wrap a module's forward on the instance
        calls.append(1)
        return earlier(*args, **kwargs)

    stack.blocks[0].forward = hooked
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with checkpointed_blocks(stack):
        _step(model, ids)
    assert calls and stack.blocks[0].__dict__["forward"] is hooked


def test_blocks_are_checkpointed_only_where_the_estimate_does_not_fit_the_free_memory():
    model = tiny_model("llama").float()
    stack = _stack(model)
    estimate = step_activation_bytes(model, stack, 2048)
    config = model.config
    blocks = config.num_hidden_layers
    # at least the per-block activations and the head's logits, at most a few times them with the weights' copies
    floor = blocks * 2 * 34 * 2048 * config.hidden_size + 12 * 2048 * config.vocab_size
    assert floor <= estimate < 4 * floor
    room = int(estimate / activation_checkpoint.FREE_FRACTION)
    assert not choose(model, stack, 2048, torch.device("cpu"), "auto", free=2 * room).checkpointed
    tight = choose(model, stack, 2048, torch.device("cpu"), "auto", free=room // 2)
    assert tight.checkpointed and tight.to_json() == {"checkpointed": True, "estimate_bytes": estimate, "free_bytes": room // 2}
    assert not choose(model, None, 2048, torch.device("cpu"), free=1).checkpointed  # no stack of blocks: nothing to wrap


def test_eager_attention_counts_its_score_matrices():
    model = tiny_model("llama").float()
    stack = _stack(model)
    model.config._attn_implementation = "sdpa"
    fused = step_activation_bytes(model, stack, 1024)
    model.config._attn_implementation = "eager"
    eager = step_activation_bytes(model, stack, 1024)
    assert eager - fused == model.config.num_hidden_layers * 2 * 5 * model.config.num_attention_heads * 1024 * 1024


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_finetuning_with_checkpointed_blocks_matches_finetuning_without(tiny_folder, monkeypatch, arch):
    """Forced on (no memory counts as free), fine-tuning takes the same steps: the same held-out figures (a decoder
    with a head, GPT-2's blocks with their own keyword arguments, an encoder trained on its hidden states)."""
    from model_compress.rpq.convert import RPQSettings
    from model_compress.rpq.fit.finetune import FinetuneSettings
    from model_compress.rpq.pipeline import CalibrationOptions, compress_rpq

    folder = str(tiny_folder(arch))

    def run():
        return compress_rpq(
            folder, None, RPQSettings(num_codebooks=64, codebook_size=4, codebook_bits=8),
            calibration=CalibrationOptions(tokens=8 * 128, seq_len=128), finetuning=FinetuneSettings(steps=8, lr=1e-3),
        ).finetune

    plain = run()
    monkeypatch.setattr(activation_checkpoint, "FREE_FRACTION", 0.0)  # auto, with no memory counted as free
    checkpointed = run()
    assert checkpointed.checkpointing.checkpointed and not plain.checkpointing.checkpointed
    assert checkpointed.to_json()["activation_checkpointing"]["checkpointed"] is True
    assert abs(checkpointed.held_out_kl_after - plain.held_out_kl_after) <= 1e-4 * plain.held_out_kl_after
    assert [round(p["held_out"], 5) for p in checkpointed.curve] == [round(p["held_out"], 5) for p in plain.curve]
