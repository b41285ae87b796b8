"""The one kubelet duty the simulated nodes lack: finishing a pod's graceful deletion.

A deleted pod bound to a node stays (with its deletionTimestamp) until the node's kubelet
confirms it with a second, immediate delete. kwok's own delete step does that by name only,
from a queue that can be a moment old: when the operator recreates a pod of the same name
(the next attempt's `dicoo-worker-0`) just then, kwok deletes the new pod, and the operator
rightly reports a worker lost. A real kubelet sends the pod's UID as a precondition (so the
apiserver refuses to delete any other pod); this process does the same for every pod on a
node that kwok manages, and kwok's stages leave deletion alone.

Run by the test control plane: `python finish_deletions.py KUBECONFIG KEY=VALUE`, where
KEY=VALUE is the node annotation kwok manages nodes by.
"""

from __future__ import annotations

import sys
import time

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

WATCH_SECONDS = 60  # then watch anew from the current state: nothing missed stays


def on_simulated_node(api: client.CoreV1Api, pod: client.V1Pod, annotation: tuple[str, str]
                      ) -> bool:
    node_name = pod.spec.node_name
    if not node_name:
        return False
    try:
        node = api.read_node(node_name)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    key, value = annotation
    return (node.metadata.annotations or {}).get(key) == value


def finish_deletion(api: client.CoreV1Api, pod: client.V1Pod, annotation: tuple[str, str]
                    ) -> bool:
    """Delete `pod` for good if its deletion was asked for and it is on a simulated node;
    only this very pod (its UID), never a newer one of the same name. True if deleted."""
    meta = pod.metadata
    if meta.deletion_timestamp is None or not on_simulated_node(api, pod, annotation):
        return False
    options = client.V1DeleteOptions(
        grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta.uid)
    )
    try:
        api.delete_namespaced_pod(meta.name, meta.namespace, body=options)
    except ApiException as error:
        if error.status in (404, 409):  # already gone, or the name now holds another pod
            return False
        raise
    print(f"deleted {meta.namespace}/{meta.name} (uid {meta.uid})", flush=True)
    return True


def run(api: client.CoreV1Api, annotation: tuple[str, str]) -> None:
    while True:
        try:
            # without a resourceVersion a watch starts with every existing pod (ADDED)
            for event in watch.Watch().stream(api.list_pod_for_all_namespaces,
                                              timeout_seconds=WATCH_SECONDS):
                if event["type"] in ("ADDED", "MODIFIED"):
                    finish_deletion(api, event["object"], annotation)
        except Exception as error:  # e.g. the apiserver restarting: try again
            print(f"retrying after {type(error).__name__}: {error}", flush=True)
            time.sleep(1)


def main(argv: list[str]) -> int:
    kubeconfig, annotation = argv[1:3]
    key, _, value = annotation.partition("=")
    config.load_kube_config(config_file=kubeconfig)
    run(client.CoreV1Api(), (key, value))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
