"""l2o: learned optimizers in PyTorch."""

__version__ = "0.1.0"
