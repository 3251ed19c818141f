"""Hydra configs of retina_sweep (a package so that `pkg://retina_sweep.conf` works from a wheel)."""
