"""Format 3: 5-bit codes over a multiple of 32 columns stored as a 4-bit plane and a 1-bit plane, and format-2
checkpoints (one stream for every width) repacked when they load."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

import model_compress
from model_compress.rpq.convert import RPQSettings
from model_compress.rpq.kernels.layout import pack_codes, pack_stream, planes_from_stream, stored_as_planes, unpack_codes
from model_compress.rpq.layers.modules import RPQEmbedding, RPQLinear
from model_compress.rpq.pipeline import CalibrationOptions, compress_rpq

from ..conftest import tiny_model, tiny_tokenizer


def test_five_bit_codes_are_a_nibble_plane_then_a_bit_plane():
    codes = torch.randint(0, 32, (3, 64), generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, 5)
    assert packed.shape == (3, 40)  # the stream's bytes
    assert torch.equal(packed[:, :32], pack_stream(codes & 15, 4)) and torch.equal(packed[:, 32:], pack_stream(codes >> 4, 1))
    assert torch.equal(unpack_codes(packed, 5, 64), codes)
    assert torch.equal(planes_from_stream(pack_stream(codes, 5), 5, 64), packed)
    odd = codes[:, :40]  # not a multiple of 32 columns: the stream stays
    assert not stored_as_planes(5, 40) and torch.equal(pack_codes(odd, 5), pack_stream(odd, 5))
    assert not stored_as_planes(4, 64) and not stored_as_planes(6, 64)


def test_a_format_2_checkpoint_loads_its_stream_codes_as_planes_and_saves_format_3(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "in")
    tiny_tokenizer("llama").save_pretrained(tmp_path / "in")
    compress_rpq(str(tmp_path / "in"), tmp_path / "v3", RPQSettings(codebook_size=32, codebook_bits=8),
                 calibration=CalibrationOptions(tokens=512))
    current = model_compress.load(tmp_path / "v3", dtype=torch.float32)
    planar = {name for name, module in current.named_modules()
              if isinstance(module, (RPQLinear, RPQEmbedding)) and stored_as_planes(module.code_bits, module.columns)}
    assert planar  # the tiny model's 64-wide layers at K = 32

    # the same checkpoint as format 2 wrote it: every code row one stream
    old = tmp_path / "v2"
    old.mkdir()
    for item in (tmp_path / "v3").iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            (old / item.name).write_bytes(item.read_bytes())
    tensors = load_file(tmp_path / "v3" / "model.safetensors")
    for name in planar:
        tensors[f"{name}.indices"] = pack_stream(current.get_submodule(name).codes(), 5)
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((old / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    (old / "config.json").write_text(json.dumps(config))

    upgraded = model_compress.load(old, dtype=torch.float32)
    for name in planar:
        assert torch.equal(upgraded.get_submodule(name).indices, current.get_submodule(name).indices), name
    ids = torch.randint(3, 200, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(upgraded(ids).logits, current(ids).logits)
    upgraded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["format_version"] == 3
    saved = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(saved[f"{name}.indices"], current.get_submodule(name).indices) for name in planar)
