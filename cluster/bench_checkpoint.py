"""`tsn bench-checkpoint`'s measurement: how long the training loop waits per checkpoint,
synchronous (``checkpoint.background=false``: written, stored and committed before training
goes on) against in the background (the default, `cluster.ray_hooks`), in one Ray Train run.

One Ray Train worker runs, for each model (``tiny``: the embedded default's TSN; ``bninception``:
the paper's, ~80 MB with its SGD momentum) and each mode, the product's own checkpoint path
(`cluster.ray_hooks.RayHooks.save_checkpoint`, the run store's index and retention) between
real training steps of the tiny TSN (``steps_between`` per checkpoint), into ``storage_path``
(a local directory or ``s3://``). Per row: the loop's wait per checkpoint (median, max), the
checkpoint size, and the loop's wall time against the same steps without checkpoints (the
``baseline`` row of that model, measured in the same run): ``overhead_ratio`` = loop / baseline
(1.0: checkpoints cost the loop nothing; on CPU the background write also takes cycles from
the training steps, which this ratio includes).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

MODES = ("sync", "background")
MODELS = ("tiny", "bninception")


def _worker(config: dict) -> None:
    """The Ray Train worker: every (model, mode) row; the result JSON goes to ``config['out']``."""
    import torch

    from app.config import load_config
    from cluster.ray_hooks import RayHooks
    from tsn import checkpoint as ckpt
    from tsn.engine import train_step
    from tsn.model import TSN
    from tsn.schedule import build_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = TSN(6, 3, "rgb", 1, backbone="tiny")  # the training between checkpoints
    net_opt = build_optimizer(net, lr=0.01, momentum=0.9, weight_decay=5e-4)
    frames, labels = torch.randn(8, 3, 1, 3, 56, 56), torch.randint(0, 6, (8,))

    def work() -> None:
        for _ in range(config["steps_between"]):
            train_step(net, frames, labels, net_opt)

    rows, step = [], 0
    for model_name in config["models"]:
        model = TSN(101, 3, "rgb", 1, backbone=model_name)  # what is saved: UCF101's head
        opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
        size = 56 if model_name == "tiny" else 96  # the state's size does not depend on the input's
        train_step(model, torch.randn(2, 3, 1, 3, size, size), torch.randint(0, 101, (2,)), opt)  # momentum
        work()  # warm
        t0 = time.perf_counter()
        for _ in range(config["checkpoints"]):
            work()
        baseline_s = time.perf_counter() - t0
        rows.append({"model": model_name, "mode": "baseline", "loop_s": baseline_s})
        for mode in config["modes"]:
            name = f"{config['name']}-{model_name}-{mode}"
            cfg = load_config(None, [f"run.storage_path={config['storage_path']}", f"run.name={config['name']}",
                                     f"checkpoint.background={mode == 'background'}", "metrics.port=0",
                                     "checkpoint.keep_last=1", "checkpoint.keep_best=false"])
            hooks = RayHooks(cfg, Path(config["run_root"]) / name, progress_every_s=1e9)
            stalls = []
            t0 = time.perf_counter()
            for i in range(config["checkpoints"]):
                work()
                step += 1

                def state_fn(i=i, step=step):
                    return ckpt.checkpoint_state(model=model, optimizer=opt, epoch=i, step=step,
                                                 loader_position=(i + 1, 0), config={})
                t = time.perf_counter()
                hooks.save_checkpoint(state_fn, {"epoch": i, "step": step})
                stalls.append(time.perf_counter() - t)
            loop_s = time.perf_counter() - t0
            hooks.writer.wait()  # the last one stored before the next row measures anything
            entries = hooks.store.checkpoint_entries()
            hooks.close()
            rows.append({"model": model_name, "mode": mode, "loop_s": loop_s,
                         "stall_median_s": statistics.median(stalls), "stall_max_s": max(stalls),
                         "stall_per_checkpoint_s": stalls, "overhead_ratio": loop_s / baseline_s,
                         "checkpoints_indexed": len(entries),
                         "size_bytes": hooks.stored[-1]["size_bytes"] if hooks.stored else None})
    Path(config["out"]).write_text(json.dumps(rows))


def run_bench(storage_path: str, *, models=MODELS, modes=MODES, checkpoints: int = 5,
              steps_between: int = 10) -> dict:
    """All rows into ``storage_path`` (a local directory or an ``s3://`` URI, whose AWS
    variables the Ray workers get as the training job's do); starts a local Ray cluster unless
    one is initialised. Returns the JSON-ready result."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from cluster.job import ray_process_env, object_storage_env
    from dataloading.store.storage import is_uri

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 runtime_env={"env_vars": {**ray_process_env(), **object_storage_env(storage_path)}})
    name = f"bench-ckpt-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="tsn-bench-ckpt-"))
    try:
        out = work / "rows.json"
        TorchTrainer(_worker, train_loop_config={
            "models": list(models), "modes": list(modes), "checkpoints": checkpoints, "steps_between": steps_between,
            "storage_path": storage_path, "name": name, "run_root": str(work), "out": str(out)},
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(name=name, storage_path=storage_path,
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None))).fit()
        rows = json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _remove_run(storage_path, name, is_uri(storage_path))
    result = {"storage": storage_path, "checkpoints_per_row": checkpoints, "steps_between": steps_between,
              "rows": rows}
    for model in models:  # background against sync, same model, same run
        by_mode = {r["mode"]: r for r in rows if r["model"] == model}
        if "sync" in by_mode and "background" in by_mode:
            result[f"{model}_stall_ratio_background_vs_sync"] = (
                by_mode["background"]["stall_median_s"] / by_mode["sync"]["stall_median_s"])
    return result


def _remove_run(storage_path: str, name: str, uri: bool) -> None:
    """The benchmark's checkpoints are not kept."""
    if not uri:
        shutil.rmtree(Path(storage_path) / name, ignore_errors=True)
        return
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(f"{storage_path.rstrip('/')}/{name}")
    try:
        fs.delete_dir(path)
    except OSError:
        pass


def format_table(result: dict) -> str:
    lines = [f"checkpoint stall into {result['storage']} ({result['checkpoints_per_row']} checkpoints per row, "
             f"{result['steps_between']} tiny-TSN training steps between)",
             f"{'model':<12} {'mode':<11} {'MB':>6} {'stall median s':>15} {'stall max s':>12} {'loop / baseline':>16}"]
    for r in result["rows"]:
        if r["mode"] == "baseline":
            lines.append(f"{r['model']:<12} {'baseline':<11} {'':>6} {'':>15} {'':>12} {'1.00':>16}")
            continue
        lines.append(f"{r['model']:<12} {r['mode']:<11} {r['size_bytes'] / 1e6:>6.1f} {r['stall_median_s']:>15.3f} "
                     f"{r['stall_max_s']:>12.3f} {r['overhead_ratio']:>16.2f}")
    for k, v in result.items():
        if k.endswith("_stall_ratio_background_vs_sync"):
            lines.append(f"{k}: {v:.3f}")
    return "\n".join(lines)
