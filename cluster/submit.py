"""`tsn submit` and `tsn jobs`: run the training as a Ray job on a remote cluster.

Ray 2.60 turns token authentication on by default. The token is read the way Ray reads it:
``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``;
it is sent as ``Authorization: Bearer <token>``. A missing or rejected token is reported as
such, with where the token was looked for.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

# Never upload these with the working directory (the venv alone is ~7 GB).
UPLOAD_EXCLUDES = [".venv/", ".git/", "data/", "runs/", ".cache/", "__pycache__/", "*.egg-info/",
                   ".pytest_cache/"]


class AuthError(RuntimeError):
    pass


def read_token() -> tuple[str | None, str]:
    """(token or None, where it was looked for)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    where = f"RAY_AUTH_TOKEN, {path}"
    if path.is_file():
        token = path.read_text().strip()
        return (token or None), where
    return None, where


def client(address: str):
    """A JobSubmissionClient for ``address`` with the token; clear errors for auth failures."""
    from ray.job_submission import JobSubmissionClient

    token, where = read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:
        text = str(e)
        if "401" in text or "403" in text or "nauthori" in text or "uthentication" in text:
            if token is None:
                raise AuthError(f"{address} requires a Ray auth token and none was found (looked in {where}); "
                                f"copy the cluster's token there (Kubernetes: the Secret named in k8s/)") from None
            raise AuthError(f"{address} rejected the Ray auth token from {where}: {text.splitlines()[0]}") from None
        if "Failed to connect" in text or "Connection" in text:
            raise ConnectionError(f"cannot reach the Ray dashboard at {address}: {text.splitlines()[0]}") from None
        raise


def entrypoint(config: str | None, overrides: list[str], run_dir: str | None) -> str:
    """The same `tsn train` command a user would type, run on the cluster."""
    cmd = ["tsn", "train"]
    if config:
        cmd += ["--config", config]
    for o in overrides:
        cmd += ["--set", o]
    if run_dir:
        cmd += ["--run-dir", run_dir]
    return shlex.join(cmd)


def submit(address: str, config: str | None, overrides: list[str], *, working_dir: str = ".",
           run_dir: str | None = None, follow: bool = False, job_id: str | None = None) -> tuple[str, str | None]:
    """Submit the training job; returns (job id, final status when following)."""
    wd = Path(working_dir).resolve()
    if config:
        cpath = Path(config).resolve()
        if not cpath.is_file():
            raise FileNotFoundError(f"{config}: config file not found")
        try:
            config = str(cpath.relative_to(wd))
        except ValueError:
            raise ValueError(f"{config}: the config must be inside the uploaded working directory {wd}") from None
        from app.config import load_config

        load_config(cpath, overrides)  # a bad config fails here, before anything is submitted
    c = client(address)
    job = c.submit_job(entrypoint=entrypoint(config, overrides, run_dir), submission_id=job_id,
                       runtime_env={"working_dir": str(wd), "excludes": UPLOAD_EXCLUDES})
    print(job)
    status = None
    if follow:
        asyncio.run(_tail(c, job))
        status = str(c.get_job_status(job)).split(".")[-1]
        print(f"job {job}: {status}", file=sys.stderr)
    return job, status


async def _tail(c, job: str) -> None:
    async for lines in c.tail_job_logs(job):
        print(lines, end="", flush=True)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("submit", help="submit `tsn train` as a Ray job to a cluster")
    p.add_argument("--address", required=True, help="the Ray dashboard, e.g. http://HEAD:8265")
    p.add_argument("--config", help="YAML config inside the working directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", help="run directory on the cluster (default: run.storage_path/run.name)")
    p.add_argument("--working-dir", default=".", help="uploaded with the job (default: .)")
    p.add_argument("--job-id", help="submission id (default: generated)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.set_defaults(func=_run_submit)

    j = subparsers.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    j.add_argument("--address", required=True, help="the Ray dashboard, e.g. http://HEAD:8265")
    jsub = j.add_subparsers(dest="jobs_command", metavar="ACTION")
    jsub.required = True
    jsub.add_parser("list", help="all jobs with status")
    for name, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        q = jsub.add_parser(name, help=text)
        q.add_argument("job_id")
        if name == "logs":
            q.add_argument("--follow", action="store_true")
    j.set_defaults(func=_run_jobs)


def _run_submit(args) -> int:
    try:
        _, status = submit(args.address, args.config, args.overrides, working_dir=args.working_dir,
                           run_dir=args.run_dir, follow=args.follow, job_id=args.job_id)
    except (AuthError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if status in (None, "SUCCEEDED") else 1


def _run_jobs(args) -> int:
    try:
        c = client(args.address)
        if args.jobs_command == "list":
            for job in c.list_jobs():
                status = str(job.status).split(".")[-1]
                print(f"{job.submission_id or job.job_id}\t{status}\t{job.entrypoint}")
        elif args.jobs_command == "status":
            print(str(c.get_job_status(args.job_id)).split(".")[-1])
        elif args.jobs_command == "logs":
            if args.follow:
                asyncio.run(_tail(c, args.job_id))
            else:
                print(c.get_job_logs(args.job_id), end="")
        elif args.jobs_command == "stop":
            print("stopping" if c.stop_job(args.job_id) else "not running")
    except (AuthError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. unknown job id
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
