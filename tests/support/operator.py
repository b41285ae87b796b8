"""Run `amxtune operator` as a real process against the test control plane."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.controlplane import ControlPlane
from tests.support.hub import shared_hub

REPO_ROOT = Path(__file__).resolve().parents[2]
CRDS = REPO_ROOT / "crds"


def install_crds(cp: ControlPlane) -> None:
    """Apply crds/ and wait until both are Established (idempotent)."""
    cp.apply_yaml(CRDS)
    for name in ("finetunejobs.amxtune.io", "inferencejobs.amxtune.io"):
        cp.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


class OperatorProcess:
    """The operator watching one namespace; its log is kept beside the component logs."""

    def __init__(
        self,
        cp: ControlPlane,
        namespace: str,
        extra_env: dict[str, str] | None = None,
        kubeconfig: Path | None = None,
        flags: list[str] | None = None,
        log_name: str = "",
        module: str = "amxtune.cli",
    ) -> None:
        self.cp = cp
        self.namespace = namespace
        self.log_path = cp.log_dir / f"operator-{log_name or namespace}.log"
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig or cp.kubeconfig),
            "AMXTUNE_PROGRESS_INTERVAL_SECONDS": "1",
            "AMXTUNE_TRAINER_IMAGE": "amxtune-trainer:test",
            "AMXTUNE_HUB_ENDPOINT": shared_hub().url,
            **(extra_env or {}),
        }
        self.flags = flags or ["--liveness", "", "--metrics-port", "0", "--log-format", "plain"]
        self.module = module
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> OperatorProcess:
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n--- start {self.starts} ---\n".encode())
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                self.module,
                "operator",
                "--namespace",
                self.namespace,
                *self.flags,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO_ROOT,
        )
        log.close()
        time.sleep(0.5)
        if self.process.poll() is not None:
            raise RuntimeError(f"operator exited at once; see {self.log_path}")
        return self

    def kill(self) -> None:
        """SIGKILL, as a crashed or evicted operator would stop."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
