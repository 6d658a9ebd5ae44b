"""faasmoe: serve Mixture-of-Experts models with every expert a scale-to-zero FaaS function."""

import os

# OpenMP threads that finish a parallel region sleep at once instead of spinning for the next one. The
# control plane waits on its functions' sockets between regions: a spinning thread took the core its
# function instances needed (measured, quarter preset, batch 8, k = 4, 2 cores: control-plane CPU per
# token 59 -> 23 ms, step 462 -> 367 ms). It must be set before torch loads OpenMP, hence here; a user's
# own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

from faasmoe.engines.distributed import Engine, Generation, load  # noqa: E402

try:
    __version__ = version("faasmoe")  # one source of truth: pyproject.toml
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
__all__ = ["Engine", "Generation", "load", "__version__"]
