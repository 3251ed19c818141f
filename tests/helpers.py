"""Helpers shared by the tests: compose the project's Hydra config like the entry point does."""

from __future__ import annotations

from hydra import compose, initialize_config_module
from omegaconf import DictConfig


def compose_config(overrides: list[str] | None = None, *, hydra: bool = False) -> DictConfig:
    """The composed config of `python -m retina_sweep <overrides>` (without running anything)."""
    with initialize_config_module("retina_sweep.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides or []), return_hydra_config=hydra)
