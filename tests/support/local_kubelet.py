"""A stand-in kubelet that runs pods as local processes, for the e2e tier.

It registers nodes that kwok does not manage, and for every pod the scheduler binds to them it
does what a kubelet would, minus containers: materialises the volumes (ConfigMaps as files,
claims as the hostPath folders of their PersistentVolumes, emptyDirs as temp folders), builds
the environment (including Secret references), expands $(VAR) in the command, and runs it.
Container paths are rewritten to those local folders in the command, the environment and the
ConfigMap files, and the workers' rendezvous DNS name becomes 127.0.0.1. Pod status follows
the process (Running, then Succeeded/Failed with its exit code), and container logs are served
to the apiserver over HTTPS like a kubelet's /containerLogs, so `kubectl logs` and the
operator's progress reading work. Only loopback addresses are used.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.support.controlplane import AMX_LABELS, ControlPlane

LOCAL_NODE_LABEL = "amxtune.io/local-node"
ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_env_refs(text: str, env: dict[str, str]) -> str:
    """$(VAR) from the container's env, as Kubernetes expands a command; unknown ones stay."""
    return ENV_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LocalPod:
    namespace: str
    name: str
    uid: str
    container: str
    folder: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    finished: bool = False
    env: dict[str, str] = field(default_factory=dict)


class _LogHandler(http.server.BaseHTTPRequestHandler):
    kubelet: LocalKubelet

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        parts = url.path.strip("/").split("/")
        pod = None
        if len(parts) == 4 and parts[0] == "containerLogs":
            pod = self.kubelet.pods.get((parts[1], parts[2]))
        if pod is None or not pod.log_path.exists():
            self.send_response(404)
            self.end_headers()
            return
        lines = pod.log_path.read_bytes().splitlines(keepends=True)
        tail = urllib.parse.parse_qs(url.query).get("tailLines")
        if tail:
            lines = lines[-int(tail[0]) :]
        body = b"".join(lines)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class LocalKubelet:
    """`node_env`: extra environment for every pod of a node, e.g. the CPU mask of
    tests/support/cpumask.py, which makes a node's CPU look older than the machine's."""

    def __init__(
        self,
        cp: ControlPlane,
        nodes: list[str],
        workdir: Path,
        node_env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.cp = cp
        self.nodes = nodes
        self.node_env = node_env or {}
        self.workdir = workdir
        self.pods: dict[tuple[str, str], LocalPod] = {}
        self.stopping = threading.Event()
        self.api = client.ApiClient(config.new_client_from_config(str(cp.kubeconfig)).configuration)
        self.core = client.CoreV1Api(self.api)
        self.coordination = client.CoordinationV1Api(self.api)
        self.threads: list[threading.Thread] = []
        self.server: http.server.ThreadingHTTPServer | None = None
        self.errors: list[str] = []

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> LocalKubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = self._serve_logs()
        for name in self.nodes:
            self._register(name, port)
        for target in (self._heartbeat_loop, self._pod_loop):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def stop(self) -> None:
        self.stopping.set()
        for pod in self.pods.values():
            self._kill(pod)
        for thread in self.threads:
            thread.join(timeout=10)
        if self.server:
            self.server.shutdown()
        for name in self.nodes:
            self.cp.kubectl("delete", "node", name, "--wait=false", check=False)

    def _serve_logs(self) -> int:
        cert, key = self.workdir / "kubelet.crt", self.workdir / "kubelet.key"
        self._self_signed(cert, key)
        handler = type("Handler", (_LogHandler,), {"kubelet": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        return self.server.server_address[1]

    @staticmethod
    def _self_signed(cert_path: Path, key_path: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "local-kubelet")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    # --- nodes -----------------------------------------------------------------------------

    def _register(self, name: str, port: int) -> None:
        labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            LOCAL_NODE_LABEL: "true",
            **AMX_LABELS,
        }
        self.core.create_node(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
        )
        resources = {"cpu": "8", "memory": "32Gi", "pods": "20", "ephemeral-storage": "100Gi"}
        self.core.patch_node_status(
            name,
            {
                "status": {
                    "capacity": resources,
                    "allocatable": resources,
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
                    "conditions": self._conditions(),
                    "nodeInfo": {
                        "architecture": "amd64",
                        "operatingSystem": "linux",
                        "kubeletVersion": "local",
                        "containerRuntimeVersion": "local://0",
                        "kernelVersion": "",
                        "osImage": "local",
                        "kubeProxyVersion": "",
                        "bootID": "",
                        "machineID": "",
                        "systemUUID": "",
                    },
                }
            },
        )

    @staticmethod
    def _conditions() -> list[dict]:
        now = _now()
        return [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "local kubelet",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ]

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(5):
            for name in self.nodes:
                try:
                    self.core.patch_node_status(
                        name, {"status": {"conditions": self._conditions()}}
                    )
                    self._renew_lease(name)
                except ApiException as error:
                    self.errors.append(f"heartbeat {name}: {error.reason}")

    def _renew_lease(self, name: str) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": stamp},
        }
        try:
            self.coordination.patch_namespaced_lease(name, "kube-node-lease", body)
        except ApiException as error:
            if error.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    # --- pods ------------------------------------------------------------------------------

    def _pod_loop(self) -> None:
        while not self.stopping.wait(0.5):
            try:
                self._sync_pods()
            except Exception as error:  # keep the loop alive; the test reports errors
                self.errors.append(f"sync: {error!r}")

    def _sync_pods(self) -> None:
        seen = set()
        for node in self.nodes:
            listed = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}")
            for pod in listed.items:
                key = (pod.metadata.namespace, pod.metadata.name)
                seen.add(key)
                local = self.pods.get(key)
                if local is not None and local.uid != pod.metadata.uid:
                    # A new pod of the same name (a restart's next attempt): the old one is
                    # gone from the API, so stop what is left of it and run the new one.
                    self._kill(local)
                    del self.pods[key]
                    local = None
                if pod.metadata.deletion_timestamp:
                    if local is not None:
                        self._kill(local)
                    self._remove(pod.metadata.namespace, pod.metadata.name)
                    continue
                if local is None and pod.status.phase == "Pending":
                    self._start_pod(self.api.sanitize_for_serialization(pod))
        for key, local in list(self.pods.items()):
            if local.process and local.process.poll() is not None and not local.finished:
                local.finished = True
                code = local.process.returncode  # a signal as a container runtime reports it
                self._report_exit(local, 128 - code if code < 0 else code)
            if key not in seen and local.finished:
                del self.pods[key]

    def _remove(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        except ApiException as error:
            if error.status != 404:
                raise

    def _kill(self, pod: LocalPod) -> None:
        if pod.process and pod.process.poll() is None:
            try:
                os.killpg(pod.process.pid, signal.SIGTERM)
                pod.process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.process.pid, signal.SIGKILL)
        pod.finished = True

    def _start_pod(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        folder = self.workdir / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        local = LocalPod(
            meta["namespace"],
            meta["name"],
            meta["uid"],
            container["name"],
            folder,
            folder / "container.log",
        )
        self.pods[(meta["namespace"], meta["name"])] = local
        try:
            paths = self._volumes(
                meta["namespace"],
                spec.get("volumes", []),
                container.get("volumeMounts", []),
                folder,
            )
            env = self._environment(meta["namespace"], container.get("env", []), paths)
            env.update(self.node_env.get(spec.get("nodeName", ""), {}))
            self._rewrite_files(paths, folder)
            command = [
                self._rewrite(expand_env_refs(a, env), paths)
                for a in container["command"]
            ]
            command[0] = self._executable(command[0])
        except Exception as error:
            local.log_path.write_text(f"local kubelet could not start the pod: {error!r}\n")
            local.finished = True
            self._report_exit(local, 128)
            return
        local.env = env
        with local.log_path.open("wb") as log:
            local.process = subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=folder,
                start_new_session=True,
            )
        self._patch_status(
            local,
            {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "hostIP": "127.0.0.1",
                "startTime": _now(),
                "conditions": [
                    {"type": t, "status": "True", "lastTransitionTime": _now()}
                    for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                ],
                "containerStatuses": [
                    {
                        "name": local.container,
                        "ready": True,
                        "restartCount": 0,
                        "started": True,
                        "image": container["image"],
                        "imageID": "",
                        "containerID": "local://0",
                        "state": {"running": {"startedAt": _now()}},
                    }
                ],
            },
        )

    def _report_exit(self, local: LocalPod, code: int) -> None:
        now = _now()
        self._patch_status(
            local,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "False",
                        "lastTransitionTime": now,
                        "reason": "PodCompleted",
                    }
                ],
                "containerStatuses": [
                    {
                        "name": local.container,
                        "ready": False,
                        "restartCount": 0,
                        "image": "local",
                        "imageID": "",
                        "containerID": "local://0",
                        "state": {
                            "terminated": {
                                "exitCode": code,
                                "reason": "Completed" if code == 0 else "Error",
                                "startedAt": now,
                                "finishedAt": now,
                            }
                        },
                    }
                ],
            },
        )

    def _patch_status(self, local: LocalPod, status: dict) -> None:
        try:
            self.core.patch_namespaced_pod_status(local.name, local.namespace, {"status": status})
        except ApiException as error:
            if error.status != 404:
                self.errors.append(f"status {local.name}: {error.reason}")

    # --- what a container would see --------------------------------------------------------

    def _volumes(
        self, namespace: str, volumes: list[dict], mounts: list[dict], folder: Path
    ) -> dict[str, Path]:
        """Container mount path -> local folder."""
        local: dict[str, Path] = {}
        by_name = {v["name"]: v for v in volumes}
        for mount in mounts:
            volume = by_name[mount["name"]]
            target = folder / "volumes" / mount["name"]
            if "configMap" in volume:
                found = self.core.read_namespaced_config_map(volume["configMap"]["name"], namespace)
                target.mkdir(parents=True, exist_ok=True)
                for key, value in (found.data or {}).items():
                    (target / key).write_text(value)
                for key, value in (found.binary_data or {}).items():
                    import base64

                    (target / key).write_bytes(base64.b64decode(value))
            elif "persistentVolumeClaim" in volume:
                claim = self.core.read_namespaced_persistent_volume_claim(
                    volume["persistentVolumeClaim"]["claimName"], namespace
                )
                pv = self.core.read_persistent_volume(claim.spec.volume_name)
                target = Path(pv.spec.host_path.path)
                target.mkdir(parents=True, exist_ok=True)
            elif mount["mountPath"] in ("/dev/shm", "/tmp"):  # the process uses the machine's
                continue
            else:  # emptyDir
                target.mkdir(parents=True, exist_ok=True)
            local[mount["mountPath"]] = target
        return local

    @staticmethod
    def _rewrite(text: str, paths: dict[str, Path]) -> str:
        for container_path in sorted(paths, key=len, reverse=True):
            text = re.sub(
                rf"(?<![\w/]){re.escape(container_path)}(?=/|\b|$)",
                str(paths[container_path]),
                text,
            )
        return re.sub(r"\b[\w.-]+\.svc\.cluster\.local\b", "127.0.0.1", text)

    def _rewrite_files(self, paths: dict[str, Path], folder: Path) -> None:
        for target in paths.values():
            if folder in target.parents:  # our own copies (ConfigMaps), never user data
                for file in target.iterdir():
                    if file.is_file() and file.suffix in (".json", ""):
                        file.write_text(self._rewrite(file.read_text(), paths))

    def _environment(
        self, namespace: str, entries: list[dict], paths: dict[str, Path]
    ) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBECONFIG")}
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        for entry in entries:
            if "value" in entry:
                value = entry["value"]
            else:
                ref = entry["valueFrom"]["secretKeyRef"]
                secret = self.core.read_namespaced_secret(ref["name"], namespace)
                import base64

                value = base64.b64decode(secret.data[ref["key"]]).decode()
            env[entry["name"]] = self._rewrite(value, paths)
        # The image's libraries are not on this machine; the node's own preloads (e.g. a CPU
        # mask for the whole test run) stay.
        if os.environ.get("LD_PRELOAD"):
            env["LD_PRELOAD"] = os.environ["LD_PRELOAD"]
        else:
            env.pop("LD_PRELOAD", None)
        return env

    @staticmethod
    def _executable(name: str) -> str:
        beside = Path(sys.executable).parent / name
        if name == "python":
            return sys.executable
        return str(beside) if beside.exists() else (shutil.which(name) or name)

    def log(self, namespace: str, name: str) -> str:
        pod = self.pods.get((namespace, name))
        return pod.log_path.read_text(errors="replace") if pod and pod.log_path.exists() else ""

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.finished for p in self.pods.values()):
                return
            time.sleep(0.5)
