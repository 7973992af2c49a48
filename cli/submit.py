"""`tsn submit` and `tsn jobs`: the training as a Ray job on a remote cluster (`cluster.submit`)."""

from __future__ import annotations

import sys

from cluster.submit import AuthError, client, submit, tail_logs


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
    except RuntimeError as e:  # the job server refused the submission: its first line
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
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
                tail_logs(c, args.job_id)
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
