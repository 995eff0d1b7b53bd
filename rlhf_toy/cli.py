"""`rlhf-toy STAGE [--config FILE] [--key value ...]`: every stage, and the whole pipeline.

Bad input (unknown stage, key or task, a value out of range, a missing checkpoint or
dataset) ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

from rlhf_toy.config import parse_config
from rlhf_toy.errors import NonFiniteError, StorageError, UsageError
from rlhf_toy.methods import METHODS, STAGES


def _stages() -> dict[str, tuple[type, Callable[..., dict], list[str]]]:
    """stage -> (config class, runner, headline keys), from the registry in `methods.py`."""
    return {name: (*stage.load(), list(stage.keys)) for name, stage in STAGES.items()}


PIPELINE = ("sft", "prefs", "reward", "ppo", "dpo", "compare")
# which earlier stage directory each input field of a stage points to in a pipeline run
STAGE_INPUTS = {"sft_dir": "sft", "prefs_dir": "prefs", "reward_dir": "reward"}


@dataclasses.dataclass
class PipelineConfig:
    """Every stage end to end, each into OUTPUT_DIR/<stage>/ reading the earlier ones."""

    output_dir: str = dataclasses.field(default="runs/pipeline",
                                        metadata={"help": "run directory; stages go in subdirs"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed for every stage"})
    task: str = dataclasses.field(default="sentiment", metadata={
        "help": "toy task: a name or package.module:ClassName (a rlhf_toy.tasks.Task subclass)"})
    config_dir: str = dataclasses.field(
        default="", metadata={"help": "directory of per-stage YAML files (e.g. configs/gpu)"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto | cpu | cuda"})
    overwrite_output_dir: bool = dataclasses.field(
        default=False, metadata={"help": "replace the stages of an earlier pipeline run"})
    model_name_or_path: str = dataclasses.field(default="", metadata={
        "help": "a local Hugging Face causal-LM directory with its tokenizer for sft to "
                "fine-tune instead of a fresh tiny GPT (every later stage starts from sft's "
                "output); empty = off"})
    prefs_path: str = dataclasses.field(default="", metadata={
        "help": "preference pairs of your own (see `rlhf-toy reward --help`) for reward, dpo "
                "and compare: they replace the prefs stage"})
    prompts_path: str = dataclasses.field(default="", metadata={
        "help": "prompts of your own for the on-policy stages and every evaluation; there is "
                "then no gold reward (the reports say so)"})
    compare_seeds: list[int] = dataclasses.field(default_factory=list, metadata={
        "help": "seeds the compare stage trains every method on; empty = --seed alone (the "
                "demo's size), e.g. 0 1 2 for means with standard errors"})

    def __post_init__(self) -> None:
        from rlhf_toy.tasks import task_class

        task_class(self.task)
        if os.path.isfile(self.output_dir):
            raise UsageError(f"output_dir {self.output_dir!r} is a file; give a directory")
        if self.config_dir and not os.path.isdir(self.config_dir):
            raise UsageError(f"config_dir {self.config_dir!r} does not exist")
        if self.model_name_or_path and not os.path.isdir(self.model_name_or_path):
            raise UsageError(f"model_name_or_path must be a local directory holding a Hugging "
                             f"Face causal LM and its tokenizer (got {self.model_name_or_path!r})")


def _stage_argv(pipe: PipelineConfig, stage: str, cls: type) -> list[str]:
    argv = []
    yaml_file = os.path.join(pipe.config_dir, f"{stage}.yaml") if pipe.config_dir else ""
    if yaml_file and os.path.isfile(yaml_file):
        argv += ["--config", yaml_file]
    argv += ["--output_dir", os.path.join(pipe.output_dir, stage), "--seed", str(pipe.seed),
             "--task", pipe.task, "--device", pipe.device,
             "--overwrite_output_dir", str(pipe.overwrite_output_dir).lower()]
    names = {f.name for f in dataclasses.fields(cls)}
    for name, source in STAGE_INPUTS.items():
        if name in names:
            argv += [f"--{name}", os.path.join(pipe.output_dir, source)]
    if stage == "sft" and pipe.model_name_or_path:
        argv += ["--model_name_or_path", pipe.model_name_or_path]
    for name in ("prefs_path", "prompts_path"):  # a user's data, where the stage reads it
        if getattr(pipe, name) and name in names:
            argv += [f"--{name}", getattr(pipe, name)]
    if stage == "compare":  # the pipeline's own runs are compare's for --seed
        argv += ["--method_dirs", *(f"{name}={os.path.join(pipe.output_dir, m.stage)}"
                                    for name, m in METHODS.items()
                                    if m.stage in PIPELINE and not m.overrides)]
        argv += ["--config_dir", pipe.config_dir] if pipe.config_dir else []
        argv += ["--seeds", *map(str, pipe.compare_seeds or [pipe.seed])]
    return argv


def pipeline_stages(pipe: PipelineConfig) -> list[str]:
    """The stages a pipeline runs: a user's pairs replace `prefs`."""
    return [stage for stage in PIPELINE if not (stage == "prefs" and pipe.prefs_path)]


def run_pipeline(pipe: PipelineConfig) -> dict:
    stages = _stages()
    results = {}
    for stage in pipeline_stages(pipe):
        cls, runner, keys = stages[stage]
        cfg = parse_config(cls, _stage_argv(pipe, stage, cls), prog=f"rlhf-toy {stage}")
        results[stage] = runner(cfg)
        _print_line(stage, results[stage], keys)
    compare = results["compare"]
    print(f"report: {compare['report']} (one page: {compare['report_html']})\n"
          f"plots: {', '.join(compare['plots'].values())}",
          flush=True)
    return results


def _print_line(stage: str, summary: dict, keys: list[str]) -> None:
    from rlhf_toy.train.common import stage_line

    print(stage_line(stage, summary, keys), flush=True)


USAGE = ("usage: rlhf-toy STAGE [--config FILE] [--key value ...]\n"
         f"stages: {', '.join(PIPELINE)}, grpo, rloo, reinforce_pp, inspect, pipeline, "
         "tasks\n"
         "`rlhf-toy STAGE --help` lists a stage's keys.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not sys.stderr.isatty():  # no carriage-return bars of datasets / hub in a log file
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    stage, rest = argv[0], argv[1:]
    try:
        if stage == "tasks":
            from rlhf_toy.tasks import TASKS

            width = max(map(len, TASKS))
            for name, cls in TASKS.items():
                print(f"{name:{width}s} {(cls.__doc__ or cls.__module__).strip().splitlines()[0]}")
            return 0
        if stage == "pipeline":
            run_pipeline(parse_config(PipelineConfig, rest, prog="rlhf-toy pipeline"))
            return 0
        stages = _stages()
        if stage not in stages:
            raise UsageError(f"stage must be one of {sorted([*stages, 'pipeline', 'tasks'])} "
                             f"(got {stage!r})")
        cls, runner, keys = stages[stage]
        _print_line(stage, runner(parse_config(cls, rest, prog=f"rlhf-toy {stage}")), keys)
        return 0
    except UsageError as exc:
        print(f"rlhf-toy: error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteError, StorageError) as exc:  # a fault, not bad input: exit 1, one line
        print(f"rlhf-toy: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `rlhf-toy inspect ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    except KeyboardInterrupt:
        print("rlhf-toy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
