"""Running a spec: `prepare` (validate, plan, manifest), `scheduler` (retries, failures, progress), and the
executors: `local` (a plain loop), `ray_executor` (Ray actors), `data_parallel` (Ray Train, one model across
several workers) and `tune` (Ray Tune searches over unlearning hyper-parameters). Every import of Ray in the
farm is under this package, inside the functions that need it."""
from .local import run_local
from .prepare import PreparedRun, RunResult, build_manifest, prepare_run
from .ray_executor import check_cluster_fits, ensure_ray, run_ray, run_spec, shutdown_ray

__all__ = ["PreparedRun", "RunResult", "build_manifest", "check_cluster_fits", "ensure_ray", "prepare_run",
           "run_local", "run_ray", "run_spec", "shutdown_ray"]
