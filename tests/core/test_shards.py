"""Reading a safetensors checkpoint tensor by tensor: shards found and checked whole before any work, pickles refused."""

from __future__ import annotations

import pytest
import torch

from model_compress.core.errors import UserError
from model_compress.core.shards import open_checkpoint, refuse_pickle

from ..conftest import assert_one_line_error, run_cli, tiny_model


@pytest.fixture
def sharded(tmp_path):
    """A tiny Llama saved in several shards, with its state dict."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    return tmp_path, model.state_dict()


def test_every_tensor_reads_back_from_its_shard(sharded):
    folder, state = sharded
    checkpoint = open_checkpoint(folder)
    assert len(checkpoint.shards) > 2
    assert "lm_head.weight" not in checkpoint  # tied to the embedding: stored once
    for name in checkpoint.files:
        assert torch.equal(checkpoint.read(name), state[name]), name


def test_a_single_file_checkpoint_opens_and_a_folder_without_safetensors_is_none(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path / "one")
    assert len(open_checkpoint(tmp_path / "one").shards) == 1
    (tmp_path / "empty").mkdir()
    assert open_checkpoint(tmp_path / "empty") is None


def test_a_missing_shard_is_named_before_any_work(sharded):
    folder, _ = sharded
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(UserError, match=f"shard '{victim.name}' .* is missing"):
        open_checkpoint(folder)


def test_a_truncated_shard_is_named_with_the_bytes_it_lacks(sharded):
    folder, _ = sharded
    victim = sorted(folder.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(UserError, match=f"shard '{victim.name}' .* is truncated"):
        open_checkpoint(folder)


def test_a_header_that_is_not_safetensors_is_refused(sharded):
    folder, _ = sharded
    victim = sorted(folder.glob("model-*.safetensors"))[0]
    victim.write_bytes(b"\xff" * 16)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        open_checkpoint(folder)


def pickled_checkpoint(folder):
    """A folder with a config and pickled weights only (transformers 5 writes safetensors whatever it is asked)."""
    model = tiny_model("gpt2")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    pickled_checkpoint(tmp_path)
    with pytest.raises(UserError, match="pickled .bin weights.*--allow-pickle"):
        refuse_pickle(tmp_path, allow_pickle=False)
    refuse_pickle(tmp_path, allow_pickle=True)


def test_the_cli_refuses_a_pickled_checkpoint_in_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    pickled_checkpoint(tmp_path / "src")
    result = run_cli("rpq", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--calib", "none")
    assert_one_line_error(result, "pickled .bin weights", "--allow-pickle")
    assert not (tmp_path / "out").exists()


def test_the_cli_names_a_truncated_shard_in_one_line(sharded, tmp_path):
    folder, _ = sharded
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-8])
    result = run_cli("rpq", str(folder), "-o", str(tmp_path / "out"), "--calib", "none")
    assert_one_line_error(result, victim.name, "truncated")
