"""vlmlab: serve, evaluate, benchmark, compare and plan vision-language models."""

__version__ = "0.1.0"
