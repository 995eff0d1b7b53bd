"""One dataclass config per stage, loaded strictly from YAML, overridable from the CLI.

Every field has a default (the `tiny` CPU setting) and a one-line help. Values are
validated in `__post_init__`; a bad value raises `UsageError` naming the field and
what is allowed, which the CLI turns into one line and exit code 2.

Loading order: dataclass defaults < YAML file (`--config FILE`) < command line.
YAML values travel through the same argparse type conversion as the command line,
so `beta: abc` in a file fails exactly like `--beta abc`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from rlhf_toy.errors import NonFiniteError, UsageError  # noqa: F401 - re-exported
from rlhf_toy.methods import METHODS


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help string (shown by `--help`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check(condition: bool, name: str, allowed: str, value: Any) -> None:
    """Raise `UsageError("NAME must be ALLOWED (got VALUE)")` unless `condition`."""
    if not condition:
        raise UsageError(f"{name} must be {allowed} (got {value!r})")


def policy_dir(cfg: Any) -> str:
    """Where a stage's starting policy, reference and tokenizer come from:
    `--model_name_or_path` if given, else `--sft_dir`."""
    return getattr(cfg, "model_name_or_path", "") or cfg.sft_dir


def policy_flag(cfg: Any) -> str:
    """The option that named `policy_dir(cfg)`, for error messages."""
    return "--model_name_or_path" if getattr(cfg, "model_name_or_path", "") else "--sft_dir"


def _model_path(help: str) -> Any:
    return _f("", "a local Hugging Face causal-LM directory with its tokenizer (e.g. GPT-2, "
                  f"Llama; no hub access): {help}; empty = off")


def _check_model_path(cfg: Any) -> None:
    path = getattr(cfg, "model_name_or_path", "")
    check(not path or os.path.isdir(path), "model_name_or_path", "a local directory holding "
          "a Hugging Face causal LM and its tokenizer (no hub access)", path)


REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
MAX_BETA = 1e3  # a KL coefficient (or DPO beta) beyond this only overflows the losses


def _finite(cfg: Any) -> None:
    """Every float field (and every float in a list field) is a finite number."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float):
                check(math.isfinite(v), f.name, "a finite number", value)


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        check(value > 0, name, "> 0", value)


def _check_lr_scheduler(cfg: Any) -> None:
    """`lr_scheduler_type` of a stage with a schedule (DPO, the on-policy stages)."""
    check(cfg.lr_scheduler_type in ("linear", "constant"), "lr_scheduler_type",
          "linear or constant", cfg.lr_scheduler_type)


def _unit(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        check(0.0 <= value <= 1.0, name, "in [0, 1]", value)


def _check_prefs_path(cfg: Any) -> None:
    """A user's pairs (`prefs_path`) replace `prefs_dir`, which is then not read."""
    if cfg.prefs_path:
        cfg.prefs_dir = ""
    check(0.0 < cfg.test_fraction < 1.0, "test_fraction", "in (0, 1)", cfg.test_fraction)


@dataclass
class CommonConfig:
    """Fields every stage has."""

    output_dir: str = _f("runs/default", "directory this stage writes its artifacts into")
    seed: int = _f(0, "seed for python, numpy and torch; same seed, same numbers")
    task: str = _f("sentiment", "toy task: a name (see `rlhf-toy tasks`) or "
                                "package.module:ClassName (a rlhf_toy.tasks.Task subclass)")
    device: str = _f("auto", "auto | cpu | cuda")
    mixed_precision: str = _f("no", "accelerate mixed precision: no | fp16 | bf16")
    overwrite_output_dir: bool = _f(False, "replace an earlier run in output_dir (refused "
                                           "otherwise, unless resuming)")

    def __post_init__(self) -> None:
        from rlhf_toy.tasks import task_class

        _finite(self)
        check(0 <= self.seed < 2**32, "seed", "in [0, 2**32 - 1]", self.seed)
        task_class(self.task)
        check(self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda", self.device)
        check(self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision",
              "no, fp16 or bf16", self.mixed_precision)
        if os.path.isfile(self.output_dir):
            raise UsageError(f"output_dir {self.output_dir!r} is a file; give a directory")
        _check_model_path(self)


@dataclass
class SamplingConfig:
    """How responses are sampled (rollouts, preference data, evaluation)."""

    max_new_tokens: int = _f(16, "response length limit in tokens (EOS included)")
    temperature: float = _f(1.0, "sampling temperature; log-probs use the same one")
    top_k: int = _f(0, "sample from the k most likely tokens only; 0 = off")
    n_eval_prompts: int = _f(128, "held-out prompts used for gold/proxy reward evaluation")

    def _check_sampling(self) -> None:
        _positive(self, "max_new_tokens", "n_eval_prompts")
        check(0.01 <= self.temperature <= 100, "temperature", "in [0.01, 100]", self.temperature)
        check(self.top_k >= 0, "top_k", ">= 0", self.top_k)


@dataclass
class TrainConfig:
    """Optimisation and checkpointing fields shared by the training stages."""

    learning_rate: float = _f(1e-3, "AdamW learning rate")
    batch_size: int = _f(32, "examples per optimizer step (per process)")
    gradient_accumulation_steps: int = _f(1, "micro-batches accumulated per optimizer step")
    max_steps: int = _f(300, "optimizer steps (PPO: iterations)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    logging_steps: int = _f(10, "write a metrics.jsonl row every N steps")
    save_steps: int = _f(0, "write a resumable checkpoint-N/ every N steps; 0 = only the "
                            "final model")
    resume_from_checkpoint: str = _f("", "PATH of a checkpoint-N/ directory, or 'latest' in "
                                         "output_dir; empty = start fresh")
    # memory and tracking (README, "LoRA and gradient checkpointing", "Tracking")
    use_peft: bool = _f(False, "train LoRA adapters (peft) on a frozen base; the reference is "
                               "the base with the adapter disabled")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA scale numerator: the update is scaled by lora_alpha / lora_r")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input, in [0, 1)")
    lora_target_modules: list[str] = _f([], "layers to adapt; empty = c_attn (GPT-2), "
                                            "q_proj v_proj (Llama)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass "
                                             "(less memory, more compute)")
    report_to: str = _f("none", "also log metrics.jsonl's rows to: none | tensorboard | "
                                "wandb | trackio")

    def _check_train(self) -> None:
        _positive(self, "batch_size", "gradient_accumulation_steps", "max_steps",
                  "max_grad_norm", "logging_steps")
        check(0 < self.learning_rate <= 1, "learning_rate", "in (0, 1]", self.learning_rate)
        check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        check(self.save_steps >= 0, "save_steps", ">= 0", self.save_steps)
        _positive(self, "lora_r", "lora_alpha")
        check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "in [0, 1)", self.lora_dropout)
        check(self.report_to in REPORT_TO, "report_to", " | ".join(REPORT_TO), self.report_to)


@dataclass
class SFTConfig(CommonConfig, SamplingConfig, TrainConfig):
    """Supervised fine-tuning of the tiny GPT on the task's corpus."""

    output_dir: str = _f("runs/default/sft", "directory this stage writes its artifacts into")
    model_name_or_path: str = _model_path("fine-tune it instead of a fresh tiny GPT (n_layer, "
                                          "n_embd, n_head and n_positions are then ignored)")

    n_layer: int = _f(2, "transformer blocks")
    n_embd: int = _f(64, "embedding width")
    n_head: int = _f(4, "attention heads")
    n_positions: int = _f(32, "context length (prompt + response must fit)")
    n_train: int = _f(4000, "generated SFT examples")
    n_eval: int = _f(256, "generated held-out examples for eval_loss")

    def __post_init__(self) -> None:
        CommonConfig.__post_init__(self)
        self._check_sampling()
        self._check_train()
        _positive(self, "n_layer", "n_embd", "n_head", "n_positions", "n_train", "n_eval")
        check(self.n_embd % self.n_head == 0, "n_embd", "divisible by n_head", self.n_embd)


@dataclass
class PrefsConfig(CommonConfig, SamplingConfig):
    """Preference pairs sampled from the SFT policy and labelled by the gold reward."""

    output_dir: str = _f("runs/default/prefs", "directory this stage writes its artifacts into")

    sft_dir: str = _f("runs/default/sft", "SFT checkpoint to sample responses from")
    model_name_or_path: str = _model_path("sample from it instead of sft_dir")
    n_pairs: int = _f(8000, "preference pairs (train + test)")
    test_fraction: float = _f(0.2, "held-out fraction of the pairs")
    label_temperature: float = _f(0.1, "Bradley-Terry label noise: P(a > b) = sigmoid((g_a - g_b) / T)")

    def __post_init__(self) -> None:
        CommonConfig.__post_init__(self)
        self._check_sampling()
        _positive(self, "n_pairs")
        check(self.label_temperature >= 0.01, "label_temperature", ">= 0.01",
              self.label_temperature)
        check(0.0 < self.test_fraction < 1.0, "test_fraction", "in (0, 1)", self.test_fraction)


@dataclass
class RewardConfig(CommonConfig, TrainConfig):
    """Reward model: GPT-2 backbone (from SFT) plus a scalar head, Bradley-Terry loss."""

    output_dir: str = _f("runs/default/reward", "directory this stage writes its artifacts into")

    sft_dir: str = _f("runs/default/sft", "SFT checkpoint whose backbone initialises the reward model")
    model_name_or_path: str = _model_path("backbone and tokenizer instead of sft_dir's")
    prefs_dir: str = _f("runs/default/prefs", "preference dataset (rlhf-toy prefs)")
    prefs_path: str = _f("", "preference pairs of your own instead of prefs_dir: a JSONL, JSON, "
                             "CSV or Parquet file or a datasets directory, TRL's explicit-prompt "
                             "or conversational format")
    test_fraction: float = _f(0.2, "held-out fraction of prefs_path's pairs when it has one split "
                                   "(drawn with --seed)")
    batch_size: int = _f(64, "preference pairs per optimizer step (per process)")
    max_steps: int = _f(400, "optimizer steps")
    head_init_std: float = _f(0.02, "std of the scalar head's initial weights (small)")
    eval_batch_size: int = _f(256, "pairs per evaluation batch")
    audit_steps: int = _f(200, "steps of the audit reward model trained on the test pairs "
                               "(the on-policy over-optimization indicator); 0 = none")
    truncate_prompts: bool = _f(False, "prompts too long for the context: false = error, "
                                       "true = keep their last tokens and warn how many")

    def __post_init__(self) -> None:
        CommonConfig.__post_init__(self)
        self._check_train()
        _positive(self, "head_init_std", "eval_batch_size")
        _check_prefs_path(self)
        check(self.audit_steps >= 0, "audit_steps", ">= 0", self.audit_steps)


# --------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _yaml_to_argv(cls: type, path: str) -> list[str]:
    """Read a YAML mapping strictly and turn it into `--key value` tokens."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except UnicodeDecodeError:
        raise UsageError(f"config file {path!r} is not valid YAML (not UTF-8 text)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UsageError(f"config file {path!r} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of field: value")
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"unknown config key {unknown[0]!r} in {path} for {cls.__name__}; "
                         f"see --help for the allowed keys")
    argv: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        is_list = fields[key].startswith("list")
        if isinstance(value, dict) or (isinstance(value, list) and not is_list):
            raise UsageError(f"config key {key!r} in {path} must be a single value, not a "
                             f"{type(value).__name__} (got {value!r})")
        values = value if isinstance(value, list) else [value]
        argv.append(f"--{key}")
        argv.extend(str(v).lower() if isinstance(v, bool) else str(v) for v in values)
    return argv


def _config_files(cls: type, argv: list[str]) -> tuple[list[str], list[str]]:
    """Take every `--config FILE` out of `argv`: (their `--key value` tokens, merged in
    order so that a later file wins, and the remaining arguments)."""
    rest, yaml_argv = [], []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise UsageError("--config needs a YAML file path")
            yaml_argv += _yaml_to_argv(cls, argv[i + 1])
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return yaml_argv, rest


def parse_config(cls: type, argv: list[str], prog: str = "rlhf-toy") -> Any:
    """Build a `cls` config from `[--config FILE ...] [--key value ...]`.

    Several `--config` files merge in order (a later file wins); the command line wins
    over every file.

    Raises:
        UsageError: unknown key, unparsable value, or a value out of range.
    """
    from transformers import HfArgumentParser

    yaml_argv, argv = _config_files(cls, list(argv))
    parser = HfArgumentParser(cls, prog=prog, description=cls.__doc__)
    parser.error = _Parser.error.__get__(parser)  # type: ignore[method-assign]
    parser.add_argument("--config", action="append",
                        help="YAML file with any of the fields below (several merge in order)")
    for action in parser._actions:  # `--no_X` of a field X that defaults to true
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"set {action.dest} to false (same as --{action.dest} false)"
            action.default = argparse.SUPPRESS  # the field's own option holds the default
    namespace, remaining = parser.parse_known_args(yaml_argv + argv)
    if remaining:
        raise UsageError(f"unknown argument {remaining[0]!r}; see --help for the allowed keys")
    kwargs = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (written next to every artifact)."""
    return dataclasses.asdict(cfg)


# PPO's adaptive-KL target on a task that proposes none (`Task.target_kl`): measured on
# both built-in tasks, seeds 0-4 (README, "Defaults that hold on every task")
DEFAULT_TARGET_KL = 2.5


@dataclass
class OnPolicyConfig(CommonConfig, SamplingConfig, TrainConfig):
    """What every on-policy stage shares (`ppo`, `grpo`, `rloo`, `reinforce_pp`): sampling,
    the KL to the frozen SFT reference, the clipped update and its schedule."""


    sft_dir: str = _f("runs/default/sft", "SFT checkpoint: the initial policy and the reference")
    model_name_or_path: str = _model_path("initial policy, reference and tokenizer instead "
                                          "of sft_dir's")
    reward_dir: str = _f("runs/default/reward", "reward model checkpoint (frozen)")
    prompts_path: str = _f("", "prompts of your own instead of the task's (a text file, one a "
                               "line, or a file or dataset with a 'prompt' column); the task's "
                               "gold reward is then not used: reports say 'no gold reward'")
    batch_size: int = _f(32, "rollouts (completions) per iteration (per process)")
    max_steps: int = _f(100, "iterations (sample, score, update)")
    num_generations: int = _f(1, "completions per prompt, contiguous in the batch; "
                                 "batch_size / num_generations prompts per iteration")
    mini_batch_size: int = _f(16, "rollouts per minibatch update")
    ppo_epochs: int = _f(4, "passes over each rollout batch")
    beta: float = _f(0.05, "KL coefficient (initial value if adaptive_kl)")
    kl_estimator: str = _f("k1", "per-token KL estimator of a KL in the reward: k1 | k2 | k3")
    adaptive_kl: bool = _f(False, "adapt beta towards target_kl (Ziegler et al. 2019)")
    target_kl: float = _f(2.0, "target sequence KL for the adaptive controller")
    kl_horizon: int = _f(10000, "horizon (in rollouts) of the adaptive controller")
    clip_range: float = _f(0.2, "ratio clipping epsilon")
    ent_coef: float = _f(0.0, "entropy bonus coefficient")
    missing_eos_penalty: float = _f(1.0, "subtracted from the score of responses cut by the length limit")
    center_scores: bool = _f(False, "subtract the batch's mean score (a baseline; see README, "
                                    "Defaults that hold on every task)")
    warmup_steps: int = _f(0, "linear learning-rate warm-up over the first N iterations; 0 = off")
    lr_scheduler_type: str = _f("constant", "constant | linear (decay towards 0 at max_steps)")
    eval_steps: int = _f(0, "held-out gold/proxy evaluation every N iterations; 0 = start and end")
    overopt_drop: float = _f(0.5, "over-optimization indicator: fires when the audit reward "
                                  "model has lost this fraction of its gain while the proxy rose")
    inspect_steps: int = _f(0, "write inspect/step_N.json of a few samples every N iterations; 0 = off")

    def __post_init__(self) -> None:
        CommonConfig.__post_init__(self)
        self._check_sampling()
        self._check_train()
        _positive(self, "overopt_drop", "num_generations", "mini_batch_size", "ppo_epochs", "clip_range",
                  "kl_horizon")
        if self.target_kl is not None:  # PPO: None = the task's
            _positive(self, "target_kl")
        check(self.mini_batch_size <= self.batch_size, "mini_batch_size",
              f"<= batch_size ({self.batch_size})", self.mini_batch_size)
        check(self.batch_size % self.mini_batch_size == 0, "batch_size",
              f"a multiple of mini_batch_size ({self.mini_batch_size})", self.batch_size)
        check(self.batch_size % self.num_generations == 0, "batch_size",
              f"a multiple of num_generations ({self.num_generations})", self.batch_size)
        check(0 <= self.beta <= MAX_BETA, "beta", f"in [0, {MAX_BETA:g}]", self.beta)
        check(self.mini_batch_size % self.gradient_accumulation_steps == 0, "mini_batch_size",
              f"a multiple of gradient_accumulation_steps ({self.gradient_accumulation_steps})",
              self.mini_batch_size)
        check(self.kl_estimator in ("k1", "k2", "k3"), "kl_estimator", "k1, k2 or k3",
              self.kl_estimator)
        check(self.ent_coef >= 0, "ent_coef", ">= 0", self.ent_coef)
        check(self.missing_eos_penalty >= 0, "missing_eos_penalty", ">= 0",
              self.missing_eos_penalty)
        check(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        _check_lr_scheduler(self)
        check(self.eval_steps >= 0, "eval_steps", ">= 0", self.eval_steps)
        check(self.inspect_steps >= 0, "inspect_steps", ">= 0", self.inspect_steps)


# Defaults of the dpo stage by loss type (README, "IPO and SimPO"; sigmoid's learning rate
# and budget: "Defaults that hold on every task"): each measured to raise held-out gold on
# the default pipeline. SimPO's beta scales a length-normalized log-prob, and with no
# reference to hold it, it needs a smaller learning rate; gamma is TRL's.
LOSS_TYPE_DEFAULTS = {
    "sigmoid": {"beta": 0.5, "learning_rate": 3e-4, "batch_size": 64, "max_steps": 600},
    "ipo": {"beta": 1.0, "learning_rate": 1e-3, "batch_size": 32, "max_steps": 300},
    "simpo": {"beta": 2.5, "learning_rate": 1e-4, "simpo_gamma": 0.5, "batch_size": 32,
              "max_steps": 300},
}


def _defaults_help(name: str) -> str:
    return ", ".join(f"{k} {v[name]:g}" for k, v in LOSS_TYPE_DEFAULTS.items() if name in v)


@dataclass
class DPOConfig(CommonConfig, SamplingConfig, TrainConfig):
    """DPO on the preference pairs, policy and frozen reference from SFT (Rafailov et al. 2023)."""

    output_dir: str = _f("runs/default/dpo", "directory this stage writes its artifacts into")
    sft_dir: str = _f("runs/default/sft", "SFT checkpoint: the initial policy and the reference")
    model_name_or_path: str = _model_path("initial policy, reference and tokenizer instead "
                                          "of sft_dir's")
    prefs_dir: str = _f("runs/default/prefs", "preference dataset (rlhf-toy prefs); train split")
    prefs_path: str = _f("", "preference pairs of your own instead of prefs_dir: a JSONL, JSON, "
                             "CSV or Parquet file or a datasets directory, TRL's explicit-prompt "
                             "or conversational format")
    test_fraction: float = _f(0.2, "held-out fraction of prefs_path's pairs when it has one split "
                                   "(drawn with --seed)")
    reward_dir: str = _f("runs/default/reward", "reward model: proxy reward for evaluation only")
    prompts_path: str = _f("", "evaluation prompts of your own instead of the task's (a text file, one a "
                               "line, or a file or dataset with a 'prompt' column); the task's "
                               "gold reward is then not used: reports say 'no gold reward'")
    loss_type: str | None = _f(None, "sigmoid (DPO, eq. 7; the default) | ipo (Azar et al. "
                                     "2023, eq. 17) | simpo (Meng et al. 2024, reference-free)")
    loss: str | None = _f(None, "alias of loss_type (either name; both given must agree)")
    beta: float | None = _f(None, "strength of the implicit KL constraint (simpo: scale of the "
                                  "length-normalized reward); default by loss_type: "
                                  + _defaults_help("beta"))
    label_smoothing: float = _f(0.0, "conservative DPO: assumed label-flip rate, in [0, 0.5); "
                                     "sigmoid only")
    simpo_gamma: float | None = _f(None, "SimPO target reward margin gamma, >= 0; simpo only "
                                         "(default " + _defaults_help("simpo_gamma") +
                                         ", as TRL's CPOConfig)")
    learning_rate: float | None = _f(None, "AdamW learning rate (peak, with lr_scheduler_type "
                                           "linear); default by loss_type: "
                                           + _defaults_help("learning_rate"))
    lr_scheduler_type: str = _f("linear", "linear (decay to 0 at max_steps, as TRL) | constant")
    batch_size: int | None = _f(None, "pairs per optimizer step (split over "
                                      "gradient_accumulation_steps); default by loss_type: "
                                      + _defaults_help("batch_size"))
    max_steps: int | None = _f(None, "optimizer steps; default by loss_type: "
                                     + _defaults_help("max_steps"))
    eval_steps: int = _f(50, "held-out gold/proxy evaluation every N steps; 0 = start and end")
    truncate_prompts: bool = _f(False, "prompts too long for the context: false = error, "
                                       "true = keep their last tokens and warn how many")

    def __post_init__(self) -> None:
        CommonConfig.__post_init__(self)
        self._resolve_loss_type()
        self._check_sampling()
        self._check_train()
        check(0 < self.beta <= MAX_BETA, "beta", f"in (0, {MAX_BETA:g}]", self.beta)
        _check_lr_scheduler(self)
        check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", "in [0, 0.5)",
              self.label_smoothing)
        check(self.loss_type == "sigmoid" or self.label_smoothing == 0.0, "label_smoothing",
              f"0 with loss_type {self.loss_type}", self.label_smoothing)
        check(self.batch_size % self.gradient_accumulation_steps == 0, "batch_size",
              f"a multiple of gradient_accumulation_steps ({self.gradient_accumulation_steps})",
              self.batch_size)
        check(self.eval_steps >= 0, "eval_steps", ">= 0", self.eval_steps)
        _check_prefs_path(self)

    def _resolve_loss_type(self) -> None:
        """`loss` is an alias of `loss_type`: take whichever is given (sigmoid if neither),
        then fill the fields not given with the loss type's `LOSS_TYPE_DEFAULTS`."""
        allowed = ", ".join(LOSS_TYPE_DEFAULTS)
        for name in ("loss_type", "loss"):
            value = getattr(self, name)
            check(value is None or value in LOSS_TYPE_DEFAULTS, name, f"one of {allowed}", value)
        if self.loss_type is not None and self.loss is not None:
            check(self.loss == self.loss_type, "loss", f"equal to loss_type ({self.loss_type}) "
                  "when both are given (it is an alias)", self.loss)
        self.loss_type = self.loss_type or self.loss or "sigmoid"
        self.loss = None
        check(self.loss_type == "simpo" or self.simpo_gamma is None, "simpo_gamma",
              f"unset with loss_type {self.loss_type} (it is SimPO's margin)", self.simpo_gamma)
        for name, value in LOSS_TYPE_DEFAULTS[self.loss_type].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.loss_type == "simpo":
            check(self.simpo_gamma >= 0, "simpo_gamma", ">= 0", self.simpo_gamma)


@dataclass
class CompareConfig(CommonConfig, SamplingConfig):
    """Every method on every seed against SFT on the same held-out prompts, with a beta
    sweep per method; means and standard errors over the seeds."""

    output_dir: str = _f("runs/default/compare", "directory this stage writes its artifacts into")
    methods: list[str] = _f(list(METHODS), "methods to train and compare (default: every "
                                           "registered one)")
    seeds: list[int] = _f([], "seeds to train every stage and method on; empty = --seed and "
                              "the next two")
    sft_dir: str = _f("", "a finished SFT run for --seed to reuse; empty = train it")
    prefs_dir: str = _f("", "a finished prefs run for --seed to reuse; empty = generate it")
    reward_dir: str = _f("", "a finished reward run for --seed to reuse; empty = train it")
    prefs_path: str = _f("", "preference pairs of your own for every seed's reward and "
                             "preference runs (see `rlhf-toy reward --help`); no prefs stage")
    prompts_path: str = _f("", "prompts of your own for every on-policy run and the evaluation; "
                               "no gold reward: methods are measured by proxy reward and KL")
    method_dirs: list[str] = _f([], "METHOD=DIR: a finished main run of METHOD for --seed to "
                                    "reuse; the other seeds repeat its settings")
    config_dir: str = _f("", "per-stage YAML files for the runs compare trains without a "
                             "finished run to copy settings from (e.g. configs/gpu)")
    sweep: bool = _f(True, "train each method again at other betas (the frontier sweep)")
    beta_factors: list[float] = _f([0.2, 4.0], "the sweep: each method's beta times these "
                                               "(the main run is factor 1)")

    def __post_init__(self) -> None:
        CommonConfig.__post_init__(self)
        self._check_sampling()
        if self.prefs_path:  # a user's pairs replace the prefs stage
            self.prefs_dir = ""
        for name in self.methods:
            check(name in METHODS, "methods", f"a list from {sorted(METHODS)}", self.methods)
        check(bool(self.methods) and len(set(self.methods)) == len(self.methods), "methods",
              "a non-empty list without repeats", self.methods)
        check(len(set(self.seeds)) == len(self.seeds) and min(self.seeds, default=0) >= 0,
              "seeds", "distinct integers >= 0", self.seeds)
        for factor in self.beta_factors:
            check(factor > 0, "beta_factors", "a list of values > 0", self.beta_factors)
        for name in ("sft_dir", "prefs_dir", "reward_dir", "config_dir"):
            path = getattr(self, name)
            check(not path or os.path.isdir(path), name, "an existing directory or empty", path)
        for item in self.method_dirs:
            method, _, path = item.partition("=")
            check(method in self.methods and os.path.isdir(path), "method_dirs",
                  "METHOD=DIR items with METHOD in methods and DIR an existing directory", item)
        reused = self.sft_dir or self.prefs_dir or self.reward_dir or self.method_dirs
        check(not reused or self.seed in self.seed_list(), "seeds",
              f"a list holding --seed ({self.seed}), whose finished runs are reused", self.seeds)

    def seed_list(self) -> list[int]:
        """The seeds to run: `seeds`, or `seed` and the next two."""
        return list(self.seeds) or [self.seed, self.seed + 1, self.seed + 2]

    def reused_method_dirs(self) -> dict[str, str]:
        """method -> finished main run for `seed`, from `method_dirs`."""
        return dict(item.split("=", 1) for item in self.method_dirs)
