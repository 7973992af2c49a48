"""Joining a running Ray cluster by address (`tsn train --address`, `tsn pack --address`).

Ray 2.60 turns token authentication on for a cluster `ray start --head` starts (it writes the
token to ``~/.ray/auth_token``), but a driver sends the token only when ``RAY_AUTH_MODE=token``
is set; without it the join fails after a long traceback that never names the token. So: when
the cluster refuses a join for want of a token and ``RAY_AUTH_MODE`` is unset, the driver joins
again in token mode with the token where Ray itself looks (``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``: `cluster.submit.read_token`). The first attempt
costs Ray's ~20 s of retries; ``RAY_AUTH_MODE=token`` skips it. Token mode is not tried first: a
token file is on every machine that ran a local ``ray.init``, and a driver in token mode on a
cluster without authentication loses its actors. A refused join, an address nothing listens
on, or a cluster that wants a token nobody has, fails in one line naming the fix.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

FIX = ("copy the cluster's token (`ray start --head` wrote it to ~/.ray/auth_token on the head node) to "
       "~/.ray/auth_token here or into RAY_AUTH_TOKEN")


class ClusterConnectError(ValueError):
    """A Ray cluster could not be joined; the message is one line naming the address and the fix."""


def use_cluster_token() -> str | None:
    """Join in token mode when ``RAY_AUTH_MODE`` is unset and a token is found (set in this
    process's environment, which Ray reads at ``ray.init``); returns where the token was
    found, or None (no token, or ``RAY_AUTH_MODE`` already chosen by the user)."""
    from cluster.submit import read_token

    if os.environ.get("RAY_AUTH_MODE"):
        return None
    token, where = read_token()
    if token is None:
        return None
    found = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else where.split(", ")[-1]
    os.environ["RAY_AUTH_MODE"] = "token"
    # Ray caches its config (the auth mode among it) when it is imported; Ray's own switch to
    # token mode for a cluster it finds by itself (address "auto") refreshes it the same way.
    from ray._raylet import Config

    Config.initialize("")
    log.info("joining the Ray cluster with the auth token from %s (RAY_AUTH_MODE=token)", found)
    return found


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` address that accepts no connection fails at once (Ray itself keeps
    retrying for minutes). ``auto``, ``local`` and ``ray://`` are left to Ray."""
    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise ClusterConnectError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None


def join(address: str, **init_kwargs) -> None:
    """``ray.init(address=address, **init_kwargs)`` of a running cluster: as the environment
    says first; when the cluster refuses that for want of a token and RAY_AUTH_MODE is unset,
    again in token mode with the token where Ray looks (module docstring; not first: a driver
    in token mode breaks a cluster without authentication, whose actors then die). A join
    that still fails for a reason the user can fix is `ClusterConnectError`, one line."""
    import ray

    check_reachable(address)
    token_from = None
    for attempt in range(2):
        try:
            ray.init(address=address, **init_kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray's AuthenticationError is neither; others re-raised
            if not _refused_for_auth(e):
                raise
            ray.shutdown()
        if attempt == 0:
            token_from = use_cluster_token()
            if token_from is None:
                break
    mode = os.environ.get("RAY_AUTH_MODE") or "unset"
    if token_from is not None:
        why = f"rejected the auth token from {token_from} (a token of another cluster?)"
    elif mode == "disabled":
        why = "uses token authentication and RAY_AUTH_MODE=disabled sends none; unset it, and"
    else:
        why = f"uses token authentication and no token was found (RAY_AUTH_MODE={mode})"
    raise ClusterConnectError(f"the Ray cluster at {address} {why}; {FIX}") from None


def _refused_for_auth(e: BaseException) -> bool:
    """Whether Ray's join failure (a ConnectionError whose cause holds the GCS's answer, or
    Ray's AuthenticationError) was the cluster refusing this driver's token."""
    seen: BaseException | None = e
    while seen is not None:
        if type(seen).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
