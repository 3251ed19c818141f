"""A stand-in Hydra app for the Optuna sweeper's mechanics (fast, no training).

Objective: -(x - 1)^2, reported at steps 1..5 as `x_value * step / 5`; trials whose number is in
`bad_trials` report a falling curve instead (a trial built to be bad, for the pruner). Each run
appends its trial number to `log_file`, so tests can check that no trial ran twice. A trial whose
number is in `interrupt_trials` is interrupted at step 3 (Ctrl-C, as KeyboardInterrupt); one in
`kill_trials` kills its process at step 3 (SIGKILL, as the OOM killer or `kill -9` would); one in
`fail_trials` raises at step 3 (a crash), one in `nan_trials` returns NaN (a diverged run).
"""

from __future__ import annotations

import math
import os
import signal

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    number = int(cfg.extra_tags.get("optuna_trial", -1))
    with open(cfg.log_file, "a") as fh:
        fh.write(f"{number}\n")
    value = -((cfg.x - 1.0) ** 2)
    pruner = instantiate(cfg.pruning) if cfg.pruning is not None else None
    for step in range(1, 6):
        if step == 3 and number in cfg.get("interrupt_trials", []):
            raise KeyboardInterrupt
        if step == 3 and number in cfg.get("kill_trials", []):
            os.kill(os.getpid(), signal.SIGKILL)
        if step == 3 and number in cfg.get("fail_trials", []):
            raise RuntimeError(f"trial {number} crashed")
        reported = -10.0 * step if number in cfg.bad_trials else value * step / 5
        if pruner is not None and pruner.report(step, {"AP": reported}):
            return pruner.pruned(step)
    return math.nan if number in cfg.get("nan_trials", []) else value


if __name__ == "__main__":
    main()
