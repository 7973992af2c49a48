"""`tsn predict --address`: a collection scored over a Ray cluster, resumably (`app.batch_predict`).

Ray actors, not Ray Data: the unit of work is a part of a packed split that our own loader
reads (DALI, the exact per-sample plans, CRC checks, quarantine) or a run of video files that
`app.predict` decodes, so a datasource would only wrap what the part function already does, and
Ray Data's ``read_videos`` yields one frame per row, which segment sampling cannot use. What the
cluster adds is placement and the model loaded once per worker: a pool of ``workers`` actors,
each holding its `PartScorer`, one part in flight per actor. The driver writes each part as it
arrives (`Output.write_part`, atomic), so a killed driver loses at most the parts in flight; an
actor lost with its node is restarted and its part re-run (``max_restarts`` /
``max_task_retries``).
"""

from __future__ import annotations

import sys
import time

from app.batch_predict import Job, Output, PartScorer
from cluster.job import object_storage_env, ray_process_env
from cluster.pack import connect

ACTOR_RETRIES = 2  # a lost actor (node gone, OOM) is restarted and its part retried this often


def _scorer_actor(cpus: float, gpus: float):
    import ray

    @ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES)
    class Scorer:
        def __init__(self, checkpoint: str, fast: bool, device: str):
            import torch

            torch.set_num_threads(max(1, int(cpus)))  # the actor's share, not every core of the node
            self._scorer = PartScorer(checkpoint, fast=fast, device=device)

        def score(self, job: Job, part: int) -> dict:
            return self._scorer(job, part)

    return Scorer


def run_on_cluster(job: Job, out: str, *, address: str, workers: int = 1, cpus_per_worker: float = 1.0,
                   device: str = "cpu", progress: bool = True) -> dict:
    """Score ``job``'s missing parts on ``workers`` Ray actors at ``address`` (``local``: a new
    local cluster of ``workers * cpus_per_worker`` CPUs), then commit ``out``. Returns the
    summary of `Output.commit` plus ``seconds``, ``scored_now`` (videos scored by this run) and
    ``workers``."""
    import ray

    if workers < 1 or cpus_per_worker <= 0:
        raise ValueError(f"--workers must be >= 1 and --cpus-per-worker > 0, got {workers}, {cpus_per_worker}")
    output = Output(out, job)
    todo = output.open()
    t0 = time.perf_counter()
    scored = 0
    if todo:
        env = {**ray_process_env(), **object_storage_env(job.shards or "")}
        connect(address, int(workers * cpus_per_worker) + 1 if address == "local" else None, env)
        workers = min(workers, len(todo))
        actor = _scorer_actor(cpus_per_worker, 1.0 if device.startswith("cuda") else 0.0)
        pool = [actor.remote(job.checkpoint, job.fast, device) for _ in range(workers)]
        bar = None
        if progress:
            from tqdm import tqdm

            done_parts = job.num_parts - len(todo)
            bar = tqdm(total=job.num_parts, initial=done_parts, unit="part", file=sys.stderr, dynamic_ncols=True,
                       desc=f"predict on {workers} worker(s)")
        queue = list(todo)
        pending = {}
        try:
            for a in pool:
                if queue:
                    p = queue.pop(0)
                    pending[a.score.remote(job, p)] = (a, p)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    a, p = pending.pop(ref)
                    scored += output.write_part(p, ray.get(ref))  # an error in a part ends the run here
                    if bar is not None:
                        bar.update(1)
                    if queue:
                        q = queue.pop(0)
                        pending[a.score.remote(job, q)] = (a, q)
        finally:
            for a in pool:  # an interrupted run: its parts in flight are redone by the next run
                ray.kill(a)
            if bar is not None:
                bar.close()
    summary = output.commit()
    return {**summary, "seconds": time.perf_counter() - t0, "scored_now": scored, "workers": workers}
