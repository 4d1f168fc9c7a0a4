"""`compress eval`: the figures are the right figures (against hand-written references), the
comparison is fair (identical models compare as equal, a damaged one as worse), the report is
complete, and bad input gives one clean line."""

from __future__ import annotations

import json
import math
import shutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from model_compress.cli.app import app
from model_compress.core.text import DEFAULT_TEXT_DISTRIBUTION, DEFAULT_TEXT_PACKAGE, Text, default_text, hub_text
from model_compress.core.errors import UserError
from model_compress.eval import perplexity, similarity
from model_compress.eval.compare import EvalSettings, evaluate

from ..conftest import ENGLISH, assert_one_line_error, real_model_folder, tiny_config, tiny_model, tiny_tokenizer

runner = CliRunner()
FAST_LATENCY = ["--prompt-len", "32", "--new-tokens", "8", "--repeats", "1"]


def run_cli(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def rpq(source, out, *extra: str) -> None:
    result = run_cli("rpq", source, "-o", out, "--codebooks", "8", "--codebook-size", "16", "--device", "cpu", *extra)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    """A tiny Llama that has learned ENGLISH (perplexity far below its vocabulary), saved with its tokenizer.

    A random model sits at perplexity ~ vocabulary size whatever is done to it; damage only shows on a
    model that has learned something.
    """
    folder = tmp_path_factory.mktemp("trained") / "llama"
    tokenizer = tiny_tokenizer("llama")
    model = tiny_model("llama").train()
    ids = torch.tensor(tokenizer(ENGLISH)["input_ids"])
    windows = ids[: ids.numel() // 32 * 32].view(-1, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        loss = model(input_ids=windows, labels=windows).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(ENGLISH)
    return path


def reference_perplexity(model, windows: torch.Tensor) -> float:
    """Token by token: each token's NLL given only the tokens before it in its window."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            for t in range(1, window.numel()):
                logits = model(input_ids=window[None, :t]).logits[0, -1]
                nll -= F.log_softmax(logits.double(), -1)[window[t]].item()
                count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])  # the decoders; BERT's masked-LM loss has its own test
def test_causal_perplexity_equals_a_token_by_token_reference(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, tiny_config(arch).vocab_size, (50,), generator=torch.Generator().manual_seed(1))
    windows = perplexity.cut_windows(ids, 12)
    assert windows.shape == (4, 12)  # the 2-token tail is dropped, as the field does
    result = perplexity.causal_nll(model, windows, batch_size=3)
    assert result.tokens == 4 * 11
    assert result.perplexity == pytest.approx(reference_perplexity(model, windows), rel=1e-5)


def test_max_tokens_caps_the_windows_and_too_little_text_is_an_error():
    ids = torch.arange(100)
    assert perplexity.cut_windows(ids, 10, max_tokens=35).shape == (3, 10)
    with pytest.raises(UserError, match="fewer than one window of 64"):
        perplexity.cut_windows(ids, 64, max_tokens=50)


def test_masked_windows_are_reproducible_framed_and_mask_only_text():
    tokenizer = tiny_tokenizer("bert")
    ids = perplexity.tokenize(tokenizer, ENGLISH * 4)
    first = perplexity.masked_windows(tokenizer, ids, 64, None, seed=3)
    again = perplexity.masked_windows(tokenizer, ids, 64, None, seed=3)
    other = perplexity.masked_windows(tokenizer, ids, 64, None, seed=4)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.labels, other.labels)
    assert (first.input_ids[:, 0] == tokenizer.cls_token_id).all() and (first.input_ids[:, -1] == tokenizer.sep_token_id).all()
    masked = first.labels != -100
    assert not masked[:, 0].any() and not masked[:, -1].any()
    assert 0.10 < masked.float().mean().item() < 0.20
    assert (first.input_ids[masked] == tokenizer.mask_token_id).float().mean().item() > 0.6  # 80% [MASK]


def test_masked_nll_equals_a_reference_on_the_masked_positions():
    model = tiny_model("bert")
    tokenizer = tiny_tokenizer("bert")
    batches = perplexity.masked_windows(tokenizer, perplexity.tokenize(tokenizer, ENGLISH * 2), 32, None, seed=0)
    result = perplexity.masked_nll(model, batches, batch_size=4)
    nll, count = 0.0, 0
    with torch.no_grad():
        for inputs, labels in zip(batches.input_ids, batches.labels):
            log_probs = F.log_softmax(model(input_ids=inputs[None]).logits[0].double(), -1)
            for position in (labels != -100).nonzero().flatten():
                nll -= log_probs[position, labels[position]].item()
                count += 1
    assert result.tokens == count
    assert result.mean == pytest.approx(nll / count, rel=1e-5)


def test_identical_models_compare_as_equal(trained_llama, tmp_path, text_file):
    out = tmp_path / "rpq"
    rpq(trained_llama, out)
    settings = EvalSettings(device=torch.device("cpu"), seq_len=32, latency=None)
    text = Text("english", str(text_file), [ENGLISH])
    result = evaluate(out, text, settings, baseline=str(out))  # the checkpoint against itself
    assert result.original.quality["perplexity"] == result.compressed.quality["perplexity"]
    assert result.original.quality["tokens_scored"] == result.compressed.quality["tokens_scored"] > 0
    from model_compress.eval.report import rows

    by_name = {row.name: row for row in rows(result)}
    assert by_name["perplexity"].ratio == 1.0 and by_name["weights in memory"].ratio == 1.0


def test_damaged_model_has_higher_perplexity(trained_llama, tmp_path, text_file):
    out = tmp_path / "rpq"
    rpq(trained_llama, out)
    weights = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if name.endswith(".indices"):
            weights[name] = torch.randint(0, 16, tensor.shape, generator=generator).to(tensor.dtype)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})

    result = run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--no-latency", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval_report.json").read_text())
    original, damaged = report["original"]["quality"]["perplexity"], report["compressed"]["quality"]["perplexity"]
    assert original < 60  # it learned the text (a random model sits near 320)
    assert damaged > 2 * original


def test_report_json_plot_and_table_have_every_figure(trained_llama, tmp_path, text_file):
    out = tmp_path / "rpq"
    rpq(trained_llama, out)
    json_path = tmp_path / "reports" / "r.json"
    result = run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--json", json_path, "--device", "cpu", *FAST_LATENCY)
    assert result.exit_code == 0, result.output
    for figure in ("perplexity", "prefill / forward, batch 1", "decode, batch 16", "bits per weight", "weights on disk"):
        assert figure in result.stdout
    assert "CPU timings are wall-clock and indicative only" in result.stdout
    report = json.loads(json_path.read_text())
    assert {"tool", "date", "device", "dtype", "versions", "text", "settings", "compression", "original", "compressed", "rows", "warnings"} <= report.keys()
    assert report["settings"]["latency"] == {"prompt_len": 32, "new_tokens": 8, "decode_batches": [1, 16], "warmup": 2, "repeats": 1}
    assert {"torch", "transformers"} <= report["versions"].keys() and report["device"]["type"] == "cpu"
    assert report["text"]["seq_len"] == 32 and report["text"]["windows"] * 32 == report["text"]["tokens_used"]
    assert report["compression"]["num_codebooks"] == 8
    for side in ("original", "compressed"):
        model = report[side]
        assert model["quality"]["perplexity"] > 1 and model["weight_bytes"] > 0 and model["disk_bytes"] > 0
        assert model["latency"]["prefill_ms"] > 0 and model["latency"]["prefill_tokens"] == 32
        assert set(model["latency"]["decode_tokens_per_s"]) == {"1", "16"} and model["latency"]["decode_new_tokens"] == 8
    assert report["compressed"]["bits_per_weight"] < report["original"]["bits_per_weight"] == 32
    ratios = {row["name"]: row["ratio"] for row in report["rows"]}
    assert ratios["weights in memory"] == pytest.approx(report["compressed"]["weight_bytes"] / report["original"]["weight_bytes"])
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_batch_sizes_and_no_latency(trained_llama, tmp_path, text_file):
    out = tmp_path / "rpq"
    rpq(trained_llama, out)
    result = run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--no-baseline", "--decode-batch", "2", *FAST_LATENCY)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval_report.json").read_text())
    assert report["original"] is None and set(report["compressed"]["latency"]["decode_tokens_per_s"]) == {"2"}
    result = run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--no-baseline", "--no-latency", "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "eval_report.json").read_text())["compressed"]["latency"] is None


def test_bert_with_mlm_head_reports_masked_lm_loss(tiny_folder, tmp_path, text_file):
    out = tmp_path / "bert-rpq"
    rpq(tiny_folder("bert"), out)
    result = run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--no-latency")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval_report.json").read_text())
    assert report["metric"] == "mlm" and report["compressed"]["quality"]["mlm_perplexity"] > 1
    assert report["original"]["quality"]["tokens_scored"] == report["compressed"]["quality"]["tokens_scored"]  # same masks

    asked = run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--metric", "perplexity", "--json", tmp_path / "p.json")
    assert_one_line_error(asked, "no causal LM head", "masked-LM loss instead")


def test_encoder_without_head_is_compared_by_embedding_similarity(tmp_path, text_file):
    folder = tmp_path / "bert-base"
    torch.manual_seed(0)
    transformers.BertModel(tiny_config("bert")).eval().save_pretrained(folder)
    tiny_tokenizer("bert").save_pretrained(folder)
    out = tmp_path / "bert-base-rpq"
    rpq(folder, out)
    result = run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--no-latency")
    assert result.exit_code == 0, result.output
    quality = json.loads((out / "eval_report.json").read_text())["compressed"]["quality"]
    assert -1 <= quality["cosine_min"] <= quality["cosine_mean"] < 0.99999 and quality["hidden_rel_error"] > 1e-4

    same = run_cli("eval", out, "--baseline", out, "--text", text_file, "--seq-len", "32", "--no-latency", "--force")
    assert same.exit_code == 0, same.output
    quality = json.loads((out / "eval_report.json").read_text())["compressed"]["quality"]
    assert quality["cosine_min"] == pytest.approx(1.0, abs=1e-6) and quality["hidden_rel_error"] == 0.0

    alone = run_cli("eval", out, "--no-baseline", "--text", text_file, "--json", tmp_path / "x.json")
    assert_one_line_error(alone, "no LM head", "--no-baseline")


def test_embedding_similarity_pools_only_real_tokens():
    tokenizer = tiny_tokenizer("bert")
    batches = similarity.sentence_batches(tokenizer, ENGLISH, 64, None, batch_size=4)
    model = transformers.BertModel(tiny_config("bert")).eval()
    outputs = similarity.embed(model, batches)
    sentence = similarity.split_sentences(ENGLISH)[1]
    alone = tokenizer([sentence], return_tensors="pt")
    with torch.no_grad():
        expected = model(**alone).last_hidden_state[0].mean(0)
    assert torch.allclose(outputs.pooled[1], expected, atol=1e-5)  # padding in its batch changed nothing
    assert outputs.hidden.shape[0] == batches.tokens


def test_an_unloadable_original_still_measures_the_compressed_model(trained_llama, tmp_path, text_file):
    out = tmp_path / "rpq"
    rpq(trained_llama, out)
    result = run_cli("eval", out, "--baseline", tmp_path / "gone", "--text", text_file, "--seq-len", "32", "--no-latency")
    assert result.exit_code == 0, result.output
    assert "the original could not be measured" in result.stdout and "--no-baseline" in result.stdout
    report = json.loads((out / "eval_report.json").read_text())
    assert report["original"] is None and "does not exist" in report["original_error"]
    assert report["compressed"]["quality"]["perplexity"] > 1


def test_the_recorded_original_is_found_and_a_moved_one_is_reported(trained_llama, tmp_path, text_file):
    source = tmp_path / "model"
    shutil.copytree(trained_llama, source)
    out = tmp_path / "rpq"
    rpq(source, out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["base_model"]["kind"] == "folder"
    found = run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--no-latency")
    assert found.exit_code == 0, found.output
    assert json.loads((out / "eval_report.json").read_text())["original"]["label"] == str(source.resolve())
    shutil.rmtree(source)
    result = run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--no-latency", "--force")
    assert result.exit_code == 0, result.output
    assert "no longer exists" in json.loads((out / "eval_report.json").read_text())["original_error"]


def test_bad_input_gives_one_clean_line(trained_llama, tmp_path, text_file):
    out = tmp_path / "rpq"
    rpq(trained_llama, out)
    fast = ["--text", text_file, "--seq-len", "32", "--no-latency"]
    assert_one_line_error(run_cli("eval", tmp_path / "nothing", *fast), "does not exist")
    assert_one_line_error(run_cli("eval", trained_llama, *fast), "not a model-compress checkpoint")
    assert_one_line_error(run_cli("eval", out, "--text", text_file, "--seq-len", "4096"), "longer than the model's context")
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert_one_line_error(run_cli("eval", out, "--text", short, "--seq-len", "32"), "fewer than one window of 32")
    assert_one_line_error(run_cli("eval", out, "--text", tmp_path / "missing.txt"), "does not exist")
    assert_one_line_error(run_cli("eval", out, "--text", text_file, "--dataset", "wikitext2"), "either --text or --dataset")
    assert_one_line_error(run_cli("eval", out, "--baseline", trained_llama, "--no-baseline", *fast), "not both")
    assert_one_line_error(run_cli("eval", out, "--metric", "bleu", *fast), "unknown --metric")
    assert_one_line_error(run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--new-tokens", "1"), "--new-tokens at least 2")
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli("eval", out, "--device", "cuda", *fast), "CUDA is not available")
    (out / "eval_report.json").write_text("{}")
    assert_one_line_error(run_cli("eval", out, *fast), "already exists", "--force")
    assert (out / "eval_report.json").read_text() == "{}"  # untouched


def test_hub_dataset_rows_are_joined_and_offline_is_a_clear_error(monkeypatch):
    fake = types.ModuleType("datasets")
    calls = []

    def load_dataset(repository, config, split):
        calls.append((repository, config, split))
        return {"text": [" = Title = \n", " First line .\n", "", " Second .\n"]}

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr("model_compress.core.text.hub_reachable", lambda: True)
    text = hub_text("wikitext2")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert text.joined == " = Title = \n\n\n First line .\n\n\n\n\n Second .\n"  # rows joined with "\n\n"
    monkeypatch.setattr("model_compress.core.text.hub_reachable", lambda: False)
    with pytest.raises(UserError, match="cannot be reached; pass --text FILE"):
        hub_text("wikitext2")


def test_the_default_text_is_the_packaged_wikipedia_sample():
    real_model_folder(DEFAULT_TEXT_PACKAGE, DEFAULT_TEXT_DISTRIBUTION)
    text = default_text()
    words = len(text.joined.split())
    assert len(text.documents) == 1095 and 250_000 < words < 350_000
    assert all("<doc" not in doc and "</doc>" not in doc for doc in text.documents)
    assert "sample" in text.name and text.to_json()["documents"] == 1095


def test_a_failure_inside_the_models_forward_is_one_line_naming_the_module(trained_llama, tmp_path, text_file, monkeypatch):
    """Whatever a model's own code raises mid-forward is one line naming the module; --debug gives the traceback."""
    out = tmp_path / "rpq"
    rpq(trained_llama, out)

    def broken(self, *args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (9x64 and 32x64)")

    monkeypatch.setattr(transformers.models.llama.modeling_llama.LlamaMLP, "forward", broken)
    args = ("eval", out, "--text", text_file, "--seq-len", "32", "--no-latency", "--device", "cpu")
    result = run_cli(*args)
    assert_one_line_error(result, "in model.layers.0.mlp (LlamaMLP): RuntimeError: mat1 and mat2 shapes cannot be multiplied", "--debug")
    assert not (out / "eval_report.json").exists()
    debugged = run_cli(*args, "--debug")
    assert debugged.exit_code == 1 and isinstance(debugged.exception, RuntimeError)
