"""A tiny local Hugging Face checkpoint for CLI tests: a randomly initialised Llama with its
own word-level tokenizer over a text's words, saved as a directory ``load_model`` reads."""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_checkpoint(d: Path, text: str, *, hidden: int, intermediate: int, layers: int,
                          heads: int, kv_heads: int) -> str:
    import tokenizers
    import transformers

    words = sorted(set(text.split()))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=hidden,
                                   intermediate_size=intermediate, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return str(d)
