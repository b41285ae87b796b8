"""`amxtune operator` that SIGKILLs itself right after the Nth API request of a kind, so a test
can stop it at an exact point of a job's life (after the ConfigMap, between worker pods, ...).

    AMXTUNE_TEST_KILL_AFTER="POST /pods$ 2" python -m tests.support.killed_operator operator ...

The request has been answered when the process dies: what the operator did is in the cluster,
what it meant to do next is not, as with a crash or an OOM kill at that moment.
"""

from __future__ import annotations

import os
import re
import signal
import sys

from amxtune.cli import main
from amxtune.controller.kube import Kube


def install(spec: str) -> None:
    method, pattern, count = spec.split(" ")
    seen = 0
    send = Kube.call

    def call(self: Kube, verb: str, path: str, *args: object, **kwargs: object) -> bytes:
        nonlocal seen
        answer = send(self, verb, path, *args, **kwargs)
        if verb == method and re.search(pattern, path):
            seen += 1
            if seen == int(count):
                print(f"killing the operator after {verb} {path}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return answer

    Kube.call = call  # type: ignore[method-assign]


if __name__ == "__main__":
    install(os.environ["AMXTUNE_TEST_KILL_AFTER"])
    sys.exit(main(sys.argv[1:]))
