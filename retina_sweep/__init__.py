"""retina_sweep: RetinaNet ablation sweeps."""

__version__ = "0.1.0"
