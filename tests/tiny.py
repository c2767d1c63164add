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
