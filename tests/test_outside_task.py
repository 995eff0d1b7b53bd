"""A task defined outside the package, by `--task test_outside_task:VowelTask`.

`VowelTask` is the README's example task: prompts ask for N letters, gold is the share of
vowels over max(response length, N). The SFT corpus draws letters uniformly, so SFT
starts near gold 0.5; PPO (through the reward model) and DPO (through the pairs) must both
raise held-out gold, with exactly the settings the built-in tasks get.
"""

import random

import pytest
from conftest import run_stage

from rlhf_toy.cli import PipelineConfig
from rlhf_toy.config import SFTConfig, UsageError, parse_config
from rlhf_toy.tasks import Task, get_task

SPEC = "test_outside_task:VowelTask"


class VowelTask(Task):
    """Answer "say N :" with N letters; gold is the share of vowels."""

    name = "vowels"
    words = ("say", ":", "1", "2", "3", "4", "a", "e", "k", "t")
    max_prompt_tokens = 3
    max_response_tokens = 4

    def sample_prompt(self, rng: random.Random) -> str:
        return f"say {rng.randint(1, 4)} :"

    def sample_response(self, prompt: str, rng: random.Random) -> str:
        return " ".join(rng.choice("aekt") for _ in range(int(prompt.split()[1])))

    def gold(self, prompt: str, response: str) -> float:
        words, n = response.split(), int(prompt.split()[1])
        return sum(w in ("a", "e") for w in words) / max(len(words), n)


class NotATask:
    pass


class HalfATask(Task):  # gold is missing
    words = ("a",)
    max_prompt_tokens = max_response_tokens = 1

    def sample_prompt(self, rng):
        return "a"

    def sample_response(self, prompt, rng):
        return "a"


def test_spec_loads_the_class_and_names_keep_working():
    task = get_task(SPEC)
    assert type(task).__name__ == "VowelTask"
    assert task.gold("say 2 :", "a k") == 0.5 and task.gold("say 2 :", "a k t t") == 0.25
    assert parse_config(SFTConfig, ["--task", SPEC]).task == SPEC
    assert PipelineConfig(task=SPEC).task == SPEC
    assert type(get_task("sorting")).__name__ == "SortingTask"


@pytest.mark.parametrize(("spec", "message"), [
    ("no_such_module_xyz:Task", "no module named 'no_such_module_xyz'"),
    ("test_outside_task:Missing", "has no attribute 'Missing'"),
    ("test_outside_task:NotATask", "NotATask must be a subclass of rlhf_toy.tasks.Task"),
    ("test_outside_task:HalfATask", "HalfATask must implement gold"),
    ("chess", "task must be one of ['long_review', 'sentiment', 'sorting'] or "
              "package.module:ClassName"),
    ("test_outside_task:", "task must be one of"),
])
def test_bad_specs_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_config(SFTConfig, ["--task", spec])


@pytest.fixture(scope="module")
def vowel_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vowels"))
    summaries = {stage: run_stage(stage, out, task=SPEC) for stage in ("sft", "prefs", "reward")}
    summaries["ppo"] = run_stage("ppo", out, "--max_steps", "12", "--batch_size", "32",
                                 "--mini_batch_size", "16", task=SPEC)
    summaries["dpo"] = run_stage("dpo", out, "--max_steps", "30", "--eval_steps", "0",
                                 "--n_eval_prompts", "64", task=SPEC)
    return summaries


def test_pipeline_on_the_outside_task_raises_gold_with_both_methods(vowel_run):
    """Gains in held-out gold with these settings, seeds 0-4 (this test runs seed 0):
    PPO +0.333, +0.338, -0.443, +0.378, +0.221; DPO +0.271, +0.317, +0.225, +0.384, +0.351;
    SFT gold 0.48-0.55, reward-model accuracy 0.78-0.86. PPO collapses on seed 2 (KL 5.8):
    the instability of PPO's defaults that issue 12 part 1 is about, not a task matter."""
    assert 0.4 < vowel_run["sft"]["gold_reward"] < 0.6
    assert vowel_run["reward"]["eval_accuracy"] > 0.7
    for method in ("ppo", "dpo"):
        s = vowel_run[method]
        assert s["gold_reward_after"] > s["gold_reward_before"] + 0.1, method
