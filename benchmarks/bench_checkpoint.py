"""The training loop's wait per checkpoint, synchronous against in the background, for the
tiny default TSN and a BN-Inception TSN (~83 MB with its SGD momentum), to local disk and to
``s3://`` on the loopback S3 server (moto's server mode, as the tests use), in one run.

    .venv/bin/python benchmarks/bench_checkpoint.py [--checkpoints 5] [--steps-between 40] [--json out.json]

Each storage is one `tsn bench-checkpoint` run (`cluster.bench_checkpoint`: the product's own
checkpoint path on a Ray Train worker, training steps of the tiny TSN between checkpoints);
ratios are within a run. Prints JSON and a table per storage.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the loopback S3 server of the tests (tests/s3.py)


def main() -> int:
    import s3

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--steps-between", type=int, default=40)
    p.add_argument("--json", help="also write the JSON result here")
    args = p.parse_args()
    tsn = str(ROOT / ".venv" / "bin" / "tsn")
    results = {}
    with tempfile.TemporaryDirectory(prefix="tsn-bench-ckpt-") as tmp:
        server, proc = s3.start_server(Path(tmp) / "moto.log")
        try:
            env = {k: v for k, v in os.environ.items() if k not in s3.OTHER_AWS_VARS}
            env.update(s3.environment(server))
            for label, storage in (("local", str(Path(tmp) / "store")), ("s3", f"s3://{server['bucket']}/bench")):
                out = Path(tmp) / f"{label}.json"
                subprocess.run([tsn, "bench-checkpoint", "--storage", storage, "--checkpoints", str(args.checkpoints),
                                "--steps-between", str(args.steps_between), "--json", str(out)],
                               check=True, env=env, stdout=sys.stderr)
                results[label] = json.loads(out.read_text())
        finally:
            s3.stop_server(proc)
    from cluster.bench_checkpoint import format_table

    print(json.dumps(results, indent=2))
    for label, result in results.items():
        print(f"\n[{label}]\n{format_table(result)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
