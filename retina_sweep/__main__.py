"""`python -m retina_sweep [overrides]`: one training run, or a sweep with `+sweep=NAME`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .config import exit_on_bad_input
    from .train import run

    if HydraConfig.get().mode != RunMode.RUN:
        return run(cfg)  # a sweep's trial: the sweeper records an error as FAILED and goes on
    with exit_on_bad_input("retina_sweep"):
        return run(cfg)


if __name__ == "__main__":
    main()
