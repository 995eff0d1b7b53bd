"""Tiny GPT policy, value head / critic and reward model, all `transformers` GPT-2 classes.

Shapes: B batch, P prompt length (left-padded), T response length (right-padded),
L = P + T, V vocabulary, H hidden width.

Every sequence is laid out the same way in every forward pass (rollout, reference,
training, reward): `[pad..pad prompt | response EOS pad..pad]`, with position ids
derived from the attention mask so that left padding never shifts positions.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from rlhf_toy.core import last_token_index
from rlhf_toy.errors import UsageError
from rlhf_toy.integrity import check_safetensors, error_reason, read_json_file, verify_manifest
from rlhf_toy.lean_gpt2 import attention_mask_4d, lean_gpt2_hidden, lean_gpt2_supported
from rlhf_toy.lora import holds_adapter, load_adapter_model

VALUE_HEAD_FILE = "value_head.pt"
AUDIT_DIR = "audit"  # the reward stage's audit reward model, inside its output_dir


def build_policy(tokenizer, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                 n_positions: int = 32) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 LM from a config; dropout off everywhere (RL needs it off)."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        # GPT-2's tanh GELU as one fused op (the default "gelu_new" is eight small ones)
        activation_function="gelu_pytorch_tanh",
    )
    return GPT2LMHeadModel(config)


def _check_checkpoint(path: str, kind: str) -> dict:
    """The checkpoint's `config.json`, after checking that its files are whole."""
    if not os.path.isdir(path):
        raise UsageError(f"{kind} checkpoint {path!r} does not exist (run the earlier stage first)")
    what = f"{kind} checkpoint {path!r}"
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UsageError(f"{what} holds no model (config.json missing)")
    verify_manifest(path, what)
    weights = os.path.join(path, "model.safetensors")
    if os.path.isfile(weights):
        check_safetensors(weights, what)
    return read_json_file(cfg_path, what)


def _from_pretrained(cls: type, path: str, kind: str, **kwargs):
    """`cls.from_pretrained(path)`; a file it cannot read is a one-line error."""
    try:
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise UsageError(f"{kind} checkpoint {path!r} cannot be loaded "
                         f"({type(exc).__name__}: {error_reason(exc)})") from None


def load_policy(path: str) -> GPT2LMHeadModel:
    """Load a policy saved with `save_pretrained`; clear error if it is another kind of model."""
    config = _check_checkpoint(path, "policy")
    if "GPT2LMHeadModel" not in config.get("architectures", []):
        raise UsageError(f"policy checkpoint {path!r} holds a {config.get('architectures')} "
                         "model, not a GPT2LMHeadModel policy")
    if holds_adapter(path):  # base + LoRA adapter, merged
        return load_adapter_model(path, "policy", load_policy)
    return _from_pretrained(GPT2LMHeadModel, path, "policy")


def load_reward_model(path: str) -> GPT2ForSequenceClassification:
    """Load a reward model written by the `reward` stage."""
    config = _check_checkpoint(path, "reward model")
    if "GPT2ForSequenceClassification" not in config.get("architectures", []):
        raise UsageError(f"reward checkpoint {path!r} holds a {config.get('architectures')} "
                         "model, not a GPT2ForSequenceClassification reward model")
    if holds_adapter(path):  # base (the SFT policy) + adapter and trained score head, merged
        return load_adapter_model(path, "reward model",
                                  lambda base: reward_model_from_policy(base, 0.0))
    return _from_pretrained(GPT2ForSequenceClassification, path, "reward model")


def reward_model_from_policy(sft_dir: str, head_init_std: float) -> GPT2ForSequenceClassification:
    """A reward model whose backbone starts from the SFT policy and whose head starts small."""
    _check_checkpoint(sft_dir, "SFT")
    if holds_adapter(sft_dir):  # an SFT adapter: the merged policy's backbone
        policy = load_policy(sft_dir)
        config = copy.deepcopy(policy.config)
        config.num_labels, config.architectures = 1, ["GPT2ForSequenceClassification"]
        model = GPT2ForSequenceClassification(config)
        model.transformer.load_state_dict(policy.transformer.state_dict())
        nn.init.normal_(model.score.weight, std=head_init_std)
        return model
    # "newly initialized: score.weight" and "layers were not sharded" are expected here
    loggers = [logging.getLogger(f"transformers.{name}")
               for name in ("modeling_utils", "distributed.tensor_parallel")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        model = _from_pretrained(GPT2ForSequenceClassification, sft_dir, "SFT", num_labels=1)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    nn.init.normal_(model.score.weight, std=head_init_std)
    return model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: (B, L) -> (B, L); padding gets 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_inputs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor) -> dict:
    """Concatenate a left-padded prompt and a right-padded response into model inputs."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()  # (B, P + T)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask)}


def response_logits(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor,
                    temperature: float = 1.0, return_hidden: bool = False):
    """Logits that predict each response token, divided by `temperature`.

    Returns:
        logits: (B, T, V), `logits[:, t]` predicts `response_ids[:, t]`.
        hidden: (B, T, H) final hidden states at the same positions (if `return_hidden`).
    """
    inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
    p, t = prompt_ids.shape[1], response_ids.shape[1]
    if lean_gpt2_supported(model):  # the same numbers without transformers' per-call overhead
        mask = attention_mask_4d(inputs["attention_mask"], 0, p + t)  # (B, 1, L, L)
        hidden = lean_gpt2_hidden(model, inputs["input_ids"], inputs["position_ids"], mask)
        hidden = hidden[:, p - 1: p + t - 1]  # (B, L, H) -> (B, T, H)
        logits = model.lm_head(hidden) / temperature  # (B, T, V)
        return (logits, hidden) if return_hidden else logits
    out = model(**inputs, output_hidden_states=return_hidden, use_cache=False)
    logits = out.logits[:, p - 1: p + t - 1] / temperature  # (B, L, V) -> (B, T, V)
    if not return_hidden:
        return logits
    return logits, out.hidden_states[-1][:, p - 1: p + t - 1]  # (B, T, H)


def reward_scores(reward_model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The reward model's score at each sequence's last real token: (B,)."""
    inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
    if lean_gpt2_supported(reward_model, (GPT2ForSequenceClassification,)):  # as response_logits
        mask = attention_mask_4d(inputs["attention_mask"], 0, inputs["input_ids"].shape[1])
        hidden = lean_gpt2_hidden(reward_model, inputs["input_ids"], inputs["position_ids"],
                                  mask)  # (B, L, H)
    else:
        hidden = reward_model.transformer(**inputs, use_cache=False).last_hidden_state  # (B, L, H)
    last = last_token_index(inputs["attention_mask"])  # (B,)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return reward_model.score(pooled).squeeze(-1)  # (B, 1) -> (B,)


class PolicyWithValueHead(nn.Module):
    """A GPT-2 policy and a scalar value head on its final hidden state (one forward pass).

    The head is initialised to output exactly zero, so the critic starts neutral.
    """

    def __init__(self, policy: GPT2LMHeadModel):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, temperature=1.0):
        """Returns (logits (B, T, V), values (B, T)); `values[:, t]` is V(s_t)."""
        logits, hidden = response_logits(self.policy, prompt_ids, prompt_mask, response_ids,
                                          response_mask, temperature, return_hidden=True)
        return logits, self.value_head(hidden).squeeze(-1)  # (B, T, 1) -> (B, T)

    def save_pretrained(self, path: str, **kwargs) -> None:
        self.policy.save_pretrained(path, **kwargs)
        torch.save(self.value_head.state_dict(), os.path.join(path, VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str) -> PolicyWithValueHead:
        model = cls(load_policy(path))
        head = os.path.join(path, VALUE_HEAD_FILE)
        if os.path.isfile(head):
            model.value_head.load_state_dict(load_torch_file(head, f"checkpoint {path!r}"))
        return model


class RewardCritic(nn.Module):
    """A separate critic initialised from the reward model: its backbone, and its score head
    applied at every position (so V at the last token starts equal to the reward score)."""

    def __init__(self, reward_model: GPT2ForSequenceClassification):
        super().__init__()
        self.transformer = reward_model.transformer
        self.value_head = nn.Linear(reward_model.config.n_embd, 1)
        with torch.no_grad():
            self.value_head.weight.copy_(reward_model.score.weight)
            self.value_head.bias.zero_()

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask):
        """Returns values (B, T): the value of the state before each response token."""
        inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
        hidden = self.transformer(**inputs, use_cache=False).last_hidden_state  # (B, L, H)
        p, t = prompt_ids.shape[1], response_ids.shape[1]
        return self.value_head(hidden[:, p - 1: p + t - 1]).squeeze(-1)  # (B, T)


def load_torch_file(file: str, what: str):
    """`torch.load` of a small state file (value head, critic); one line if unreadable."""
    if not os.path.isfile(file):
        raise UsageError(f"{what}: {os.path.basename(file)} is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UsageError(f"{what}: {os.path.basename(file)} cannot be read (truncated or "
                         f"corrupted: {type(exc).__name__})") from None


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the reference model and the reward model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class PolicyWithCritic(nn.Module):
    """A policy and a separate critic (`RewardCritic`); same interface as `PolicyWithValueHead`."""

    def __init__(self, policy: GPT2LMHeadModel, critic: RewardCritic):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, temperature=1.0):
        """Returns (logits (B, T, V), values (B, T))."""
        logits = response_logits(self.policy, prompt_ids, prompt_mask, response_ids,
                                 response_mask, temperature)
        return logits, self.critic(prompt_ids, prompt_mask, response_ids, response_mask)

    def save_pretrained(self, path: str, **kwargs) -> None:
        self.policy.save_pretrained(path, **kwargs)
        torch.save(self.critic.state_dict(), os.path.join(path, "critic.pt"))


class CriticFreePolicy(nn.Module):
    """A policy alone, with the interface of `PolicyWithValueHead` (values None): the model
    critic-free algorithms (GRPO, RLOO, REINFORCE++) train."""

    def __init__(self, policy: GPT2LMHeadModel):
        super().__init__()
        self.policy = policy

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, temperature=1.0):
        """Returns (logits (B, T, V), None)."""
        return response_logits(self.policy, prompt_ids, prompt_mask, response_ids,
                               response_mask, temperature), None

    def save_pretrained(self, path: str, **kwargs) -> None:
        self.policy.save_pretrained(path, **kwargs)
