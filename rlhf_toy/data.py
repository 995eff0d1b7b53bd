"""Generated datasets: the SFT corpus and preference pairs (TRL's column names).

Preference labels come from the hidden gold reward through a Bradley-Terry draw,

    P(a preferred over b) = sigmoid((gold(a) - gold(b)) / label_temperature),

so labels are noisy and the reward model learned from them is only a proxy.
"""

from __future__ import annotations

import logging
import math
import os
import random

import torch
from datasets import Dataset, DatasetDict, load_from_disk

from rlhf_toy.errors import UsageError
from rlhf_toy.evaluate import SamplingArgs, sample_batched

logger = logging.getLogger(__name__)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
GOLD_COLUMNS = ("chosen_gold", "rejected_gold")


def sft_dataset(task, n: int, seed: int) -> Dataset:
    """`n` generated (prompt, completion) examples, TRL's prompt-completion format."""
    pairs = task.sft_corpus(n, random.Random(seed))
    return Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})


def bradley_terry_labels(gold_a: list[float], gold_b: list[float], temperature: float,
                         seed: int) -> tuple[list[bool], list[float]]:
    """Draw `a preferred over b` for each pair; returns (labels, P(a > b))."""
    rng = random.Random(seed)
    probs = [1.0 / (1.0 + math.exp(-(a - b) / temperature)) for a, b in zip(gold_a, gold_b,
                                                                          strict=True)]
    return [rng.random() < p for p in probs], probs


def build_preferences(policy, tokenizer, task, n_pairs: int, test_fraction: float,
                      label_temperature: float, sampling: SamplingArgs, seed: int) -> DatasetDict:
    """Sample two responses per fresh prompt from `policy` and label them by the gold reward.

    Returns:
        DatasetDict with `train` and `test` splits and string columns `prompt`, `chosen`,
        `rejected`, plus floats `chosen_gold`, `rejected_gold`, `p_chosen` (the
        Bradley-Terry probability of the label that was drawn). Responses start with a
        space: TRL's `DPOTrainer` tokenizes `prompt + response` as one string, and the
        space keeps the prompt's last word and the response's first apart (the word-level
        tokenizer splits on whitespace, so our own tokens are the same with or without it).
    """
    prompts = task.sample_prompts(n_pairs, random.Random(seed))
    _, resp_a = sample_batched(policy, tokenizer, prompts, sampling, seed=seed)
    _, resp_b = sample_batched(policy, tokenizer, prompts, sampling, seed=seed + 1)
    gold_a, gold_b = task.gold_batch(prompts, resp_a), task.gold_batch(prompts, resp_b)
    labels, probs = bradley_terry_labels(gold_a, gold_b, label_temperature, seed)
    rows = {"prompt": prompts, "chosen": [], "rejected": [], "chosen_gold": [],
            "rejected_gold": [], "p_chosen": []}
    for a, b, ga, gb, a_wins, p in zip([" " + r for r in resp_a], [" " + r for r in resp_b],
                                       gold_a, gold_b, labels, probs, strict=True):
        rows["chosen"].append(a if a_wins else b)
        rows["rejected"].append(b if a_wins else a)
        rows["chosen_gold"].append(ga if a_wins else gb)
        rows["rejected_gold"].append(gb if a_wins else ga)
        rows["p_chosen"].append(p if a_wins else 1.0 - p)
    n_test = max(1, int(round(n_pairs * test_fraction)))
    data = Dataset.from_dict(rows)
    return DatasetDict(train=data.select(range(n_pairs - n_test)),
                       test=data.select(range(n_pairs - n_test, n_pairs)))


def load_preferences(path: str) -> DatasetDict:
    """Load a preference dataset written by `rlhf-toy prefs` and check its shape and rows.

    Raises:
        UsageError: missing directory, missing split or column, an empty split, a file that
            cannot be read (truncated), a row that is not three strings with a prompt, or a
            split whose pairs carry no preference (every `chosen` empty or equal to
            `rejected`).
    """
    if not os.path.isdir(path):
        raise UsageError(f"prefs_dir {path!r} does not exist (run `rlhf-toy prefs` first)")
    from rlhf_toy.integrity import verify_manifest

    verify_manifest(path, f"preference dataset {path!r}")
    try:
        data = load_from_disk(path)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"prefs_dir {path!r} holds no datasets dataset ({exc})") from None
    except IndexError:  # `datasets` writes no shard for an empty split, then cannot load it
        raise UsageError(f"preference dataset {path!r} has an empty split") from None
    except Exception as exc:  # noqa: BLE001 - a cut or corrupted arrow file, any reader error
        raise UsageError(f"preference dataset {path!r} cannot be read (truncated or corrupted: "
                         f"{type(exc).__name__})") from None
    if not isinstance(data, DatasetDict) or not {"train", "test"} <= set(data):
        raise UsageError(f"preference dataset {path!r} must have 'train' and 'test' splits")
    for split in ("train", "test"):
        missing = [c for c in PREFERENCE_COLUMNS if c not in data[split].column_names]
        if missing:
            raise UsageError(f"preference dataset {path!r} ({split}) lacks column "
                             f"{missing[0]!r}; needs {list(PREFERENCE_COLUMNS)}")
        if len(data[split]) == 0:
            raise UsageError(f"preference dataset {path!r} has an empty {split!r} split")
        check_preference_rows(data[split], f"preference dataset {path!r} ({split})")
    return data


def check_preference_rows(split: Dataset, what: str) -> None:
    """Every row holds three strings and a non-empty prompt; pairs carry a preference."""
    try:
        columns = {c: split[c] for c in PREFERENCE_COLUMNS}
    except Exception as exc:  # noqa: BLE001 - a cut arrow file fails when it is read
        raise UsageError(f"{what} cannot be read (truncated or corrupted: "
                         f"{type(exc).__name__})") from None
    for name, values in columns.items():
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise UsageError(f"{what} row {i}: {name!r} must be a string (got {value!r})")
    for i, prompt in enumerate(columns["prompt"]):
        if not prompt.strip():
            raise UsageError(f"{what} row {i}: 'prompt' must not be empty")
    n = len(columns["prompt"])
    same = sum(c == r for c, r in zip(columns["chosen"], columns["rejected"], strict=True))
    if all(not c.strip() for c in columns["chosen"]):
        raise UsageError(f"{what}: every 'chosen' response is empty; the pairs teach nothing")
    if same == n:
        raise UsageError(f"{what}: every pair has chosen == rejected; the pairs teach nothing")
    if same:
        logger.warning("%s: %d of %d pairs have chosen == rejected (no preference; they "
                       "only add noise)", what, same, n)


def has_gold(data: Dataset) -> bool:
    """Whether the pairs carry gold rewards (`chosen_gold`, `rejected_gold`)."""
    return all(c in data.column_names for c in GOLD_COLUMNS)


def unknown_token_id(tokenizer) -> int | None:
    """The id of a tokenizer's unknown-word token, if it has one of its own: the project's
    word-level tokenizer maps every word outside the task's vocabulary to it. None for
    tokenizers without one, or whose `unk_token` is another special token (GPT-2's is EOS)."""
    unk = tokenizer.unk_token_id
    others = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    return None if unk is None or unk in others else unk


def check_known_words(tokenizer, texts: list[str], column: str, what: str,
                      rows: list[int] | None = None) -> None:
    """Every word of `texts` is in the tokenizer's vocabulary (an unknown word would train
    as the unknown token); the literal unknown token a policy sampled is allowed.

    Raises:
        UsageError: naming the column, the row (`rows[i]`, else i) and the first unknown word.
    """
    unk = unknown_token_id(tokenizer)
    if unk is None:
        return
    for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        if unk not in ids:
            continue
        for word in texts[i].split():
            if word != tokenizer.unk_token and unk in tokenizer(
                    word, add_special_tokens=False)["input_ids"]:
                raise UsageError(f"{what} row {i if rows is None else rows[i]}: {column!r} holds "
                                 f"{word!r}, a word outside the tokenizer's vocabulary (the "
                                 "task's words only; a model of your own takes any text: "
                                 "--model_name_or_path)")


def gold_accuracy(data: Dataset) -> float:
    """How often the gold reward itself ranks `chosen` above `rejected` (ties count 1/2):
    the ceiling any reward model can reach on these noisy labels."""
    c = torch.tensor(list(data["chosen_gold"]))
    r = torch.tensor(list(data["rejected_gold"]))
    return float(((c > r).float() + 0.5 * (c == r).float()).mean())


def tokenize_pairs(tokenizer, prompts: list[str], responses: list[str],
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Tokenize a whole dataset once: left-padded prompts, right-padded responses + EOS.

    Returns:
        dict of `prompt_ids`, `prompt_mask` (N, P) and `response_ids`, `response_mask` (N, T).
    """
    from rlhf_toy.rollout import encode_prompts, encode_responses

    prompt_ids, prompt_mask = encode_prompts(tokenizer, list(prompts), device)
    response_ids, response_mask = encode_responses(tokenizer, list(responses), True, device)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "response_ids": response_ids, "response_mask": response_mask}


def tokenize_preferences(tokenizer, split, device, n_positions: int | None = None,
                         truncate_prompts: bool = False,
                         what: str = "the preference pairs") -> tuple[dict, dict]:
    """(chosen, rejected) tokenized datasets of one split, row i of each the same pair;
    with `n_positions`, fitted to the context (`fit_pairs_to_context`). A word outside the
    tokenizer's vocabulary is an error (`check_known_words`)."""
    rows = split["row"] if "row" in split.column_names else None
    for column in PREFERENCE_COLUMNS:
        check_known_words(tokenizer, split[column], column, what, rows)
    chosen = tokenize_pairs(tokenizer, split["prompt"], split["chosen"], device)
    rejected = tokenize_pairs(tokenizer, split["prompt"], split["rejected"], device)
    if n_positions is not None:
        chosen, rejected = fit_pairs_to_context(chosen, rejected, n_positions,
                                                tokenizer.pad_token_id, truncate_prompts, what)
    return chosen, rejected


def select_batch(data: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows `index` of a tokenized dataset, with all-padding columns trimmed away."""
    batch = {k: v[index] for k, v in data.items()}
    p_keep = int(batch["prompt_mask"].sum(0).nonzero().min())  # first column with a real token
    t_keep = int(batch["response_mask"].sum(0).nonzero().max()) + 1
    for k in ("prompt_ids", "prompt_mask"):
        batch[k] = batch[k][:, p_keep:]
    for k in ("response_ids", "response_mask"):
        batch[k] = batch[k][:, :t_keep]
    return batch


def fit_pairs_to_context(chosen: dict, rejected: dict, n_positions: int, pad_token_id: int,
                         truncate: bool, what: str) -> tuple[dict, dict]:
    """Make every pair fit the context: prompt + the longer response <= `n_positions`.

    Args:
        chosen, rejected: tokenized datasets (`data.tokenize_pairs`) of the same N pairs:
            `prompt_ids`, `prompt_mask` (N, P) left-padded, `response_*` (N, T).
        truncate: keep the last tokens of a prompt that is too long (the ones next to the
            response) and log how many were cut; otherwise raise `UsageError`.
    Returns:
        (chosen, rejected), with the same (truncated) prompts in both.
    """
    prompt_len = chosen["prompt_mask"].sum(-1)  # (N,)
    response_len = torch.maximum(chosen["response_mask"].sum(-1),
                                 rejected["response_mask"].sum(-1))  # (N,)
    room = n_positions - response_len  # (N,) prompt tokens that fit; at least one is needed
    if (room < 1).any():
        raise UsageError(f"{what}: a response of {int(response_len.max())} tokens does not fit "
                         f"n_positions={n_positions} with its prompt; use a longer-context model")
    long = prompt_len > room  # (N,)
    n_long = int(long.sum())
    if n_long == 0:
        return chosen, rejected
    if not truncate:
        raise UsageError(f"truncate_prompts must be true to use {what}: {n_long} of {len(long)} "
                         f"prompts do not fit n_positions={n_positions} with their responses "
                         f"(got False)")
    logger.warning("%s: %d of %d prompts are longer than the context allows "
                   "(n_positions=%d); kept their last tokens", what, n_long, len(long),
                   n_positions)
    keep_len = torch.minimum(prompt_len, room)  # (N,)
    width = chosen["prompt_ids"].shape[1]
    keep = torch.arange(width, device=room.device)[None, :] >= (width - keep_len)[:, None]
    first = width - int(keep_len.max())  # leading columns that are now all padding
    prompt = {"prompt_ids": torch.where(keep, chosen["prompt_ids"], pad_token_id)[:, first:],
              "prompt_mask": (chosen["prompt_mask"] * keep)[:, first:]}  # (N, P')
    return {**chosen, **prompt}, {**rejected, **prompt}
