"""A user's own data: preference pairs (`--prefs_path`) and prompts (`--prompts_path`).

Files are read as rows: JSONL (one object a line), JSON (a list of objects), CSV (a header
line), Parquet, or a directory written by `datasets` (`save_to_disk`; a `DatasetDict` or
a `Dataset`). Prompts may also be a plain text file, one prompt a line.

Preference rows follow TRL's preference formats:
- explicit prompt: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of {"role", "content"} messages, `chosen` and `rejected`
  lists of the assistant's messages, rendered with the tokenizer's chat template as TRL's
  `maybe_apply_chat_template` does: the prompt with the generation prompt, each response
  as the text the template adds after that prompt (the common prefix of the rendered
  prompt and the rendered conversation is the prompt);
- either one with an implicit prompt: `chosen` and `rejected` only, the prompt being the
  start they share (split by TRL's own `extract_prompt`).

Every response ends with the tokenizer's EOS token when it is tokenized
(`data.tokenize_pairs`), so a trailing EOS the template writes is taken off the text.
TRL's `DPOTrainer` tokenizes `prompt + response` as one string and splits it where it
leaves the tokenized prompt; we tokenize the two apart. A row where the two differ (a
response glued to the prompt's last word, as "was" + "good" -> "wasgood") is an error
naming the row: start responses with a space, as TRL's docs advise.

Optional columns `chosen_gold`, `rejected_gold` (floats) carry a gold reward; without them
every gold number is left out. Every loaded split has a `row` column: the row in the
source, for error messages.
"""

from __future__ import annotations

import csv
import json
import os
import random

from datasets import Dataset, DatasetDict, load_from_disk

from rlhf_toy.data import (
    GOLD_COLUMNS,
    PREFERENCE_COLUMNS,
    check_known_words,
    check_preference_rows,
    load_preferences,
)
from rlhf_toy.errors import UsageError
from rlhf_toy.evaluate import EVAL_PROMPT_SEED, eval_prompts
from rlhf_toy.tasks import get_task
from rlhf_toy.train.rundir import read_run_config

EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
              ".txt": "text"}


def read_rows(path: str, field: str, text_ok: bool = False) -> dict[str, list[dict]]:
    """The rows of a file or `datasets` directory: {split name: rows}; a file is one split
    named "train". `field` names the option in errors; `text_ok` allows `.txt` (one
    `prompt` a line, blank lines skipped).

    Raises:
        UsageError: a path that does not exist, an unknown extension, a file that does not
            parse (with its line where known), rows that are not objects.
    """
    if os.path.isdir(path):
        return _read_dataset_dir(path, field)
    if not os.path.isfile(path):
        raise UsageError(f"{field} {path!r} does not exist")
    kind = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    allowed = [e for e, k in EXTENSIONS.items() if text_ok or k != "text"]
    if kind is None or (kind == "text" and not text_ok):
        raise UsageError(f"{field} must be a {', '.join(allowed)} file or a datasets directory "
                         f"(got {path!r})")
    try:
        rows = _READERS[kind](path, field)
    except UnicodeDecodeError:
        raise UsageError(f"{field} {path!r} cannot be read (not UTF-8 text)") from None
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser's error on a damaged file
        raise UsageError(f"{field} {path!r} cannot be read as {kind} "
                         f"({type(exc).__name__})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UsageError(f"{field} {path!r} row {i} must be an object with named columns "
                             f"(got {type(row).__name__})")
    return {"train": rows}


def _read_jsonl(path: str, field: str) -> list:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UsageError(f"{field} {path!r} line {line_no} is not valid "
                                     "JSON") from None
    return rows


def _read_json(path: str, field: str) -> list:
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{field} {path!r} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(data, list):
        raise UsageError(f"{field} {path!r} must hold a JSON list of objects "
                         f"(got {type(data).__name__})")
    return data


def _read_csv(path: str, field: str) -> list:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _read_parquet(path: str, field: str) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_text(path: str, field: str) -> list:
    with open(path, encoding="utf-8") as fh:
        return [{"prompt": line.rstrip("\n")} for line in fh if line.strip()]


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv,
            "parquet": _read_parquet, "text": _read_text}


def _read_dataset_dir(path: str, field: str) -> dict[str, list[dict]]:
    try:
        data = load_from_disk(path)
    except Exception as exc:  # noqa: BLE001 - not a dataset, cut or corrupted files
        raise UsageError(f"{field} {path!r} is no readable datasets directory "
                         f"({type(exc).__name__})") from None
    splits = data if isinstance(data, DatasetDict) else {"train": data}
    return {name: split.to_list() for name, split in splits.items()}


# --------------------------------------------------------------------------- preference pairs


def _check_messages(messages, name: str, where: str) -> None:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise UsageError(f"{where}: {name!r} must be a non-empty list of {{'role', 'content'}} "
                         f"strings (got {messages!r})")


def render_prompt(messages: list[dict], tokenizer, where: str) -> str:
    """A conversational prompt rendered with the chat template: with the generation prompt
    after a user or tool turn, continuing a final assistant turn (as TRL)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{where} is conversational but the tokenizer has no chat template")
    _check_messages(messages, "prompt", where)
    last_role = messages[-1]["role"]
    if last_role not in ("user", "tool", "assistant"):
        raise UsageError(f"{where}: the prompt's last role must be user, tool or assistant "
                         f"(got {last_role!r})")
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=last_role != "assistant",
                                         continue_final_message=last_role == "assistant")


def render_conversation(row: dict, tokenizer, where: str) -> dict[str, str]:
    """A conversational preference row as prompt / chosen / rejected strings, rendered with
    the tokenizer's chat template the way TRL's `maybe_apply_chat_template` does: each
    response is what the rendered conversation adds after the rendered prompt."""
    prompt = render_prompt(row["prompt"], tokenizer, where)
    full = {}
    for name in ("chosen", "rejected"):
        _check_messages(row[name], name, where)
        full[name] = tokenizer.apply_chat_template(row["prompt"] + row[name], tokenize=False)
    # the prompt is the common prefix (TRL: a template may render the prompt alone apart)
    prompt = os.path.commonprefix([prompt, *full.values()])
    out = {"prompt": prompt}
    eos = tokenizer.eos_token or ""
    for name, text in full.items():  # the EOS is appended again when tokenized
        response = text[len(prompt):]
        out[name] = response[: -len(eos)] if eos and response.endswith(eos) else response
    return out


def _preference_row(row: dict, i: int, tokenizer, where: str) -> dict:
    """One source row as string columns (and gold floats where given). Without a `prompt`
    the prompt is the start `chosen` and `rejected` share (TRL's implicit-prompt format,
    split by TRL's own `extract_prompt`)."""
    missing = [c for c in PREFERENCE_COLUMNS if row.get(c) is None]
    if missing and missing != ["prompt"]:
        raise UsageError(f"{where} row {i} lacks column {missing[-1]!r}; needs "
                         f"{list(PREFERENCE_COLUMNS)} (TRL's explicit-prompt format), or "
                         "['chosen', 'rejected'] sharing their prompt")
    if missing:
        from trl.data_utils import extract_prompt

        row = {**row, **extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})}
    if isinstance(row["prompt"], list):
        out = render_conversation(row, tokenizer, f"{where} row {i}")
    else:
        out = {c: row[c] for c in PREFERENCE_COLUMNS}
    for name in GOLD_COLUMNS:
        if name in row:
            try:
                out[name] = float(row[name])
            except (TypeError, ValueError):
                raise UsageError(f"{where} row {i}: {name!r} must be a number "
                                 f"(got {row[name]!r})") from None
    return {**out, "row": i}


def check_joined_tokenization(tokenizer, data: Dataset, where: str) -> None:
    """TRL tokenizes prompt + response as one string: it must give the tokens of the
    prompt followed by those of the response, which is what we train on."""
    for name in ("chosen", "rejected"):
        pairs = list(zip(data["prompt"], data[name], strict=True))
        apart = [tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"],
                 tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]]
        joined = tokenizer([p + r for p, r in pairs], add_special_tokens=False)["input_ids"]
        for i, (p_ids, r_ids, j_ids) in enumerate(zip(*apart, joined, strict=True)):
            if p_ids + r_ids != j_ids:
                raise UsageError(f"{where} row {data['row'][i]}: prompt + {name!r} "
                                 f"({(pairs[i][0] + pairs[i][1])[-60:]!r}) tokenizes differently "
                                 f"joined (as TRL does) than apart; start {name!r} with a "
                                 "space, as TRL's docs advise")


def split_off_test(data: Dataset, test_fraction: float, seed: int) -> DatasetDict:
    """A seeded held-out part of one split: round(N * test_fraction) rows (at least one,
    at most N - 1) drawn by `random.Random(seed)`; both parts keep the source order."""
    n = len(data)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    test = sorted(random.Random(seed).sample(range(n), n_test))
    train = sorted(set(range(n)) - set(test))
    return DatasetDict(train=data.select(train), test=data.select(test))


def load_preference_file(path: str, tokenizer, test_fraction: float,
                         seed: int) -> DatasetDict:
    """Preference pairs from a user's file or dataset, in either TRL format.

    Returns:
        DatasetDict with `train` and `test` splits (the source's own when it has both,
        else `split_off_test`), string columns `prompt`, `chosen`, `rejected`, the source
        `row`, and `chosen_gold`, `rejected_gold` where the source has both.
    Raises:
        UsageError: see `read_rows`; a missing column or gold column, an empty prompt,
            pairs without any preference (`data.check_preference_rows`), a row TRL would
            tokenize differently (`check_joined_tokenization`), fewer than two pairs.
    """
    splits = read_rows(path, "prefs_path")
    where = f"prefs_path {path!r}"
    if {"train", "test"} <= set(splits):
        splits = {"train": splits["train"], "test": splits["test"]}
    elif len(splits) != 1:
        raise UsageError(f"{where} must have one split or 'train' and 'test' "
                         f"(got {sorted(splits)})")
    out = {}
    for name, rows in splits.items():
        what = where if len(splits) == 1 else f"{where} ({name})"
        if not rows:
            raise UsageError(f"{what} holds no rows")
        data = Dataset.from_list([_preference_row(r, i, tokenizer, what)
                                  for i, r in enumerate(rows)])
        gold = [c for c in GOLD_COLUMNS if c in data.column_names]
        if len(gold) == 1:
            missing = next(c for c in GOLD_COLUMNS if c not in gold)
            raise UsageError(f"{what} has {gold[0]!r} but lacks {missing!r}: give both "
                             "gold columns or neither")
        check_preference_rows(data, what)
        check_joined_tokenization(tokenizer, data, what)
        out[name] = data
    if len(out) == 2:
        return DatasetDict(out)
    if len(out["train"]) < 2:
        raise UsageError(f"{where} holds 1 pair; a held-out part needs at least 2")
    return split_off_test(out["train"], test_fraction, seed)


def prefs_source(cfg) -> str:
    """How errors name a stage's pairs: `prefs_path 'PATH'`, or the prefs_dir path."""
    return f"prefs_path {cfg.prefs_path!r}" if cfg.prefs_path else cfg.prefs_dir


def load_preference_data(cfg, tokenizer) -> DatasetDict:
    """The pairs of a stage: `cfg.prefs_path` (a user's file) if given, else `cfg.prefs_dir`
    (a dataset written by `rlhf-toy prefs`)."""
    if cfg.prefs_path:
        return load_preference_file(cfg.prefs_path, tokenizer, cfg.test_fraction, cfg.seed)
    return load_preferences(cfg.prefs_dir)


# --------------------------------------------------------------------------- prompts


def load_prompts(path: str, tokenizer) -> list[str]:
    """Prompts from a text file (one a line) or any row format with a `prompt` column;
    conversational prompts are rendered with the chat template and the generation prompt.

    Raises:
        UsageError: see `read_rows`; no rows, a row without a non-empty `prompt`.
    """
    splits = read_rows(path, "prompts_path", text_ok=True)
    where = f"prompts_path {path!r}"
    rows = [row for split in splits.values() for row in split]
    if not rows:
        raise UsageError(f"{where} holds no prompts")
    prompts = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            prompt = render_prompt(prompt, tokenizer, f"{where} row {i}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{where} row {i}: 'prompt' must be a non-empty string "
                             f"(got {prompt!r})")
        prompts.append(prompt)
    return prompts


class PromptList:
    """A task's prompt sampler over a fixed list of prompts (a user's: no gold reward)."""

    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def sample_prompts(self, n: int, rng: random.Random) -> list[str]:
        """`n` prompts drawn with replacement (the `Task.sample_prompts` call)."""
        return rng.choices(self.prompts, k=n)


def split_prompts(prompts: list[str], n_eval: int, where: str) -> tuple[PromptList, list[str]]:
    """(training prompts, held-out prompts): the held-out part is min(n_eval, N // 2)
    prompts drawn with the evaluation seed (`evaluate.EVAL_PROMPT_SEED`, whatever the
    training seed), so every stage and `inspect` evaluate on the same ones. Both parts keep
    the file's order."""
    if len(prompts) < 2:
        raise UsageError(f"{where} holds {len(prompts)} prompt; training and a held-out part "
                         "need at least 2")
    held = set(random.Random(EVAL_PROMPT_SEED).sample(range(len(prompts)),
                                                      min(n_eval, len(prompts) // 2)))
    return (PromptList([p for i, p in enumerate(prompts) if i not in held]),
            [p for i, p in enumerate(prompts) if i in held])


def file_prompts(path: str, tokenizer, n_eval: int, n_positions: int | None,
                 max_new_tokens: int) -> tuple[PromptList, list[str]]:
    """`split_prompts` of `load_prompts`, checked: known words (`data.check_known_words`),
    and room for `max_new_tokens` after the longest prompt in the context `n_positions`."""
    where = f"prompts_path {path!r}"
    prompts = load_prompts(path, tokenizer)
    check_known_words(tokenizer, prompts, "prompt", where)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    longest = max(lengths)
    if n_positions is not None and longest + max_new_tokens > n_positions:
        raise UsageError(f"max_new_tokens must be <= {n_positions - longest} so that the "
                         f"longest prompt of {where} (row {lengths.index(longest)}, {longest} "
                         f"tokens) and its response fit n_positions={n_positions} "
                         f"(got {max_new_tokens})")
    return split_prompts(prompts, n_eval, where)


def stage_prompts(cfg, task, tokenizer, n_positions: int | None):
    """(training prompt sampler, held-out prompts) of a stage: the task and its fixed
    evaluation prompts, or (task None) `file_prompts` of `cfg.prompts_path`."""
    if task is not None:
        return task, eval_prompts(task, cfg.n_eval_prompts)
    return file_prompts(cfg.prompts_path, tokenizer, cfg.n_eval_prompts, n_positions,
                        cfg.max_new_tokens)


def run_prompts(checkpoint: str, task_name: str, tokenizer):
    """(task or None, prompt sampler) that `inspect` draws a finished run's prompts from:
    its task, or the held-out part of its `prompts_path` (no task, no gold reward)."""
    run = read_run_config(checkpoint)
    path = run.get("prompts_path", "")
    if not path:
        task = get_task(task_name)
        return task, task
    _, held_out = split_prompts(load_prompts(path, tokenizer), run["n_eval_prompts"],
                                f"prompts_path {path!r}")
    return None, PromptList(held_out)
