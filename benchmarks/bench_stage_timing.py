"""What per-stage timing of the input pipeline costs (`dataloading.pipeline.stage_times`), and where a
batch's time goes: clips/s of the training loader (`TSNLoader`, train mode, the embedded
default's spec) with ``stage_timing`` on and off, in interleaved rounds of one run, and the
seconds per batch of each stage.

    .venv/bin/python benchmarks/bench_stage_timing.py [--dataset DIR] [--rounds 5] [--epochs 3] [--json out.json]

Without ``--dataset`` it uses the embedded default's packed dataset (``tsn stream`` prepares it).
Each round runs one loader with timing on and one with it off, over the same epochs (after a
warm-up epoch each: the first epoch faults in DALI's buffers). The result is the median ratio
of those pairs. These shared 2-core machines drift between runs, and the pairs share a round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def clips_per_s(loader, epochs: int) -> float:
    for _ in loader:  # warm-up epoch
        pass
    t0, clips = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            clips += batch.frames.shape[0]
    return clips / (time.perf_counter() - t0)


def main() -> int:
    from app.config import load_config
    from app.data import prepare_dataset
    from app.pipeline import pipeline_spec
    from dataloading.pipeline.loader import TSNLoader
    from dataloading.pipeline.stage_times import STAGES, format_stages, per_batch, slowest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="a packed dataset (default: the embedded default's)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--json", help="also write the JSON result here")
    args = p.parse_args()
    cfg = load_config(None, [f"data.shards={args.dataset}"] if args.dataset else [])
    prepare_dataset(cfg, progress=False)
    spec = pipeline_spec(cfg, "train")
    on, off, stages = [], [], []
    for r in range(args.rounds):
        timed = TSNLoader(cfg.data.shards, cfg.data.train_split, spec)
        before = timed.stage_times.snapshot()
        on.append(clips_per_s(timed, args.epochs))
        stages.append(per_batch(before, timed.stage_times.snapshot(), len(timed) * (args.epochs + 1)))
        timed.close()
        untimed = TSNLoader(cfg.data.shards, cfg.data.train_split, spec, stage_timing=False)
        off.append(clips_per_s(untimed, args.epochs))
        untimed.close()
        print(f"round {r + 1}/{args.rounds}: timed {on[-1]:.1f} clips/s, untimed {off[-1]:.1f} clips/s",
              file=sys.stderr)
    ratios = [a / b for a, b in zip(on, off)]
    per_stage = {s: statistics.median(x[s] for x in stages) for s in STAGES}
    result = {"dataset": cfg.data.shards, "batch_size": spec.batch_size, "rounds": args.rounds, "epochs": args.epochs,
              "timed_clips_per_s": on, "untimed_clips_per_s": off, "timed_over_untimed": ratios,
              "median_timed_over_untimed": statistics.median(ratios), "stages_s_per_batch": per_stage,
              "slowest_stage": slowest(per_stage)}
    print(json.dumps(result, indent=2))
    print(f"\n{'round':<8}{'timed':>10}{'untimed':>10}{'ratio':>8}")
    for i, (a, b) in enumerate(zip(on, off)):
        print(f"{i + 1:<8}{a:>10.1f}{b:>10.1f}{a / b:>7.3f}x")
    print(f"median timed/untimed: {result['median_timed_over_untimed']:.3f}x")
    print(f"stages, ms per batch (batch {spec.batch_size}): {format_stages(per_stage)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
