"""``compress eval --gpus N``: how a model is spread over GPUs (accelerate's device map, built from sizes alone, so
these run without a GPU), which devices a spread model reports, and the refusals of a ``--gpus`` this machine
cannot give. The spread run itself needs several GPUs."""

from __future__ import annotations

import pytest
import torch

from model_compress.core.errors import UserError
from model_compress.eval.placement import Placement, _device_of, device_map_for, model_devices

from ..conftest import assert_one_line_error, run_cli, tiny_model


def _bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _check_spread(model: torch.nn.Module) -> dict:
    room = _bytes(model) * 2  # each GPU could hold it all: the map balances the blocks over both
    device_map = device_map_for(model, {0: room, 1: room})
    devices = set(device_map.values())
    assert devices == {0, 1}, device_map
    for name in device_map:  # a decoder block is whole on one device: no key below a block
        parts = name.split(".")
        assert not ("layers" in parts and parts.index("layers") + 2 < len(parts)), name
    return device_map


def deep_llama(packed: bool = False) -> torch.nn.Module:
    """Eight small blocks and a small tied vocabulary: the blocks, not the embedding, hold most of the bytes (as in a
    real model); ``packed``: every decoder Linear a rotated packed RPQ layer."""
    import transformers

    from model_compress.rpq.kernels.rotation import random_signs
    from model_compress.rpq.layers.modules import RPQLinear

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=8,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    if packed:
        for layer in model.model.layers:
            for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    dense = getattr(parent, name)
                    rpq = RPQLinear(dense.in_features, dense.out_features, dense.out_features, 16, bias=False,
                                    codebook_dtype="int8", rotation_block=16, dtype=torch.float32)
                    rpq.set_signs(random_signs(dense.in_features, dense.in_features))
                    setattr(parent, name, rpq)
    return model


def test_a_tied_model_is_spread_over_two_gpus_in_whole_blocks_with_its_head_beside_its_embedding():
    device_map = _check_spread(deep_llama())
    assert _device_of("lm_head", device_map) == _device_of("model.embed_tokens", device_map)


def test_a_model_of_packed_layers_is_spread_in_whole_blocks():
    _check_spread(deep_llama(packed=True))


def test_a_model_larger_than_the_gpus_together_is_refused_with_one_line():
    model = deep_llama()
    with pytest.raises(UserError, match="does not fit on 2 GPUs"):
        device_map_for(model, {0: _bytes(model) // 4, 1: _bytes(model) // 4})


def test_a_spread_model_reports_each_gpu_and_a_placed_one_its_device():
    model = tiny_model("llama")
    assert model_devices(model) == [torch.device("cpu")]
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 0}
    assert model_devices(model) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    placed = Placement(torch.device("cpu")).place(tiny_model("llama"))
    assert not Placement(torch.device("cpu")).spread and model_devices(placed) == [torch.device("cpu")]


def test_compress_eval_refuses_a_gpus_it_cannot_give_with_one_line(tiny_folder):
    folder = tiny_folder("llama")
    out = folder.parent / "out"
    result = run_cli("rpq", str(folder), "-o", str(out), "--calib", "none")
    assert result.exit_code == 0, result.output
    assert_one_line_error(run_cli("eval", str(out), "--device", "cpu", "--gpus", "2", "--no-latency"), "pass --device cuda")
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli("eval", str(out), "--device", "cuda", "--gpus", "2", "--no-latency"), "CUDA is not available")
    assert_one_line_error(run_cli("eval", str(out), "--gpus", "0", "--no-latency"), "give 1 or more")
