"""Small local Hugging Face checkpoints for the `--model_name_or_path` tests, built offline.

Both tokenizers are trained with `tokenizers` on the default (sentiment) task's SFT corpus,
and both models come from configs with random weights; `save_pretrained` writes them to a
directory that the stages then load the real way (`from_pretrained(dir)`).

- `save_gpt2`: a `GPT2LMHeadModel` with a byte-level BPE tokenizer whose one special token
  `<|endoftext|>` is BOS, EOS and UNK, with no pad token and right padding (GPT-2's own
  layout), and GPT-2's default dropout of 0.1 (loading must switch it off).
- `save_llama`: a `LlamaForCausalLM` (grouped-query attention, untied head) with a
  Metaspace/BPE tokenizer (SentencePiece-style) that adds `<s>` in front of every text,
  `</s>` as EOS, no pad token and left padding.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rlhf_toy.tasks import get_task

EOT = "<|endoftext|>"
CONTEXT = 64  # positions: the sentiment task's prompts (BPE tokens) + 16 new tokens fit


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """`n` lines of the sentiment task's SFT corpus (prompt and completion joined)."""
    pairs = get_task("sentiment").sft_corpus(n, random.Random(seed))
    return [f"{p} {c}" for p, c in pairs]


def byte_level_tokenizer(lines: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """GPT-2's kind of tokenizer: byte-level BPE, one special token, no pad token."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT,
                                   unk_token=EOT, padding_side="right")


def metaspace_tokenizer(lines: list[str], vocab_size: int = 120) -> PreTrainedTokenizerFast:
    """Llama's kind of tokenizer: Metaspace + BPE with `<unk>`, `<s>`, `</s>`; `<s>` is
    added in front of every text by default; no pad token."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def save_gpt2(path: str, lines: list[str]) -> str:
    """A tiny GPT-2 and its byte-level tokenizer, saved to `path`."""
    tokenizer = byte_level_tokenizer(lines)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=32, n_layer=2,
                        n_head=2, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)  # dropout: GPT-2's 0.1
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_llama(path: str, lines: list[str]) -> str:
    """A tiny Llama and its Metaspace/BPE tokenizer, saved to `path`."""
    tokenizer = metaspace_tokenizer(lines)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=CONTEXT, attention_dropout=0.1,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":  # python tests/hf_models.py DIR: DIR/gpt2 and DIR/llama
    import sys

    import torch

    torch.manual_seed(0)
    lines = corpus()
    for name, save in (("gpt2", save_gpt2), ("llama", save_llama)):
        print(save(f"{sys.argv[1]}/{name}", lines))
