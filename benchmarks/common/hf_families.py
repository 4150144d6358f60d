"""Tiny random-initialised Hugging Face `transformers` models, one per family, built from their
config classes (nothing downloaded), with an example batch of the inputs each takes: the cases of
`benchmarks.hf_zoo` and of the transformers tests."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# per family: (model class name, config class name, config keywords, kind of input)
TEXT, IMAGE = "text", "image"
_LAYERS = dict(num_hidden_layers=2, num_attention_heads=4)
_ENCODER = dict(hidden_size=32, intermediate_size=64, max_position_embeddings=64, **_LAYERS)
_DECODER = dict(hidden_size=32, intermediate_size=64, max_position_embeddings=64,
                num_key_value_heads=2, **_LAYERS)
_VISION = dict(hidden_size=32, intermediate_size=64, image_size=32, patch_size=8, **_LAYERS)

FAMILIES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "bert": ("BertForSequenceClassification", "BertConfig", dict(num_labels=3, **_ENCODER), TEXT),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig",
                dict(num_labels=3, pad_token_id=1, **_ENCODER), TEXT),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(num_labels=3, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                        max_position_embeddings=64), TEXT),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig",
                dict(num_labels=3, embedding_size=32, **_ENCODER), TEXT),
    "modernbert": ("ModernBertForSequenceClassification", "ModernBertConfig",
                   dict(num_labels=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), TEXT),
    "deberta_v2": ("DebertaV2ForSequenceClassification", "DebertaV2Config",
                   dict(num_labels=3, **_ENCODER), TEXT),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                  eos_token_id=0), TEXT),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
                 dict(hidden_size=32, intermediate_size=64, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, **_LAYERS), TEXT),
    "opt": ("OPTForCausalLM", "OPTConfig",
            dict(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64,
                 pad_token_id=1, bos_token_id=0, eos_token_id=0, **_LAYERS), TEXT),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_DECODER), TEXT),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_DECODER), TEXT),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_DECODER), TEXT),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=8, **_DECODER), TEXT),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(head_dim=8, **_DECODER), TEXT),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict(_DECODER), TEXT),
    "phi3": ("Phi3ForCausalLM", "Phi3Config",
             dict(pad_token_id=0, bos_token_id=0, eos_token_id=0, **_DECODER), TEXT),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", dict(_DECODER), TEXT),
    "vit": ("ViTForImageClassification", "ViTConfig", dict(num_labels=3, **_VISION), IMAGE),
    "deit": ("DeiTForImageClassification", "DeiTConfig", dict(num_labels=3, **_VISION), IMAGE),
    "beit": ("BeitForImageClassification", "BeitConfig",
             dict(num_labels=3, use_relative_position_bias=True, **_VISION), IMAGE),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config",
               dict(num_labels=3, hidden_size=32, image_size=32, patch_size=8, mlp_ratio=2,
                    **_LAYERS), IMAGE),
    "swin": ("SwinForImageClassification", "SwinConfig",
             dict(num_labels=3, image_size=32, patch_size=2, embed_dim=16, depths=[1, 1],
                  num_heads=[2, 4], window_size=4), IMAGE),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig",
                 dict(num_labels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                      image_size=32), IMAGE),
    "clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", dict(_VISION), IMAGE),
    "resnet": ("ResNetForImageClassification", "ResNetConfig",
               dict(num_labels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]), IMAGE),
}
VOCAB = 99


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """The family's tiny model, random weights from `seed`, in eval mode."""
    import transformers

    model_class, config_class, keywords, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(**keywords)
    if hasattr(config, "vocab_size"):
        config.vocab_size = VOCAB
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()


def batch(family: str, size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """An example batch of `size` inputs as the family's forward takes them."""
    generator = torch.Generator().manual_seed(seed)
    if FAMILIES[family][3] == IMAGE:
        return {"pixel_values": torch.randn(size, 3, 32, 32, generator=generator)}
    ids = torch.randint(3, VOCAB, (size, 12), generator=generator)
    mask = torch.ones(size, 12, dtype=torch.long)
    mask[0, -3:] = 0  # one padded sequence
    return {"input_ids": ids, "attention_mask": mask}


def logits(output: Any) -> torch.Tensor:
    """The tensor a family's output is judged by: `logits`, else the last hidden state."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    raise KeyError(f"no logits or last_hidden_state in {type(output).__name__}")


def builders() -> dict[str, Callable[[int], torch.nn.Module]]:
    return {family: (lambda seed, f=family: build(f, seed)) for family in FAMILIES}
