"""lit_dreamer: DreamerV3 as a PyTorch Lightning framework."""

__version__ = "0.1.0"
