"""`tuneforge doctor [overrides] [--json]`: the doctor's checks (tasks/doctor.py) on the tokenizer, the model's config
(no weights) and the prepared data, exactly as `train` would prepare them; exit 1 when a check fails. For the tasks
that learn from rewards (task=grpo|rloo) the reward doctor follows (tasks/reward_doctor.py): it loads the weights and
samples from the starting policy."""

from __future__ import annotations

from pathlib import Path

from tuneforge.commands.base import INSPECT_ARGS, hydra_command
from tuneforge.config.compose import to_validated
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.config.tasks import task


def run(cfg: TuneforgeConfig) -> list:
    """The task's own data stage (tokenizer + data, no weights), then the task's checks (tasks/doctor.Check)."""
    # Imported when the command runs: `tuneforge --help` reads every command module, and must not load torch.
    from tuneforge.models.loading import load_config
    from tuneforge.tasks import doctor
    from tuneforge.tasks.stages import stages_class

    if not task(cfg.task).doctor:
        raise ConfigError(f"the doctor checks chat rows, masks and preference rows; task={cfg.task} has none of them "
                          "(its label checks run when training starts).")
    stages = stages_class(cfg.task)(cfg, None, True)  # no run directory: prepare() only reads and caches
    stages.prepare()
    checks = doctor.run_checks(doctor.Context(cfg, stages.tokenizer, stages.tok_report,
                                              load_config(stages.model_path, cfg.model), stages.data))
    if task(cfg.task).rewards and cfg.doctor.reward_prompts > 0 and not doctor.has_errors(checks):
        checks += reward_checks(cfg, stages)
    doctor.print_table(checks)
    if cfg.doctor.json_path:
        doctor.write_json(checks, Path(cfg.doctor.json_path))
    return checks


def reward_checks(cfg: TuneforgeConfig, stages) -> list:
    """Online RL: the reward doctor on the starting policy (the one check that needs the weights: it samples)."""
    from transformers import set_seed

    from tuneforge.tasks import reward_doctor
    from tuneforge.tasks.stages import starting_policy

    set_seed(cfg.train.seed)
    model = stages.build_model()
    with starting_policy(model, stages.sft_adapter):
        report = reward_doctor.examine(model, stages.tokenizer, stages.doctor_rows(), stages.rewards, stages.args,
                                       cfg.train.max_length, cfg.eval.batch_size)
    reward_doctor.print_report(report)
    return reward_doctor.checks(report, cfg.doctor.max_no_signal, stages.args.max_completion_length)


def app(dcfg) -> None:
    from tuneforge.tasks.doctor import has_errors

    if has_errors(run(to_validated(dcfg))):
        raise SystemExit(1)


def rewrite_args(args: list[str]) -> list[str]:
    """`--json` (a flag people expect; Hydra would reject it) writes doctor.json."""
    return [a for a in args if a != "--json"] + (["doctor.json_path=doctor.json"] if "--json" in args else [])


COMMAND = hydra_command(
    "doctor", "check tokenizer, template, masks and data before training (--json also writes doctor.json)",
    config_name="config", schema=TuneforgeConfig, app=app, rewrite_args=rewrite_args, extra_args=INSPECT_ARGS)
