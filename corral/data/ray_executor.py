"""Shard tasks on a Ray cluster: the only module in corral that imports ray.

``ray.init()`` starts a local cluster sized to ``workers`` (no dashboard: it costs seconds at start), or
joins an existing one at ``address`` ("auto", or "ray://host:10001" for one made by ``ray start --head``).
The cluster is joined once for the whole run (every stage), and each task asks for one CPU, so at most
``workers`` run at once on a local cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from corral.data.executor import RunTasks, Task


@contextmanager
def ray_runner(workers: int, address: str | None = None) -> Iterator[RunTasks]:
    import ray
    from tqdm import tqdm

    import corral

    # workers import corral from this checkout, wherever Ray starts them
    env = {"env_vars": {"PYTHONPATH": str(Path(corral.__file__).parents[1])}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        _start_local(ray, workers, env)

    def run(fn: Callable[[Task], None], tasks: list[Task], label: str) -> None:
        remote = ray.remote(num_cpus=1, max_retries=2)(fn)
        pending = [remote.remote(task) for task in tasks]
        bar = tqdm(total=len(tasks), desc=label, unit="shard", disable=None)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # re-raises a task's error here
            bar.update(len(done))
        bar.close()

    try:
        yield run
    finally:
        ray.shutdown()


def _start_local(ray, workers: int, env: dict, attempts: int = 3) -> None:
    """ray.init a local cluster; Ray gives its raylet a fixed 30 s to register, which a heavily loaded
    machine can miss ("The current node timed out during startup"), so the start is tried again."""
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=workers, include_dashboard=False, runtime_env=env, log_to_driver=False)
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise
