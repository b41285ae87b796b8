"""One leading replica at a time, through a coordination.k8s.io Lease (the kubernetes
client's own LeaseLock and LeaderElection, the algorithm of client-go).

Every replica watches and keeps its index warm; only the leader's workers and resync
reconcile. The leader renews the Lease every few seconds; a replica that cannot renew it for
RENEW_DEADLINE_SECONDS exits (its pod restarts as a follower) so two replicas never write at
once, and a killed leader is replaced once its Lease has not been renewed for LEASE_SECONDS.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from kubernetes.leaderelection import electionconfig
from kubernetes.leaderelection.leaderelection import LeaderElection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

log = logging.getLogger("amxtune.leader")

LEASE_NAME = "amxtune-operator"
LEASE_SECONDS = 15
RENEW_DEADLINE_SECONDS = 10
RETRY_SECONDS = 2


def _exit_on_lost_lease(namespace: str) -> None:
    log.error("lost the Lease %s/%s; exiting so that only one replica reconciles", namespace,
              LEASE_NAME)
    logging.shutdown()
    os._exit(1)  # kopf's and the workers' threads would otherwise go on writing


def elect(namespace: str, identity: str, on_leading: Callable[[], None],
          on_lost: Callable[[], None] | None = None) -> threading.Thread:
    """Campaign in the background; `on_leading` runs (in its own thread) once elected."""
    lock = LeaseLock(LEASE_NAME, namespace, identity)
    config = electionconfig.Config(
        lock, LEASE_SECONDS, RENEW_DEADLINE_SECONDS, RETRY_SECONDS,
        onstarted_leading=on_leading,
        onstopped_leading=on_lost or (lambda: _exit_on_lost_lease(namespace)),
    )
    log.info("%s campaigns for the Lease %s/%s", identity, namespace, LEASE_NAME)
    thread = threading.Thread(target=LeaderElection(config).run, name="leader-election",
                              daemon=True)
    thread.start()
    return thread
