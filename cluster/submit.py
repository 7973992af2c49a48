"""Running the training as a Ray job on a remote cluster: submission, the job client, its
token (the commands: `cli.submit`).

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


def check_address(address: str) -> None:
    """The Ray dashboard's URL needs its scheme: without one Ray takes ``HOST:PORT`` for a GCS
    address and waits ~40 s for it before a long traceback."""
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"--address {address}: expected the Ray dashboard's URL with its scheme, "
                         f"e.g. --address http://{address}")


def client(address: str):
    """A JobSubmissionClient for ``address`` with the token; clear errors for auth failures."""
    from ray.job_submission import JobSubmissionClient

    check_address(address)
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

    # A bad config or override fails here, before anything is submitted (without --config the
    # overrides are checked against the embedded defaults, which the job would load too).
    load_config(cpath if config else None, overrides)
    c = client(address)
    if job_id:
        _check_job_id_free(c, job_id, address)
    job = c.submit_job(entrypoint=entrypoint(config, overrides, run_dir), submission_id=job_id,
                       runtime_env={"working_dir": str(wd), "excludes": UPLOAD_EXCLUDES})
    print(job)
    status = None
    if follow:
        tail_logs(c, job)
        status = str(c.get_job_status(job)).split(".")[-1]
        print(f"job {job}: {status}", file=sys.stderr)
    return job, status


def _check_job_id_free(c, job_id: str, address: str) -> None:
    """Ray refuses a submission id it already knows with a server-side traceback: say so first."""
    try:
        info = c.get_job_info(job_id)
    except RuntimeError:  # "job ... does not exist": the id is free
        return
    status = str(info.status).split(".")[-1]
    raise ValueError(f"--job-id {job_id}: {address} already has a job with this id ({status}); "
                     f"choose another id, or omit --job-id for a generated one")


def tail_logs(c, job: str) -> None:
    """Print a job's logs as they come until it ends (``c``: a `client`)."""
    async def tail() -> None:
        async for lines in c.tail_job_logs(job):
            print(lines, end="", flush=True)

    asyncio.run(tail())
