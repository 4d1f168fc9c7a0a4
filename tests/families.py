"""Tiny random configs of the model families users compress most, for the coverage matrix (tests/test_families.py).

Each is two layers of width 64 with a 320-token vocabulary: seconds on a CPU, wide enough for K=16 codebooks
to save bytes. ``FAMILIES`` maps a family's name to (transformers model_type, the Auto class it loads with,
config overrides).
"""

from __future__ import annotations

import transformers

VOCAB, HIDDEN, FF, LAYERS, HEADS, KV_HEADS, POSITIONS = 320, 64, 128, 2, 4, 2, 128

DECODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS, max_position_embeddings=POSITIONS, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
ENCODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    max_position_embeddings=POSITIONS, pad_token_id=0,
)
CAUSAL, MASKED, SEQ2SEQ = "causal", "masked", "seq2seq"
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

FAMILIES: dict[str, tuple[str, str, dict]] = {
    "Llama": ("llama", CAUSAL, {**DECODER, "tie_word_embeddings": True}),
    "Mistral": ("mistral", CAUSAL, DECODER),
    "Mixtral": ("mixtral", CAUSAL, {**DECODER, **MOE}),
    "Qwen2": ("qwen2", CAUSAL, DECODER),
    "Qwen2-MoE": ("qwen2_moe", CAUSAL, {**DECODER, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                         "shared_expert_intermediate_size": 128}),
    "Qwen3": ("qwen3", CAUSAL, {**DECODER, "head_dim": 16}),
    "Gemma": ("gemma", CAUSAL, {**DECODER, "head_dim": 16}),
    "Gemma 2": ("gemma2", CAUSAL, {**DECODER, "head_dim": 16, "sliding_window": 64}),
    "Gemma 3 text": ("gemma3_text", CAUSAL, {**DECODER, "head_dim": 16, "sliding_window": 64}),
    "Phi-3": ("phi3", CAUSAL, DECODER),
    "Phi": ("phi", CAUSAL, DECODER),
    "GPT-2": ("gpt2", CAUSAL, dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS, bos_token_id=1, eos_token_id=2)),
    "GPT-J": ("gptj", CAUSAL, dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS, rotary_dim=8, bos_token_id=1, eos_token_id=2)),
    "GPT-NeoX": ("gpt_neox", CAUSAL, DECODER),
    "OPT": ("opt", CAUSAL, dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "Falcon": ("falcon", CAUSAL, dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                     new_decoder_architecture=True, num_kv_heads=KV_HEADS, bos_token_id=1, eos_token_id=2)),
    "StableLM": ("stablelm", CAUSAL, DECODER),
    "Starcoder2": ("starcoder2", CAUSAL, DECODER),
    "OLMo": ("olmo", CAUSAL, DECODER),
    "BERT": ("bert", MASKED, ENCODER),
    "RoBERTa": ("roberta", MASKED, {**ENCODER, "max_position_embeddings": POSITIONS + 2, "pad_token_id": 1}),
    "DistilBERT": ("distilbert", MASKED, dict(vocab_size=VOCAB, dim=HIDDEN, hidden_dim=FF, n_layers=LAYERS, n_heads=HEADS, max_position_embeddings=POSITIONS)),
    "ELECTRA": ("electra", MASKED, {**ENCODER, "embedding_size": HIDDEN}),
    # beyond the common families: embedding subclasses that scale their rows, or read their own .weight
    "BioGPT": ("biogpt", CAUSAL, {**DECODER, "scale_embedding": True}),
    "XGLM": ("xglm", CAUSAL, dict(vocab_size=VOCAB, d_model=HIDDEN, num_layers=LAYERS, attention_heads=HEADS, ffn_dim=FF,
                                 max_position_embeddings=POSITIONS, scale_embedding=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "TrOCR decoder": ("trocr", CAUSAL, dict(vocab_size=VOCAB, d_model=HIDDEN, decoder_layers=LAYERS, decoder_attention_heads=HEADS,
                                           decoder_ffn_dim=FF, max_position_embeddings=POSITIONS, use_learned_position_embeddings=True,
                                           scale_embedding=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "T5": ("t5", SEQ2SEQ, dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=FF, num_layers=LAYERS, num_heads=HEADS,
                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)),
}

# Families `compress rpq` refuses up front, with the line it gives.
REFUSED = {"T5": "model type t5: encoder-decoder models are not supported"}
# Layers a family's own code reads the .weight of: kept dense, with the reason the checkpoint records.
EXPECTED_DENSE = {"TrOCR decoder": {"model.decoder.embed_positions": "TrOCRLearnedPositionalEmbedding.forward reads .weight itself"}}
KNOWN_FAILURES: dict[str, str] = {}  # families that convert but wrongly: none
# Families fff-distill refuses up front: mixtures of experts (already sparse) and encoder-decoder models.
FFF_REFUSED = {
    "Mixtral": "model type mixtral: its feed-forward blocks are mixtures of 4 experts",
    "Qwen2-MoE": "model type qwen2_moe: its feed-forward blocks are mixtures of 4 experts",
    "T5": "model type t5: encoder-decoder models are not supported",
}
AUTO = {CAUSAL: transformers.AutoModelForCausalLM, MASKED: transformers.AutoModelForMaskedLM, SEQ2SEQ: transformers.AutoModelForSeq2SeqLM}


def family_config(family: str) -> transformers.PretrainedConfig:
    model_type, _, overrides = FAMILIES[family]
    return transformers.AutoConfig.for_model(model_type, **overrides)


def family_model(family: str, seed: int = 0):
    """A random model of ``family`` in eval mode, float32."""
    import torch

    torch.manual_seed(seed)
    return AUTO[FAMILIES[family][1]].from_config(family_config(family)).eval()
