"""`python -m retina_sweep [overrides]`: one training run, or a sweep with `+sweep=NAME`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from .train import run

    return run(cfg)


if __name__ == "__main__":
    main()
