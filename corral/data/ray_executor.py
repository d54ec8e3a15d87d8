"""Shard tasks on a Ray cluster: the only module in corral that imports ray.

``ray.init()`` starts a local cluster sized to ``workers`` (no dashboard: it costs seconds at start), or
joins an existing one at ``address`` ("auto" or "ray://host:10001", e.g. one made by ``ray start --head``).
Each task asks for one CPU, so at most ``workers`` run at once on a local cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from corral.data.executor import RunTasks, Task


def run_ray(workers: int, address: str | None = None) -> RunTasks:
    import ray
    from tqdm import tqdm

    import corral

    def run(fn: Callable[[Task], None], tasks: list[Task], label: str) -> None:
        started = not ray.is_initialized()
        if started:
            # workers import corral from this checkout, wherever Ray starts them
            env = {"env_vars": {"PYTHONPATH": str(Path(corral.__file__).parents[1])}}
            if address:
                ray.init(address=address, runtime_env=env, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, runtime_env=env, log_to_driver=False)
        try:
            remote = ray.remote(num_cpus=1, max_retries=2)(fn)
            pending = [remote.remote(task) for task in tasks]
            bar = tqdm(total=len(tasks), desc=label, unit="shard", disable=None)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # re-raises a task's error here
                bar.update(len(done))
            bar.close()
        finally:
            if started:
                ray.shutdown()
    return run
