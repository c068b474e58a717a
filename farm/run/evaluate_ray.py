"""`ufarm evaluate --executor ray`: evaluate_store's jobs (evaluation.report.chunks) as Ray tasks.

Each job is one task of 1 CPU that opens the store by its URI and reads only its rows, so a worker's memory
follows the chunk of examples, not the store. Results come back through Ray's object store. Workers take
the store's credentials from their own environment (profile, instance role), as the training workers do:
only the non-secret settings of farm.settings (forwarded_env) travel in the tasks' runtime_env.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from farm.settings import forwarded_env

from .ray_executor import ensure_ray

__all__ = ["ray_map", "shared_once"]

_CONTAINERS = (dict, list, bytes, np.ndarray)


def ray_map(address: str | None = None) -> Callable[[Callable, list[tuple]], list]:
    """A map for evaluate_store(map_chunks=...): ``map(fn, [args, ...])`` runs fn(*args) as Ray tasks of 1 CPU
    each on the cluster at ``address`` (or RAY_ADDRESS, else a local Ray started here) and returns their
    results in order. Safe to call from two threads at once (evaluate_store does)."""
    import ray  # Ray on demand: farm.run also serves the plain loop, on machines without Ray

    ensure_ray(address)
    env = forwarded_env()  # an empty runtime_env lets Ray use its prestarted worker processes
    options = {"num_cpus": 1, **({"runtime_env": {"env_vars": env}} if env else {})}
    remotes: dict[Callable, object] = {}

    def map_chunks(fn: Callable, args: list[tuple]) -> list:
        if not args:
            return []
        remote = remotes.get(fn)
        if remote is None:
            remote = remotes.setdefault(fn, ray.remote(**options)(fn))
        return ray.get([remote.remote(*a) for a in shared_once(args, ray.put)])

    return map_chunks


def shared_once(args: list[tuple], put: Callable) -> list[tuple]:
    """``args`` with every container (dict, list, bytes, array) that several jobs share as one object put once
    (``put``, ray.put: a reference that Ray hands each task as the value).  Ray would otherwise copy it into
    its object store for every task, e.g. the shadows' footers that every chunk's job reads."""
    seen = Counter(id(v) for a in args for v in a if isinstance(v, _CONTAINERS))
    refs: dict[int, object] = {}

    def one(v):
        if not isinstance(v, _CONTAINERS) or seen[id(v)] < 2:
            return v
        if id(v) not in refs:
            refs[id(v)] = put(v)
        return refs[id(v)]

    return [tuple(one(v) for v in a) for a in args]
