"""cycleprune: LR range test, cyclical learning rates, magnitude pruning and compression for
compact image classifiers, as a plain Python library (no kfp here; see ``components/``)."""

__version__ = "0.5.0"
