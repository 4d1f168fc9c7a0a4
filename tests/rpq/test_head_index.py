"""The product-quantized head index: approximate scores are the decoded rows' scores, the certificate never accepts a
shortlist that misses the dense argmax (adversarial rows included), data-aware clustering lowers the expected score
error, and a certified head gives ``generate`` the same greedy tokens as the dense head."""

from __future__ import annotations

import torch
import transformers

from model_compress.rpq.head_index.index import build_index
from model_compress.rpq.head_index.attach import attach, attach_stored, detach, index_head, save_index
from model_compress.rpq.head_index.search import certified_shortlists

from ..conftest import tiny_config


def dense_exact(weight: torch.Tensor, bias: torch.Tensor | None = None):
    return lambda x, ids: weight[ids] @ x + (0 if bias is None else bias[ids])


def test_approximate_scores_are_the_decoded_rows_scores_and_the_row_bound_holds():
    weight = torch.randn(500, 64)
    index = build_index(weight, subspaces=16, centroids=16)
    x = torch.randn(7, 64)
    torch.testing.assert_close(index.approximate_scores(x), x @ index.decoded_rows().T, rtol=1e-5, atol=1e-5)
    gap = (x @ weight.T - index.approximate_scores(x)).abs()
    assert (gap <= x.norm(dim=1, keepdim=True) * index.row_error + 1e-4).all()
    torch.testing.assert_close(index.row_error, (weight - index.decoded_rows()).norm(dim=1))


def test_the_metric_bound_holds_for_any_hidden_state_and_is_tighter_on_states_like_the_calibrations():
    torch.manual_seed(4)
    scales = torch.tensor([0.3, 1.0, 3.0, 30.0]).repeat(8)
    calibration = torch.randn(3000, 32) * scales
    weight = torch.randn(800, 32)
    index = build_index(weight, subspaces=8, centroids=16, hidden_states=calibration)
    assert index.metric_inverse is not None
    residual = weight - index.decoded_rows()
    plain = lambda x: x.norm(dim=1, keepdim=True) * index.row_error[None]  # noqa: E731
    for x in (torch.randn(200, 32) * scales, torch.randn(200, 32) * 30, torch.randn(200, 32) * scales.flip(0)):
        assert ((x @ residual.T).abs() <= index.error_bounds(x) + 1e-4).all()  # like the calibration or not: a bound
    alike = torch.randn(200, 32) * scales
    assert index.error_bounds(alike).mean() < 0.7 * plain(alike).mean()


def test_the_certified_best_row_is_always_the_dense_argmax():
    torch.manual_seed(0)
    weight, bias = torch.randn(3000, 32), torch.randn(3000)
    index = build_index(weight, subspaces=8, centroids=16)  # coarse: large approximation errors, shortlists must widen
    x = torch.randn(40, 32) * 3
    lists = certified_shortlists(x, index, dense_exact(weight, bias), bias, first_rows=8)
    dense = (x @ weight.T + bias).argmax(dim=1)
    assert [shortlist.best for shortlist in lists] == dense.tolist()
    assert any(len(shortlist.rows) > 8 for shortlist in lists)  # some had to widen


def test_a_batch_certified_at_once_gives_the_same_shortlists_as_one_position_at_a_time():
    torch.manual_seed(5)
    weight, bias = torch.randn(2000, 32), torch.randn(2000)
    index = build_index(weight, subspaces=16, centroids=32, hidden_states=torch.randn(1000, 32))
    x = torch.randn(12, 32) * 2

    def batch(rows, ids):
        return torch.einsum("bkd,bd->bk", weight[ids], rows) + bias[ids]

    one_by_one = certified_shortlists(x, index, dense_exact(weight, bias), bias, first_rows=16)
    at_once = certified_shortlists(x, index, dense_exact(weight, bias), bias, first_rows=16, exact_batch=batch)
    assert [s.best for s in at_once] == [s.best for s in one_by_one] == (x @ weight.T + bias).argmax(dim=1).tolist()
    assert [len(s.rows) for s in at_once] == [len(s.rows) for s in one_by_one]


def test_a_row_the_index_approximates_badly_is_still_found():
    torch.manual_seed(1)
    weight = torch.randn(2000, 32)
    index = build_index(weight, subspaces=8, centroids=32)
    x = torch.randn(32)
    hidden = weight.clone()
    target = int((x @ index.decoded_rows().T).argmin())  # the row the index ranks last
    hidden[target] = x / x.norm() * (weight.norm(dim=1).max() * 1.5)  # now the best row by far, exactly
    index.row_error = (hidden - index.decoded_rows()).norm(dim=1)  # its bound stays true
    index.largest_row_norm = float(hidden.norm(dim=1).max())
    (shortlist,) = certified_shortlists(x[None], index, dense_exact(hidden), None, first_rows=4)
    assert shortlist.best == target


def test_two_rows_within_rounding_of_each_other_do_not_certify_a_wrong_one():
    weight = torch.randn(300, 16)
    x = torch.randn(16)
    weight[11] = x / x.norm() * 10
    weight[12] = weight[11] * (1 + 1e-7)  # a near tie, decided by the exact products
    index = build_index(weight, subspaces=4, centroids=8)
    (shortlist,) = certified_shortlists(x[None], index, dense_exact(weight), None, first_rows=2)
    assert shortlist.best == int((weight @ x).argmax())


def test_data_aware_clustering_lowers_the_expected_score_error_on_anisotropic_hidden_states():
    torch.manual_seed(2)
    scales = torch.tensor([1.0, 3.0, 10.0, 30.0]).repeat(8)  # anisotropic within each subspace of 4
    hidden = torch.randn(4000, 32) * scales
    moment = hidden.T @ hidden / hidden.shape[0]
    weight = torch.randn(1000, 32)
    errors = {}
    for name, given in (("plain", None), ("data-aware", moment)):
        index = build_index(weight, subspaces=8, centroids=16, hidden_moment=given)
        errors[name] = ((hidden[:500] @ (weight - index.decoded_rows()).T) ** 2).mean().item()
    assert errors["data-aware"] < 0.8 * errors["plain"], errors


def untied_model_and_prompt():
    """A tiny Llama with its own head (seeded) and a prompt of two rows."""
    config = tiny_config("llama")
    config.tie_word_embeddings = False
    torch.manual_seed(3)
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, config.vocab_size, (2, 5))


def test_generate_with_a_certified_head_gives_the_dense_heads_greedy_tokens():
    model, prompt = untied_model_and_prompt()
    config = model.config
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
        head = attach(model, build_index(model.lm_head.weight, subspaces=8, centroids=16), first_rows=4)
        got = model.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.isinf(model(prompt).logits).any()  # answered from shortlists
        head.full_logits = True
        assert torch.isfinite(model(prompt).logits).all()
    assert torch.equal(got, expected)
    assert head.positions > 0
    assert set(model.state_dict()) == set(transformers.LlamaForCausalLM(config).state_dict())  # names unchanged


def test_an_index_saved_beside_a_checkpoint_comes_back_with_model_compress_load(tmp_path):
    import model_compress
    from model_compress.rpq.convert import RPQSettings
    from model_compress.rpq.pipeline import CalibrationOptions, compress_rpq

    from ..conftest import tiny_model, tiny_tokenizer

    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source)
    tiny_tokenizer("llama").save_pretrained(source)
    run = compress_rpq(str(source), tmp_path / "out", RPQSettings(bits=4.5), calibration=CalibrationOptions(tokens=512))
    model = run.model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 6))
    hidden = []
    grab = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: hidden.append(args[0].detach()))
    with torch.no_grad():
        model(prompt)
    grab.remove()
    certified = index_head(model, hidden[0].reshape(-1, hidden[0].shape[-1]), piece=2, first_rows=4)
    save_index(tmp_path / "out", certified)
    with torch.no_grad():
        attached_logits = model(prompt).logits
        detach(model)
        dense = model(prompt).logits
    loaded = model_compress.load(tmp_path / "out").eval()
    assert attached_logits.argmax(-1).tolist() == dense.argmax(-1).tolist()
    with torch.no_grad():
        again = loaded(prompt).logits
    assert torch.isinf(again).any() and again.argmax(-1).tolist() == dense.argmax(-1).tolist()
    assert attach_stored(loaded, tmp_path / "source") is None  # no index there


def test_a_fixed_shortlist_certifies_only_positions_whose_best_is_the_dense_argmax():
    from model_compress.rpq.head_index.search import fixed_shortlists

    torch.manual_seed(6)
    weight, bias = torch.randn(3000, 32), torch.randn(3000)
    index = build_index(weight, subspaces=8, centroids=16)  # coarse: a short fixed list often misses
    x = torch.randn(200, 32) * 3

    def batch(rows, ids):
        return torch.einsum("bkd,bd->bk", weight[ids], rows) + bias[ids]

    dense = (x @ weight.T + bias).argmax(dim=1)
    outcomes = set()
    for rows in (4, 64, 2999, 5000):
        ids, logits, certified = fixed_shortlists(x, index, batch, rows, bias)
        assert ids.shape == logits.shape == (200, min(rows, 3000))
        found = ids.gather(1, logits.argmax(dim=1, keepdim=True))[:, 0]
        assert (found[certified] == dense[certified]).all()  # a certified position is never wrong
        outcomes.update(certified.tolist())
    assert outcomes == {True, False}  # short lists leave some positions uncertified, longer ones certify


def test_a_head_answering_from_fixed_shortlists_gives_full_width_logits_and_counts_what_it_did_not_certify():
    model, prompt = untied_model_and_prompt()
    config = model.config
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
        head = attach(model, build_index(model.lm_head.weight, subspaces=8, centroids=16), first_rows=4)
        head.fixed_rows = config.vocab_size  # every row: certified, so greedy decoding is the dense one's
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)
        positions, uncertified = head.fixed_counts()
        assert positions > 0 and uncertified == 0
        assert head.fixed_counts() == (0, 0)  # read and reset
        head.fixed_rows = 1  # one row per position: rarely certified, and counted
        logits = model(prompt).logits
        assert logits.shape == (2, 5, config.vocab_size) and (torch.isfinite(logits).sum(-1) == 1).all()
        positions, uncertified = head.fixed_counts()
        assert positions == 10 and uncertified > 0
    head._fixed_counts.clear()
    with torch.inference_mode():  # counts first made inside inference mode are still read and reset outside it
        model(prompt)
    assert head.fixed_counts() == (10, uncertified) and head.fixed_counts() == (0, 0)


def test_an_index_built_chunk_by_chunk_equals_one_built_whole(monkeypatch):
    from model_compress.rpq.head_index import index as index_module

    torch.manual_seed(7)
    weight, calibration = torch.randn(500, 32), torch.randn(600, 32) * torch.linspace(0.5, 4, 32)
    whole = build_index(weight, subspaces=8, centroids=16, hidden_states=calibration)
    monkeypatch.setattr(index_module, "RESIDUAL_CHUNK_BYTES", 8 * 32 * 7)  # 7 rows at a time
    chunked = build_index(weight, subspaces=8, centroids=16, hidden_states=calibration)
    for name in ("codes", "row_error", "metric_error", "metric_inverse"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
