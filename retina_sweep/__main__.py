"""`python -m retina_sweep [overrides]`: one training run, or a sweep with `+sweep=NAME`."""

from __future__ import annotations

import signal
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .config import exit_on_bad_input
    from .tracking import redact_hydra_files
    from .train import run

    redact_hydra_files()  # Hydra saved .hydra/*.yaml as given, passwords in URLs included
    if HydraConfig.get().mode != RunMode.RUN:
        return run(cfg)  # a sweep's trial: the sweeper records an error as FAILED and goes on
    with exit_on_bad_input("retina_sweep"):
        return run(cfg)


def entry() -> None:
    """`main`, with an interrupt (Ctrl-C, SIGINT, SIGTERM from `kill` or a scheduler) ending the
    command with one line and the shell's status for that signal (130, 143), not a traceback:
    by then the interrupted trials are recorded KILLED and the sweep's parent run closed
    (`retina_sweep.signals`), and running the same command again resumes them."""
    from .signals import Terminated

    try:
        main()
    except KeyboardInterrupt as exc:
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        print(
            f"retina_sweep: {exc or 'interrupted by SIGINT'}; finished runs are kept, and the "
            "same command resumes the interrupted ones from their checkpoints",
            file=sys.stderr,
        )
        sys.exit(128 + signum)


if __name__ == "__main__":
    entry()
