"""Tiny random models, one per supported architecture, built from transformers config classes."""

import torch
import transformers as tf

VOCAB = 96


def _common(**kw):
    return dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


BUILDERS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_common(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_common(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=None))),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_common(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_common(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, hidden_activation="gelu_pytorch_tanh"))),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_common(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))),
    "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**_common(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4))),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(**_common(
        hidden_size=48, ffn_dim=80, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=48,
        max_position_embeddings=128))),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_common(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4))),
    # Gemma-3 text: GeGLU, interleaved sliding-window / global attention layers, q/k norms
    "gemma3_text": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_common(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, hidden_activation="gelu_pytorch_tanh", sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128))),
    # the same Llama with biases on its MLP projections (mlp_bias=True)
    "llama_mlp_bias": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_common(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        mlp_bias=True))),
}

# builder key -> model_type it covers (the meta-test checks every supported architecture is here)
COVERS = {k: k for k in BUILDERS}
COVERS["llama_mlp_bias"] = "llama"


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval()
    # random init is tiny; scale so activations are not all near zero and thresholds bite
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    return model


def save_hf_dir(path, name: str = "llama", seed: int = 0):
    """A tiny model + a word-level tokenizer saved as a Hugging Face directory (for CLI tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("the of and to in a is was on for as with by at from that it his an were are which this be "
             "first new after he had also one their or two its has but not been city film time other all "
             "into war during most only while who more she year season over when made used up three game "
             "several later him her between some years later early being known state part north both").split()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        if w not in vocab and len(vocab) < VOCAB:
            vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    model = build(name, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
