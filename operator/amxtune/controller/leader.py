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
import time
from collections.abc import Callable

from kubernetes import client
from kubernetes.leaderelection import electionconfig
from kubernetes.leaderelection.leaderelection import LeaderElection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

log = logging.getLogger("amxtune.leader")
# the library logs every renewal (every RETRY_SECONDS) at INFO; our own lines say what matters
logging.getLogger("leaderelection").setLevel(logging.WARNING)

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
          on_lost: Callable[[], None] | None = None) -> Callable[[], None]:
    """Campaign in the background; `on_leading` runs (in its own thread) once elected.
    Returns `release`, for a graceful stop once this replica no longer writes."""
    released = threading.Event()

    def lost() -> None:
        if not released.is_set():  # (renewals stop on purpose once released)
            (on_lost or (lambda: _exit_on_lost_lease(namespace)))()

    lock = LeaseLock(LEASE_NAME, namespace, identity)
    leading = threading.Event()

    def started() -> None:
        leading.set()
        on_leading()

    config = electionconfig.Config(lock, LEASE_SECONDS, RENEW_DEADLINE_SECONDS, RETRY_SECONDS,
                                   onstarted_leading=started, onstopped_leading=lost)
    election = LeaderElection(config)

    def campaign() -> None:
        # The library catches only the API's own errors: a dropped connection would end the
        # campaign silently (a leader that no longer renews, a follower that never leads).
        try:
            election.run()
        except Exception:
            log.exception("leader election failed")
        lost()

    def watchdog() -> None:
        # A renewal that hangs (the library sets no request timeout) must not let a leader go
        # on after its Lease can have passed to another replica.
        leading.wait()
        while True:
            time.sleep(1)
            renewed = election.observed_time_milliseconds / 1000
            if time.time() - renewed > RENEW_DEADLINE_SECONDS:
                log.error("the Lease was not renewed for %d s", RENEW_DEADLINE_SECONDS)
                lost()
                return

    def release() -> None:
        """Hand the Lease over now rather than after LEASE_SECONDS: a follower takes a Lease
        without a holder at its next try (RETRY_SECONDS)."""
        if not leading.is_set():
            return
        released.set()
        election.try_acquire_or_renew = lambda: False  # renew no more (the library has no stop)
        try:
            api = client.CoordinationV1Api()
            lease = api.read_namespaced_lease(LEASE_NAME, namespace, _request_timeout=5)
            if lease.spec.holder_identity == identity:
                lease.spec.holder_identity = None  # (resourceVersion kept: not someone else's)
                api.replace_namespaced_lease(LEASE_NAME, namespace, lease, _request_timeout=5)
                log.info("released the Lease %s/%s", namespace, LEASE_NAME)
        except Exception as error:  # the Lease then runs out by itself
            log.warning("could not release the Lease %s/%s: %s", namespace, LEASE_NAME, error)

    log.info("%s campaigns for the Lease %s/%s", identity, namespace, LEASE_NAME)
    threading.Thread(target=campaign, name="leader-election", daemon=True).start()
    threading.Thread(target=watchdog, name="lease-watchdog", daemon=True).start()
    return release
