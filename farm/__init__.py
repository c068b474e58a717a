"""unlearning-farm: trains reference models for judging machine unlearning and stores their outputs.

The farm follows the data: `spec` (a run's typed config) -> `plan` (the jobs) -> `run` (executors: a plain
loop, Ray actors, Ray Train, Ray Tune) -> `train` (torch only: models, loops, methods, stacked training)
-> `store` (the run store). The statistics that judge a store are in the `evaluation` package.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("unlearning-farm")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0.0.0+unknown"
