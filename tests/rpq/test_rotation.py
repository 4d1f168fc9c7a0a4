"""The input rotation: orthogonal, exact in the layers, rebuilt bit for bit after a save, refused when damaged."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import model_compress
from model_compress.core.errors import UserError
from model_compress.rpq.convert import RPQSettings
from model_compress.rpq.fusions import apply_fusions
from model_compress.rpq.kernels.rotation import (
    block_for, dense_matrix, hadamard, pack_signs, random_signs, rotate, rotate_hessian, unpack_signs, unrotate,
)
from model_compress.rpq.layers.modules import RPQEmbedding, RPQLinear, RPQTiedHead
from model_compress.rpq.pipeline import CalibrationOptions, compress_rpq

from ..conftest import assert_one_line_error, filled, rotated_llama, run_cli, tiny_config

QUICK = CalibrationOptions(tokens=1024)


@pytest.mark.parametrize("width,wanted", [(64, 64), (576, 64), (1536, 256), (384, 512)])
def test_rotation_is_orthogonal_and_its_three_forms_agree(width, wanted):
    block = block_for(width, wanted)
    signs = random_signs(width, 3)
    matrix = dense_matrix(signs, block)
    assert torch.allclose(matrix @ matrix.T, torch.eye(width, dtype=torch.float64), atol=1e-12)
    assert set(signs.tolist()) == {-1, 1} and signs.dtype == torch.int8
    x = torch.randn(5, width, dtype=torch.float64)
    assert torch.allclose(rotate(x, signs, block), x @ matrix, atol=1e-12)
    assert torch.allclose(unrotate(rotate(x, signs, block), signs, block), x, atol=1e-12)
    hessian = x.T @ x
    assert torch.allclose(rotate_hessian(hessian, signs, block), matrix.T @ hessian @ matrix, atol=1e-10)


def test_blocks_fall_back_to_the_largest_power_of_two_that_divides_the_width():
    assert block_for(576, 256) == 64 and block_for(896, 256) == 128 and block_for(1536, 256) == 256
    assert block_for(4864, 512) == 256 and block_for(100, 64) is None and block_for(24, 64) is None
    with pytest.raises(ValueError):
        hadamard(48, torch.device("cpu"), torch.float32)


def test_signs_are_the_same_draw_on_every_call_and_pack_to_one_bit_each():
    assert torch.equal(random_signs(576, 0), random_signs(576, 0))
    assert not torch.equal(random_signs(576, 0), random_signs(576, 1))
    packed = pack_signs(random_signs(576, 0))
    assert packed.dtype == torch.uint8 and packed.shape == (72,)
    assert torch.equal(unpack_signs(packed), random_signs(576, 0))
    assert pack_signs(torch.tensor([-1, 1, 1, 1, 1, 1, 1, -1], dtype=torch.int8)).item() == 0b10000001


def test_a_rotated_dense_layer_gives_the_original_outputs():
    """W' = W R applied to x R is W x: the identity every rotated layer relies on."""
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(48, 128, generator=gen), torch.randn(7, 128, generator=gen)
    signs = random_signs(128, 0)
    assert torch.allclose(F.linear(rotate(x, signs, 64), rotate(weight, signs, 64)), F.linear(x, weight), atol=1e-4)


def test_rotated_rpq_modules_compute_with_their_decoded_weights():
    """Linear: x R times the codes' W' equals x times dequantize() (= W' R^T); embedding rows come back unrotated;
    a tied head rotates its input with its embedding's signs."""
    linear = filled(RPQLinear(128, 32, num_codebooks=32, codebook_size=16, codebook_dtype="int8", rotation_block=64))
    linear.set_signs(random_signs(128, 1))
    with torch.no_grad():
        x = torch.randn(3, 5, 128)
        torch.testing.assert_close(linear(x), F.linear(x, linear.dequantize(), linear.bias), rtol=1e-5, atol=1e-5)
        table = filled(RPQEmbedding(300, 64, num_codebooks=64, codebook_size=16, rotation_block=32, dtype=torch.float32))
        table.set_signs(random_signs(64, 2))
        ids = torch.randint(0, 300, (2, 6))
        torch.testing.assert_close(table(ids), table.dequantize()[ids], rtol=1e-5, atol=1e-5)
        head = RPQTiedHead(table)
        h = torch.randn(2, 6, 64)
        torch.testing.assert_close(head(h), h @ table.dequantize().T, rtol=1e-4, atol=1e-4)
    assert not linear.native and "rotation=hadamard(64)" in repr(linear)


def test_siblings_rotate_their_shared_input_once(monkeypatch):
    """q/k/v with equal signs share one x R per input tensor; a different tensor is rotated again."""
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    attention = model.model.layers[0].self_attn
    signs = random_signs(64, 0)
    for name in ("q_proj", "k_proj", "v_proj"):
        dense = getattr(attention, name)
        layer = filled(RPQLinear(64, dense.out_features, dense.out_features, 16, bias=False, rotation_block=64, dtype=torch.float32))
        layer.set_signs(signs)
        setattr(attention, name, layer)
    assert apply_fusions(model)["shared_rotation"] == 1
    calls = []
    import model_compress.rpq.layers.modules as modules

    original = modules.rotation.rotate
    monkeypatch.setattr(modules.rotation, "rotate", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        outputs = [getattr(attention, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
        assert len(calls) == 1 and not attention.q_proj.__dict__["_shared_rotation"].holding  # nothing kept past v_proj
        attention.q_proj(x.clone())
        assert len(calls) == 2
        for name, out in zip(("q_proj", "k_proj", "v_proj"), outputs):
            layer = getattr(attention, name)
            torch.testing.assert_close(out, F.linear(x, layer.dequantize()), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def rotated_checkpoint(tmp_path_factory):
    """A tiny Llama (tied embedding) at --bits 4 with the default rotation, saved once for the tests below."""
    from ..conftest import tiny_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("rotation")
    tiny_model("llama").save_pretrained(folder / "in")
    tiny_tokenizer("llama").save_pretrained(folder / "in")
    run = compress_rpq(str(folder / "in"), folder / "out", RPQSettings(bits=4.0, rotation_block=32), calibration=QUICK)
    return folder / "out", run


def test_a_budget_rotates_every_layer_and_the_checkpoint_rebuilds_r_bit_for_bit(rotated_checkpoint):
    out, run = rotated_checkpoint
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["rotation"] == "hadamard" and config["rotation_block"] == 32 and config["format_version"] == 3
    specs = config["layers"]
    assert specs and all(spec["rotation_block"] == 32 for spec in specs.values())
    loaded = model_compress.load(out, dtype=torch.float32)
    for name, module in loaded.named_modules():
        if isinstance(module, (RPQLinear, RPQEmbedding)):
            width = module.signs().numel()
            assert module.rotation_signs.dtype == torch.uint8 and module.rotation_signs.numel() * 8 == width
            assert torch.equal(module.signs(), random_signs(width, 0)), name
            assert torch.equal(dense_matrix(module.signs(), 32), dense_matrix(run.model.get_submodule(name).signs(), 32))
    assert "hadamard" in (out / "README.md").read_text().lower() and "H32" in (out / "README.md").read_text()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        from_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        torch.testing.assert_close(from_hf(ids).logits, loaded(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(loaded(ids).logits, run.model(ids).logits, rtol=0, atol=0)


def test_a_rotated_checkpoint_loaded_and_run_under_inference_mode_gives_the_same_logits(rotated_checkpoint):
    """Moved to its device inside torch.inference_mode (``.to("cuda")`` there copies every tensor: ``_apply(clone)``
    does the same on a CPU), its buffers are inference tensors, which keep no version counter: the unpacked signs
    are still kept, and the model runs inside and outside inference mode."""
    out, _ = rotated_checkpoint
    ids = torch.randint(0, 300, (2, 9))
    loaded = model_compress.load(out, dtype=torch.float32)
    with torch.no_grad():
        want = loaded(ids).logits
    with torch.inference_mode():
        loaded._apply(torch.clone)
        assert all(buffer.is_inference() for buffer in loaded.buffers())
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)


def test_a_checkpoint_loaded_with_decoded_weights_gives_the_same_logits(rotated_checkpoint):
    """load(decode_weights=True): every layer multiplies a float16 copy of its decoded weight, kept beside the codes."""
    out, _ = rotated_checkpoint
    plain = model_compress.load(out, dtype=torch.float32)
    decoded = model_compress.load(out, dtype=torch.float32, decode_weights=True)
    layers = [m for m in decoded.modules() if isinstance(m, (RPQLinear, RPQEmbedding))]
    assert layers and all(m.decoded is not None and m.decoded.dtype == torch.float16 for m in layers)
    assert any(name.endswith("decoded_weight") for name, _ in decoded.named_buffers())
    assert not any(key.endswith("decoded_weight") for key in decoded.state_dict())  # never saved
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        want, got = plain(ids).logits, decoded(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 5e-3


def test_rotation_none_and_fixed_settings_store_no_rotation(tmp_path, tiny_folder):
    folder = tiny_folder("llama")
    run = compress_rpq(str(folder), tmp_path / "none", RPQSettings(bits=4.0, rotation="none"), calibration=QUICK)
    assert run.config.rotation == "none" and not any("rotation_block" in s for s in run.config.layers.values())
    fixed = compress_rpq(str(folder), tmp_path / "fixed", RPQSettings(num_codebooks=8, codebook_size=16), calibration=QUICK)
    assert fixed.config.rotation == "none"
    with torch.no_grad():
        names = [n for n, m in fixed.model.named_modules() if isinstance(m, RPQLinear)]
        assert names and all(fixed.model.get_submodule(n).rotation_signs is None for n in names)


def test_a_width_no_block_divides_stays_unrotated_and_the_table_says_so(tmp_path):
    config = tiny_config("llama")
    config.intermediate_size = 136  # down_proj reads 136 = 8 x 17 features: no power-of-two block of 16 or more
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "odd")
    from ..conftest import tiny_tokenizer

    tiny_tokenizer("llama").save_pretrained(tmp_path / "odd")
    result = run_cli("rpq", str(tmp_path / "odd"), "-o", str(tmp_path / "out"), "--bits", "4", "--calib-tokens", "1024")
    assert result.exit_code == 0, result.output
    specs = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["layers"]
    assert "rotation_block" not in specs["model.layers.0.mlp.down_proj"]
    assert specs["model.layers.0.mlp.up_proj"]["rotation_block"] == 64
    row = next(line for line in result.stdout.splitlines() if "down_proj" in line)
    assert "none" in row


def test_an_unknown_rotation_is_one_line(tmp_path):
    assert_one_line_error(run_cli("rpq", "-o", str(tmp_path / "out"), "--rotation", "givens"), "--rotation", "hadamard")
    assert_one_line_error(run_cli("rpq", "-o", str(tmp_path / "out"), "--rotation-block", "48"), "--rotation-block")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,fragment", [("drop", "rotation data is missing"), ("shape", "one sign bit per input feature"), ("dtype", "U8")])
def test_a_damaged_rotation_is_one_clear_line_at_load(rotated_checkpoint, tmp_path, damage, fragment):
    import shutil

    out, _ = rotated_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.rotation_signs"
    if damage == "drop":
        del tensors[name]
    elif damage == "shape":
        tensors[name] = tensors[name][:8].clone()
    else:
        tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises((UserError, ValueError), match=re.escape(fragment)):
        model_compress.load(broken)
    assert_one_line_error(run_cli("inspect", str(broken)), fragment)


def test_norms_and_gates_that_write_the_rotated_input_give_the_same_logits():
    """The pre-norms write norm(x) R and the MLPs (silu(gate) * up) R: consumers take it as it comes, same logits."""
    import copy

    plain = rotated_llama()
    fused = copy.deepcopy(plain)
    counts = apply_fusions(fused)
    layers = len(plain.model.layers)
    assert counts["rotated_norm"] == 2 * layers and counts["rotated_glu"] == layers
    assert "_rotated_by" in fused.model.layers[0].self_attn.q_proj.__dict__
    assert "_rotated_by" not in fused.model.layers[0].self_attn.o_proj.__dict__  # its input comes from attention
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_norm_whose_readers_are_rotated_differently_is_left_alone():
    model = rotated_llama()
    attention = model.model.layers[0].self_attn
    attention.k_proj.set_signs(random_signs(attention.k_proj.in_features, 99))
    counts = apply_fusions(model)
    assert counts["rotated_norm"] == 2 * len(model.model.layers) - 1
    assert "_rotated_by" not in attention.q_proj.__dict__


def test_a_reader_of_a_rotating_norm_called_on_another_tensor_rotates_it_itself():
    model = rotated_llama()
    apply_fusions(model)
    decoder = model.model.layers[0]
    x = torch.randn(1, 4, decoder.self_attn.q_proj.in_features)
    with torch.no_grad():
        written = decoder.input_layernorm(x)
        q = decoder.self_attn.q_proj
        expected = F.linear(x, q.dequantize())
        torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)  # not the norm's tensor: rotated by the layer
        unrotated_norm = unrotate(written, q.signs(torch.float32), q.rotation_block)
        torch.testing.assert_close(q(written), F.linear(unrotated_norm, q.dequantize()), rtol=1e-4, atol=1e-4)


def test_eval_with_decoded_weights_reports_their_memory_and_the_same_quality(rotated_checkpoint, tmp_path):
    out, _ = rotated_checkpoint
    reports = {}
    for flag in ((), ("--decode-weights",)):
        path = tmp_path / f"report{len(flag)}.json"
        result = run_cli("eval", str(out), "--no-latency", "--max-tokens", "512", "--seq-len", "64", "--device", "cpu",
                         "--json", str(path), *flag)
        assert result.exit_code == 0, result.output
        reports[bool(flag)] = json.loads(path.read_text())
    plain, decoded = reports[False]["compressed"], reports[True]["compressed"]
    assert reports[True]["settings"]["decode_weights"] and plain["decoded_bytes"] == 0 < decoded["decoded_bytes"]
    assert decoded["weight_bytes"] == plain["weight_bytes"] + decoded["decoded_bytes"]
    assert decoded["quality"]["perplexity"] == pytest.approx(plain["quality"]["perplexity"], rel=1e-2)
    assert any("--decode-weights" in line for line in reports[True]["warnings"])


def test_decoded_weights_behind_rotating_norms_and_gates_give_the_same_logits():
    """Decoded weights are in the model's basis: the fused norms and gates then hand over their plain outputs."""
    from model_compress.core.methods import decode_weights

    model = rotated_llama()
    apply_fusions(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        assert decode_weights(model, torch.float16) > 0
        got = model(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 5e-3
