"""A user's model and data as a test builds them offline: a tiny byte-level BPE GPT-2 saved
to a directory, and preference pairs / prompts of a task written as a user's files."""

import json
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast


def bpe_tokenizer(texts: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's kind) trained on `texts`: no unknown token, a
    pad token distinct from EOS, no BOS."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   eos_token="<eos>", padding_side="left")


def save_bpe_gpt2(task, path: str, seed: int = 0) -> PreTrainedTokenizerFast:
    """A random-init 2-layer GPT-2 (64 positions) and a BPE tokenizer trained on the task's
    SFT corpus, saved together in `path` (`save_pretrained`); returns the tokenizer."""
    corpus = [f"{p} {r}" for p, r in task.sft_corpus(2000, random.Random(seed))]
    tok = bpe_tokenizer(corpus)
    torch.manual_seed(seed)  # the same random weights whatever ran before
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32,
                                       n_layer=2, n_head=2, eos_token_id=tok.eos_token_id,
                                       bos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def write_task_pairs(task, path: str, n: int, seed: int = 0) -> str:
    """`n` pairs of the task's corpus responses, the better one under gold chosen, as a
    JSONL file in TRL's explicit-prompt format (responses start with a space), no gold."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            prompt = task.sample_prompt(rng)
            a, b = (task.sample_response(prompt, rng) for _ in range(2))
            if task.gold(prompt, a) < task.gold(prompt, b):
                a, b = b, a
            fh.write(json.dumps({"prompt": prompt, "chosen": f" {a}", "rejected": f" {b}"})
                     + "\n")
    return path


if __name__ == "__main__":  # python tests/user_data.py DIR: DIR/gpt2, DIR/pairs.jsonl, DIR/prompts.txt
    import os
    import sys

    from rlhf_toy.tasks import get_task

    out, task = sys.argv[1], get_task("sentiment")
    os.makedirs(out, exist_ok=True)
    save_bpe_gpt2(task, os.path.join(out, "gpt2"))
    write_task_pairs(task, os.path.join(out, "pairs.jsonl"), 2000)
    with open(os.path.join(out, "prompts.txt"), "w") as fh:
        fh.write("\n".join(task.sample_prompts(500, random.Random(1))) + "\n")
    print(out)
