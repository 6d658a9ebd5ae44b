"""faasmoe: serve Mixture-of-Experts models with every expert a scale-to-zero FaaS function."""

from importlib.metadata import PackageNotFoundError, version

from faasmoe.engines.distributed import Engine, Generation, load

try:
    __version__ = version("faasmoe")  # one source of truth: pyproject.toml
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
__all__ = ["Engine", "Generation", "load", "__version__"]
