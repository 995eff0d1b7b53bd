"""An offline word-level tokenizer built from a task's vocabulary, and loading any saved
tokenizer as it comes (`--model_name_or_path`).

Ids 0..3 are the special tokens; the pad token is distinct from EOS. No BOS is added to
prompts (as in TRL's preference format); it exists for completeness of the GPT-2 config.

A loaded tokenizer without a pad token pads with its EOS (as TRL does). That is safe here
because no mask is ever computed from `ids == pad_token_id`: masks come from lengths, so a
response's own EOS keeps mask 1 (and carries the score) even where pad and EOS are one id.
Padding sides are set by each call (prompts left, responses right), never read from the
tokenizer. A tokenizer that adds a BOS by default gets it at the start of every prompt
(`rollout.encode_prompts`).
"""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rlhf_toy.errors import UsageError
from rlhf_toy.integrity import read_json_file

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def build_tokenizer(words: tuple[str, ...] | list[str]) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` over `words` (split on whitespace), specials first."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=UNK, padding_side="left")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Reload a tokenizer written by `save_pretrained` (no network); it must be a fast
    tokenizer (`tokenizer.json`), which needs no conversion, and have an EOS token (every
    response ends with it). Without a pad token, EOS pads (see the module docstring)."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise UsageError(f"checkpoint {path!r} holds no tokenizer (tokenizer.json missing)")
    for name in ("config.json", "tokenizer_config.json"):  # read by AutoTokenizer
        if os.path.isfile(os.path.join(path, name)):
            read_json_file(os.path.join(path, name), f"checkpoint {path!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"the tokenizer in {path!r} cannot be loaded ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer in {path!r} has no EOS token (eos_token in "
                         "tokenizer_config.json): every response must end with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
