"""dmg: Domain-specific Masks for Generalization (ECCV 2020) as a reproducible pipeline."""
__version__ = "0.1.0"
