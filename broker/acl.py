"""Least-privilege Redis ACL users for a Redis that is reached over a network.

    tokenpool redis-acl [--prefix tokenpool]    # prints the ACL SETUSER lines (passwords: …)

Both users may touch only tokenpool's keys (the prefix's, its Celery queues') and kombu's own
(queue bindings, unacknowledged messages, Celery's control-reply lists), on any pub/sub channel
(each job's, Celery's events and control), with every command but Redis's dangerous ones
(FLUSHALL, CONFIG, KEYS, DEBUG, SHUTDOWN, MONITOR, …) but CLIENT SETNAME, GETNAME and ID.
Workers also get INFO: their reaper
reads the server's uptime and run_id. tests/integration/test_acl.py runs a job end to end with
exactly these users and checks that what they must not do is refused.
"""

from __future__ import annotations

# kombu's keys on the Redis transport (sep ":" as broker.celery_app sets; no global prefix).
KOMBU_KEYS = (
    "~_kombu.*",  # queue bindings
    "~unacked*",  # unacknowledged messages, their index and the restore mutex
    "~*.celery.pidbox*",  # Celery's remote control: each worker's mailbox, and reply lists
)


def key_patterns(prefix: str) -> list[str]:
    """Our keys (`<prefix>:…`), our Celery queues (`<prefix>.<model>`, with their priority
    lists `<prefix>.<model>:N`), and kombu's."""
    return [f"~{prefix}:*", f"~{prefix}.*", *KOMBU_KEYS]


def api_rules(prefix: str) -> list[str]:
    # CLIENT is dangerous as a whole before Redis 7; SETNAME names our connections (CLIENT
    # LIST shows tokenpool-api and each worker).
    return ["on", "resetkeys", "resetchannels", *key_patterns(prefix), "&*", "+@all",
            "-@dangerous", "+client|setname", "+client|getname", "+client|id"]


def worker_rules(prefix: str) -> list[str]:
    return [*api_rules(prefix), "+info"]


def setuser_lines(prefix: str, api_user: str = "tokenpool-api",
                  worker_user: str = "tokenpool-worker") -> list[str]:
    """The two ACL SETUSER commands, each with a password placeholder to fill in."""
    return [f"ACL SETUSER {api_user} {' '.join(api_rules(prefix))} >API-PASSWORD",
            f"ACL SETUSER {worker_user} {' '.join(worker_rules(prefix))} >WORKER-PASSWORD"]
