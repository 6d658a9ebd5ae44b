"""faasmoe: serve Mixture-of-Experts models with every expert a scale-to-zero FaaS function."""

from faasmoe.engine import Engine, Generation, load

__version__ = "0.1.0"
__all__ = ["Engine", "Generation", "load", "__version__"]
