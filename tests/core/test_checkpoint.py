"""The checkpoint folder is written whole or not at all, and a broken one fails with one clear line."""

from __future__ import annotations

import json

import pytest

import model_compress
from model_compress.core.checkpoint import REPORT_FILE, validate_checkpoint, write_folder_atomically
from model_compress.core.errors import UserError
from model_compress.rpq.convert import RPQSettings
from model_compress.rpq.pipeline import CalibrationOptions, compress_rpq

NO_DATA = CalibrationOptions(enabled=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One converted tiny Llama, shared by the tests that only read it (copy before damaging)."""
    from ..conftest import tiny_model

    root = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama").save_pretrained(root / "tiny")
    compress_rpq(str(root / "tiny"), root / "out", RPQSettings(num_codebooks=8, codebook_size=16, codebook_bits=8), calibration=NO_DATA)
    return root / "out"


def copy_of(folder, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_folder_has_config_card_report_and_weights(checkpoint):
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", REPORT_FILE} <= names
    config = json.loads((checkpoint / "config.json").read_text())
    section = config["quantization_config"]
    assert section["quant_method"] == "rpq"
    assert section["num_codebooks"] == 8 and section["codebook_size"] == 16
    assert section["tool"]["name"] == "model-compress"
    assert section["layers"]["lm_head"] == {
        "kind": "tied_head", "shape": [320, 64], "num_codebooks": 8, "codebook_size": 16, "codebook_dtype": "int8",
        "tied_to": "model.embed_tokens",
    }
    assert config["tie_word_embeddings"] is False  # the dense tie is gone; the RPQ tie is in `layers`
    card = (checkpoint / "README.md").read_text()
    assert "bpw" in card and "`--codebooks` (M) 8" in card and "q_proj" in card
    report = json.loads((checkpoint / REPORT_FILE).read_text())["summary"]
    assert report["bits_per_weight"] == pytest.approx(report["code_bits_per_weight"] + report["codebook_bits_per_weight"])
    assert not [p for p in checkpoint.parent.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_failed_write_leaves_nothing(tmp_path):
    def broken(folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder_atomically(tmp_path / "out", False, broken)
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_force_and_survives_a_failed_replace(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="--force"):
        write_folder_atomically(out, False, lambda folder: None)

    def broken(folder):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_folder_atomically(out, True, broken)
    assert (out / "mine.txt").read_text() == "keep me"

    write_folder_atomically(out, True, lambda folder: (folder / "new.txt").write_text("new"))
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_missing_parents_are_created_and_a_file_in_the_way_is_refused(tmp_path):
    write_folder_atomically(tmp_path / "a" / "b" / "out", False, lambda folder: (folder / "x").write_text("1"))
    assert (tmp_path / "a" / "b" / "out" / "x").read_text() == "1"
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        write_folder_atomically(tmp_path / "file" / "out", False, lambda folder: None)


def test_existing_output_is_refused_before_loading(tmp_path, monkeypatch):
    from model_compress.rpq import pipeline

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(pipeline, "open_model", lambda *a, **k: pytest.fail("loaded before checking the output"))
    with pytest.raises(UserError, match="already exists"):
        compress_rpq(None, tmp_path / "out", RPQSettings())


def test_truncated_weights_are_a_user_error(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupt or truncated"):
        model_compress.load(folder)


def test_garbage_weights_are_a_user_error(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="corrupt or truncated"):
        model_compress.load(folder)


def test_missing_codes_are_a_user_error(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(checkpoint, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.indices"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="model.layers.1.mlp.up_proj.indices"):
        model_compress.load(folder)


@pytest.mark.parametrize("damage", ["scales", "width"])
def test_codes_or_scales_that_disagree_with_the_config_are_a_user_error(checkpoint, tmp_path, damage):
    import torch
    from safetensors.torch import load_file, save_file

    folder = copy_of(checkpoint, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    if damage == "scales":
        del tensors[f"{name}.codebook_scales"]
        message = f"{name}.codebook_scales"
    else:
        tensors[f"{name}.indices"] = torch.cat([tensors[f"{name}.indices"]] * 2, dim=1)
        message = "indices' has shape"
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=message):
        model_compress.load(folder)


def test_folders_that_are_not_rpq_checkpoints(tmp_path, tiny_folder):
    with pytest.raises(UserError, match="does not exist"):
        model_compress.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        model_compress.load(tmp_path / "empty")
    with pytest.raises(UserError, match="not a model-compress checkpoint"):
        model_compress.load(tiny_folder("opt"))


def test_validate_returns_the_section(checkpoint):
    assert validate_checkpoint(checkpoint)["quant_method"] == "rpq"


def test_load_original_gives_back_the_model_the_folder_was_made_from(checkpoint, tmp_path):
    import shutil

    import torch
    import transformers

    original = model_compress.load_original(checkpoint)
    saved = transformers.AutoModelForCausalLM.from_pretrained(checkpoint.parent / "tiny")
    assert not original.training and type(original) is type(saved)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(original.state_dict()[name], tensor), name
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved / "out")
    config = json.loads((moved / "out" / "config.json").read_text())
    config["quantization_config"]["base_model"]["path"] = str(tmp_path / "gone")
    (moved / "out" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no longer exists"):
        model_compress.load_original(moved / "out")
