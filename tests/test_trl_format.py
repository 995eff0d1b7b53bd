"""The pairs we write load into TRL as they are: TRL 1.16's DPOTrainer tokenizes them token
for token as we do, for `rlhf-toy prefs` data and for a user's TRL-format file (explicit
prompt and conversational)."""

import copy
import json
import os
import random

import pytest
import torch
from datasets import Dataset
from user_data import bpe_tokenizer

from rlhf_toy.data import load_preferences, tokenize_pairs
from rlhf_toy.datafiles import load_preference_file
from rlhf_toy.models import build_policy
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import build_tokenizer, load_tokenizer

N_PAIRS = 64  # a slice of the tiny run's pairs: TRL tokenizes row by row


def trl_tokens(tokenizer, data: Dataset) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) of every row as TRL 1.16's DPOTrainer
    prepares them (EOS appended to string responses; prompt + response tokenized as one
    string and split where it leaves the tokenized prompt)."""
    pytest.importorskip("trl")
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    torch.manual_seed(0)
    model = build_policy(tokenizer)
    args = TRLDPOConfig(output_dir="unused", use_cpu=True, bf16=False,
                        activation_checkpointing=False, report_to=[], save_strategy="no")
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=data, processing_class=tokenizer)
    return [(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"])
            for ex in trainer.train_dataset]


def our_tokens(tokenizer, data) -> list[tuple[list[int], list[int], list[int]]]:
    """The same triples from `data.tokenize_pairs` (what reward and dpo train on), with the
    padding taken off: prompts left-padded, responses right-padded with EOS appended."""
    c = tokenize_pairs(tokenizer, data["prompt"], data["chosen"])
    r = tokenize_pairs(tokenizer, data["prompt"], data["rejected"])

    def real(ids, mask):
        return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]

    return list(zip(real(c["prompt_ids"], c["prompt_mask"]),
                    real(c["response_ids"], c["response_mask"]),
                    real(r["response_ids"], r["response_mask"]), strict=True))


@pytest.fixture(scope="module")
def prefs(tiny_run):
    """The first N_PAIRS training pairs of the tiny run (as `rlhf-toy prefs` wrote them)
    and the SFT tokenizer."""
    out, _ = tiny_run
    data = load_preferences(os.path.join(out, "prefs"))["train"].select(range(N_PAIRS))
    return data.select_columns(["prompt", "chosen", "rejected"]), load_tokenizer(
        os.path.join(out, "sft"))


def test_written_pairs_start_responses_with_a_space(prefs):
    data, _ = prefs
    assert all(x.startswith(" ") for col in ("chosen", "rejected") for x in data[col])


def test_the_leading_space_leaves_our_ids_unchanged(prefs):
    """The word-level tokenizer splits on whitespace: " very good ." and "very good ." give
    the same ids, so the default pipeline trains on exactly the tokens it did before."""
    data, tok = prefs
    stripped = {c: [x.lstrip(" ") for x in data[c]] for c in ("chosen", "rejected")}
    for col in ("chosen", "rejected"):
        with_space = tokenize_pairs(tok, data["prompt"], data[col])
        without = tokenize_pairs(tok, data["prompt"], stripped[col])
        for key in with_space:
            assert torch.equal(with_space[key], without[key]), (col, key)


def test_trl_tokenizes_our_pairs_as_we_do(prefs):
    """Token for token on 64 pairs; without the leading space TRL's join glues the prompt's
    last word to the response's first ("was" + "very" -> "wasvery" -> [UNK]), the bug this
    format avoids."""
    data, tok = prefs
    ours = our_tokens(tok, data)
    assert trl_tokens(tok, data) == ours
    glued = Dataset.from_dict({"prompt": list(data["prompt"]),
                               **{c: [x.lstrip(" ") for x in data[c]]
                                  for c in ("chosen", "rejected")}})
    trl_glued = trl_tokens(tok, glued)
    differ = sum(a != b for a, b in zip(trl_glued, ours, strict=True))
    assert differ == N_PAIRS  # every pair
    assert any(tok.unk_token_id in p + c for p, c, _ in trl_glued)


def test_trl_tokenizes_our_pairs_as_we_do_with_a_bpe_tokenizer(prefs):
    """The same with a byte-level BPE tokenizer (GPT-2's kind, no unknown token), where
    the leading space is part of the response's first token ("Ġvery")."""
    data, _ = prefs
    task = get_task("sentiment")
    tok = bpe_tokenizer([f"{p} {r}" for p, r in task.sft_corpus(2000, random.Random(0))])
    assert tok.tokenize(" very good .")[0] == "Ġvery"
    assert trl_tokens(tok, data) == our_tokens(tok, data)


def test_trl_tokenizes_a_users_file_as_we_do(tmp_path):
    """A user's JSONL file, explicit-prompt and conversational (a chat template whose
    assistant turn ends with EOS): what we load and tokenize equals TRL's tokenization of
    the same file's rows."""
    tok = build_tokenizer([*get_task("sentiment").words, "user:", "assistant:"])
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}user: {{ m.content }} "
                         "{% else %}assistant: {{ m.content }}{{ eos_token }}{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    explicit = [{"prompt": "the movie was", "chosen": " very good .", "rejected": " bad ."},
                {"prompt": "the plot is", "chosen": " fun !", "rejected": " not good but long ."},
                {"prompt": "the cast felt", "chosen": " brilliant .", "rejected": " dull ."}]
    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]}
            for r in explicit]
    for name, rows in (("explicit", explicit), ("chat", chat)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        loaded = load_preference_file(str(path), tok, 0.34, seed=0)
        ours = sorted(zip(list(loaded["train"]["row"]) + list(loaded["test"]["row"]),
                          our_tokens(tok, loaded["train"]) + our_tokens(tok, loaded["test"]),
                          strict=True))
        theirs = trl_tokens(tok, Dataset.from_list(rows))
        assert [t for _, t in ours] == theirs, name
    assert theirs[0][0] == tok("user: the movie was assistant:")["input_ids"]
