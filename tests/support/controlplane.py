"""A real Kubernetes control plane for the cluster tests.

`ControlPlane` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
kwok as local processes on free 127.0.0.1 ports, with certificates generated for the run,
and offers small helpers on top of kubectl. The binaries come from
tools/controlplane/build.sh (built from Go modules, cached outside the repository); they
are built on first use.

    with ControlPlane() as cp:
        cp.create_nodes(default_nodes())
        cp.apply_yaml("crds/foo.yaml")
        cp.wait_for_jsonpath("pod/x", "{.status.phase}", "Running", namespace="ns")

Simulated nodes are managed by kwok when they carry the annotation
``kwok.x-k8s.io/node: fake`` (`create_nodes` adds it); pods bound to them follow the
Stage objects of tools/controlplane/kwok-stages.yaml: Running, then Succeeded or Failed
only when the pod is annotated ``amxtune.io/simulate: succeed|fail`` (exit code from
``amxtune.io/simulate-exit-code``).

Run ``python -m tests.support.controlplane`` to start one by hand; it prints the
kubeconfig path and keeps running until Ctrl-C.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import ctypes.util
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_DIR = REPO_ROOT / "tools" / "controlplane"
BUILD_SCRIPT = TOOLS_DIR / "build.sh"
KWOK_STAGES = TOOLS_DIR / "kwok-stages.yaml"
FINISH_DELETIONS = Path(__file__).with_name("finish_deletions.py")
LOOPBACK = "127.0.0.1"

# Node Feature Discovery labels of a CPU with Intel AMX.
AMX_LABELS: dict[str, str] = {
    "feature.node.kubernetes.io/cpu-cpuid.AMXBF16": "true",
    "feature.node.kubernetes.io/cpu-cpuid.AMXTILE": "true",
    "feature.node.kubernetes.io/cpu-cpuid.AMXINT8": "true",
}
AMX_LABEL = "feature.node.kubernetes.io/cpu-cpuid.AMXBF16"
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
NODE_SET_LABEL = "amxtune.io/test-node"
SIMULATE_ANNOTATION = "amxtune.io/simulate"
SIMULATE_EXIT_CODE_ANNOTATION = "amxtune.io/simulate-exit-code"
SIMULATE_AFTER_ANNOTATION = "amxtune.io/simulate-after"

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or queried."""


class ComponentDied(ControlPlaneError):
    """A control-plane process exited; waiting any longer is pointless."""


class WaitAborted(AssertionError):
    """Raised by a `wait_for` condition that knows it can no longer become true (a job
    that ended or stalled otherwise): the wait ends at once with this message."""


class KubectlError(ControlPlaneError):
    """kubectl exited non-zero; `stderr` holds the apiserver's message."""

    def __init__(self, args: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(f"kubectl {' '.join(args)} failed ({returncode}): {stderr.strip()}")
        self.args_ = list(args)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


# --------------------------------------------------------------------------- binaries


def read_versions() -> dict[str, str]:
    """The pinned versions from tools/controlplane/versions.env."""
    versions: dict[str, str] = {}
    for line in (TOOLS_DIR / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key.strip()] = value.strip()
    return versions


BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "kube-proxy",
    "kwok",
    "helm",
    "coredns",
)


def ensure_binaries(*, build_timeout: float = 3600.0) -> Path:
    """Return the directory holding the control-plane binaries, building them if needed.

    ``AMXTUNE_K8S_BIN_DIR`` points at a prepared directory and skips the build script.
    Otherwise tools/controlplane/build.sh runs (seconds when its cache is complete, a
    cold build takes tens of minutes); its progress goes to this process's stderr.
    """
    override = os.environ.get("AMXTUNE_K8S_BIN_DIR")
    if override:
        bin_dir = Path(override)
    else:
        try:
            proc = subprocess.run(
                ["bash", str(BUILD_SCRIPT)],
                stdout=subprocess.PIPE,
                stderr=None,
                text=True,
                timeout=build_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ControlPlaneError(f"{BUILD_SCRIPT} took more than {build_timeout}s") from exc
        if proc.returncode != 0:
            raise ControlPlaneError(
                f"{BUILD_SCRIPT} failed with exit code {proc.returncode}; see its messages above"
            )
        lines = proc.stdout.strip().splitlines()
        if not lines:
            raise ControlPlaneError(f"{BUILD_SCRIPT} printed no bin directory")
        bin_dir = Path(lines[-1])
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise ControlPlaneError(f"{bin_dir} lacks {', '.join(missing)}")
    return bin_dir


# --------------------------------------------------------------------------- certificates


@dataclass
class _KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


class _CertificateAuthority:
    """A throw-away CA for one control-plane run."""

    def __init__(self, common_name: str = "amxtune-test-ca") -> None:
        self.key = _new_key()
        now = dt.datetime.now(dt.UTC)
        name = _name(common_name)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pair(self) -> _KeyPair:
        return _KeyPair(self.cert.public_bytes(serialization.Encoding.PEM), _key_pem(self.key))

    def issue(
        self,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        server: bool = False,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> _KeyPair:
        key = _new_key()
        now = dt.datetime.now(dt.UTC)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organizations))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


# --------------------------------------------------------------------------- nodes


@dataclass
class NodeSpec:
    """A simulated node. `amx` adds the Node Feature Discovery AMX labels."""

    name: str
    amx: bool = False
    cpu: str = "112"
    memory: str = "512Gi"
    pods: str = "110"
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)

    def manifest(self) -> dict[str, Any]:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            NODE_SET_LABEL: "true",
            "feature.node.kubernetes.io/cpu-cpuid.AVX512F": "true",
        }
        if self.amx:
            labels.update(AMX_LABELS)
        labels.update(self.labels)
        resources = {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": self.pods,
            "ephemeral-storage": "1Ti",
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": labels,
                "annotations": {
                    KWOK_NODE_ANNOTATION[0]: KWOK_NODE_ANNOTATION[1],
                },
            },
            "spec": {"taints": list(self.taints)} if self.taints else {},
            "status": {"capacity": dict(resources), "allocatable": dict(resources)},
        }


def amx_nodes(count: int, prefix: str = "amx-", **kwargs: Any) -> list[NodeSpec]:
    """`count` AMX nodes (112 CPU, 512Gi unless overridden)."""
    return [NodeSpec(f"{prefix}{i}", amx=True, **kwargs) for i in range(count)]


def plain_nodes(count: int, prefix: str = "cpu-", **kwargs: Any) -> list[NodeSpec]:
    """`count` nodes without AMX (64 CPU, 256Gi unless overridden)."""
    kwargs.setdefault("cpu", "64")
    kwargs.setdefault("memory", "256Gi")
    return [NodeSpec(f"{prefix}{i}", amx=False, **kwargs) for i in range(count)]


def default_nodes() -> list[NodeSpec]:
    """The default simulated cluster: three AMX nodes and two without AMX."""
    return amx_nodes(3) + plain_nodes(2)


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float = 60.0,
    interval: float = 0.5,
    what: str = "condition",
) -> T:
    """Call `condition` until it returns something truthy and return that value.

    Exceptions from `condition` count as "not yet" (except `ComponentDied` and
    `WaitAborted`, raised at once); the last one is reported when the deadline passes, in a
    `TimeoutError` naming `what`.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    last_value: Any = None
    while True:
        try:
            last_value = condition()
            if last_value:
                return last_value
        except (ComponentDied, WaitAborted):
            raise
        except Exception as exc:  # the condition decides what counts as "not yet"
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f"; last error: {last_error!r}" if last_error else ""
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what} "
                f"(last value: {last_value!r}){detail}"
            )
        time.sleep(interval)


@dataclass
class _Component:
    name: str
    log_path: Path
    process: subprocess.Popen[bytes]


class Processes:
    """Child processes (control-plane components, node daemons), each logging to
    `<log_dir>/<name>.log`, dying with this process, and stopped newest first."""

    def __init__(self, log_dir: Path, cwd: Path | None = None) -> None:
        self.log_dir = log_dir
        self.cwd = cwd
        self.running: list[_Component] = []

    def spawn(self, name: str, args: list[str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(args)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=True,  # Ctrl-C in a terminal goes to pytest, not here
                preexec_fn=_die_with_parent,
            )
        self.running.append(_Component(name, log_path, process))

    def check_alive(self) -> None:
        for comp in self.running:
            if comp.process.poll() is not None:
                raise ComponentDied(
                    f"{comp.name} exited with code {comp.process.returncode}; "
                    f"log {comp.log_path}:\n{_tail(comp.log_path)}"
                )

    def stop(self, name: str | None = None) -> None:
        """SIGTERM, then SIGKILL after 15 s: every process (newest first), or only `name`."""
        for comp in reversed(list(self.running)):
            if name is not None and comp.name != name:
                continue
            try:
                _terminate(comp.process)
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {comp.name}: {exc!r}", file=sys.stderr)
            self.running.remove(comp)

    def tails(self, lines: int = 40) -> dict[str, str]:
        """The last lines of every running process's log."""
        return {comp.name: _tail(comp.log_path, lines) for comp in self.running}


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=10)


# --------------------------------------------------------------------------- control plane


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on loopback.

    `address` moves the apiserver from loopback to another address of this machine, one the
    caller owns (tests/support/node.py: real nodes, whose pods reach it there and through the
    `kubernetes` Service).

    Use as a context manager, or call `start()` and `stop()`. All state (certificates,
    etcd data, kubeconfigs, logs) lives in one temporary directory that `stop()` removes;
    `stop(keep_logs=True)` first copies the component logs (and a dump of the cluster
    state) to `logs_dir`, whose path it returns.
    """

    def __init__(
        self,
        bin_dir: Path | None = None,
        *,
        start_timeout: float = 90.0,
        log_verbosity: int = 1,
        workdir_parent: Path | None = None,
        address: str = LOOPBACK,
    ) -> None:
        self._bin_dir = bin_dir
        self.address = address
        self.start_timeout = start_timeout
        self.log_verbosity = log_verbosity
        self._workdir_parent = workdir_parent
        self.workdir: Path | None = None
        self._processes: Processes | None = None
        self.versions = read_versions()
        self.apiserver_port = 0
        self.etcd_port = 0
        self.started_at = 0.0
        self.startup_seconds = 0.0

    # ----------------------------------------------------------------- paths

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = ensure_binaries()
        return self._bin_dir

    def _work(self) -> Path:
        if self.workdir is None:
            raise ControlPlaneError("the control plane is not started")
        return self.workdir

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (user in system:masters)."""
        return self._work() / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.apiserver_port}"

    @property
    def ca_file(self) -> Path:
        return self._work() / "pki" / "ca.crt"

    @property
    def log_dir(self) -> Path:
        return self._work() / "logs"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        kept = self.stop(keep_logs=exc is not None)
        if kept:
            print(f"control-plane logs kept in {kept}", file=sys.stderr)

    def start(self) -> None:
        if self.workdir is not None:
            raise ControlPlaneError("already started")
        bin_dir = self.bin_dir  # builds first, outside the start deadline
        self.started_at = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="amxtune-cp-", dir=self._workdir_parent))
        atexit.register(self.stop)
        try:
            self._write_pki_and_kubeconfigs()
            self._start_etcd(bin_dir)
            self._start_apiserver(bin_dir)
            self._start_controller_manager(bin_dir)
            self._start_scheduler(bin_dir)
            self._start_kwok(bin_dir)
            self._wait_controllers_ready()
        except BaseException:
            kept = self.stop(keep_logs=True)
            print(f"control plane failed to start; logs kept in {kept}", file=sys.stderr)
            raise
        self.startup_seconds = time.monotonic() - self.started_at

    def stop(self, *, keep_logs: bool = False, logs_dir: Path | None = None) -> Path | None:
        """Stop every component (reverse order) and remove the work directory.

        With `keep_logs`, the logs and a snapshot of the cluster state are copied first to
        `logs_dir` (default: $AMXTUNE_CLUSTER_LOGS or a new temporary directory) and that
        directory is returned.
        """
        if self.workdir is None:
            return None
        kept: Path | None = None
        try:
            if keep_logs:
                with contextlib.suppress(Exception):
                    self._dump_cluster_state()
            if self._processes is not None:
                self._processes.stop()
            if keep_logs and self.log_dir.exists():
                kept = logs_dir or _default_kept_logs_dir()
                try:
                    shutil.copytree(self.log_dir, kept, dirs_exist_ok=True, symlinks=True)
                except (OSError, shutil.Error) as exc:
                    print(f"could not copy all logs to {kept}: {exc!r}", file=sys.stderr)
        finally:
            atexit.unregister(self.stop)
            self._processes = None
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return kept

    # ----------------------------------------------------------------- setup

    def _write_pki_and_kubeconfigs(self) -> None:
        work = self._work()
        pki = work / "pki"
        pki.mkdir(mode=0o700)
        self.log_dir.mkdir()
        self.etcd_port = free_port()
        self.apiserver_port = free_port()

        ca = _CertificateAuthority()
        self._ca = ca
        files: dict[str, bytes] = {}
        files["ca.crt"], files["ca.key"] = ca.pair.cert_pem, ca.pair.key_pem
        serving = ca.issue(
            "kube-apiserver",
            server=True,
            dns_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ip_addresses=sorted({LOOPBACK, self.address, "10.96.0.1"}),
        )
        files["apiserver.crt"], files["apiserver.key"] = serving.cert_pem, serving.key_pem
        # What the apiserver presents to kubelets (logs, exec); real kubelets check it.
        kubelet_client = ca.issue("kube-apiserver-kubelet-client", organizations=["system:masters"])
        files["apiserver-kubelet-client.crt"] = kubelet_client.cert_pem
        files["apiserver-kubelet-client.key"] = kubelet_client.key_pem
        # Front proxy (aggregation layer): lets kube-controller-manager and kube-scheduler
        # find the request-header CA they expect in extension-apiserver-authentication.
        front_ca = _CertificateAuthority("amxtune-test-front-proxy-ca")
        front_client = front_ca.issue("front-proxy-client")
        files["front-proxy-ca.crt"] = front_ca.pair.cert_pem
        files["front-proxy-client.crt"] = front_client.cert_pem
        files["front-proxy-client.key"] = front_client.key_pem
        sa_key = _new_key()
        files["sa.key"] = _key_pem(sa_key)
        files["sa.pub"] = sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for name, data in files.items():
            path = pki / name
            path.write_bytes(data)
            path.chmod(0o600)

        clients = {
            "admin": ("amxtune-admin", ["system:masters"]),
            "controller-manager": ("system:kube-controller-manager", []),
            "scheduler": ("system:kube-scheduler", []),
            "kwok": ("kwok-controller", ["system:masters"]),
        }
        for name, (cn, orgs) in clients.items():
            pair = ca.issue(cn, organizations=orgs)
            self._write_kubeconfig(work / f"{name}.kubeconfig", cn, pair)

    def _write_kubeconfig(self, path: Path, user: str, pair: _KeyPair) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "amxtune-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": _b64(self._ca.pair.cert_pem),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": _b64(pair.cert_pem),
                        "client-key-data": _b64(pair.key_pem),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "amxtune-test",
                    "context": {"cluster": "amxtune-test", "user": user, "namespace": "default"},
                }
            ],
            "current-context": "amxtune-test",
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)

    def _spawn(self, name: str, args: list[str]) -> None:
        if self._processes is None:
            self._processes = Processes(self.log_dir, cwd=self._work())
        self._processes.spawn(name, args)

    def _check_alive(self) -> None:
        if self._processes is not None:
            self._processes.check_alive()

    def _deadline_left(self) -> float:
        return max(1.0, self.start_timeout - (time.monotonic() - self.started_at))

    def _start_etcd(self, bin_dir: Path) -> None:
        peer_port = free_port()
        client_url = f"http://{LOOPBACK}:{self.etcd_port}"
        peer_url = f"http://{LOOPBACK}:{peer_port}"
        self._spawn(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name=amxtune",
                f"--data-dir={self._work() / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=amxtune={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",  # throw-away data: skip fsync for speed
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
        )

        def etcd_healthy() -> bool:
            self._check_alive()
            with urllib.request.urlopen(f"{client_url}/health", timeout=2) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")

        wait_for(etcd_healthy, timeout=self._deadline_left(), interval=0.2, what="etcd /health")

    def _start_apiserver(self, bin_dir: Path) -> None:
        work, pki = self._work(), self._work() / "pki"
        self._spawn(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://{LOOPBACK}:{self.etcd_port}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.apiserver_port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                # nodes' names are not in this machine's DNS, their addresses are theirs
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--authorization-mode=Node,RBAC",
                f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16",
                # Defaults plus NodeRestriction: NamespaceLifecycle, LimitRanger,
                # ServiceAccount, TaintNodesByCondition, PodSecurity, Priority,
                # DefaultTolerationSeconds, ResourceQuota, admission webhooks and policies...
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                # The kubernetes Service's endpoints cannot hold a loopback address.
                "--endpoint-reconciler-type="
                + ("none" if self.address == LOOPBACK else "lease"),
                "--profiling=false",
                f"--cert-dir={work / 'apiserver-certs'}",
                f"--v={self.log_verbosity}",
            ],
        )
        self._wait_https_ok(f"{self.server}/readyz", client=True, what="kube-apiserver /readyz")

    def _start_controller_manager(self, bin_dir: Path) -> None:
        work, pki = self._work(), self._work() / "pki"
        kubeconfig = work / "controller-manager.kubeconfig"
        self._kcm_port = free_port()
        self._spawn(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={self._kcm_port}",
                f"--cert-dir={work / 'kcm-certs'}",
                "--controllers=*",  # the default set: garbage collector, tokens, nodes...
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--leader-elect=false",
                "--profiling=false",
                f"--v={self.log_verbosity}",
            ],
        )

    def _start_scheduler(self, bin_dir: Path) -> None:
        work = self._work()
        kubeconfig = work / "scheduler.kubeconfig"
        self._scheduler_port = free_port()
        self._spawn(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={self._scheduler_port}",
                f"--cert-dir={work / 'scheduler-certs'}",
                "--leader-elect=false",
                "--profiling=false",
                f"--v={self.log_verbosity}",
            ],
        )

    def _start_kwok(self, bin_dir: Path) -> None:
        work = self._work()
        key, value = KWOK_NODE_ANNOTATION
        self._kwok_port = free_port()
        self._spawn(
            "kwok",
            [
                str(bin_dir / "kwok"),
                f"--kubeconfig={work / 'kwok.kubeconfig'}",
                f"--config={KWOK_STAGES}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={key}={value}",
                # Node and pod addresses are status data only; nothing listens on them.
                f"--node-ip={LOOPBACK}",
                "--cidr=10.244.0.0/16",
                "--node-lease-duration-seconds=40",
                f"--server-address={LOOPBACK}:{self._kwok_port}",
            ],
        )
        # kwok's own delete step can hit a newer pod of the same name: see the script
        self._spawn(
            "finish-deletions",
            [sys.executable, str(FINISH_DELETIONS), str(work / "kwok.kubeconfig"),
             f"{key}={value}"],
        )

    def _wait_controllers_ready(self) -> None:
        self._wait_https_ok(
            f"https://{LOOPBACK}:{self._kcm_port}/healthz",
            client=False,
            what="kube-controller-manager /healthz",
        )
        self._wait_https_ok(
            f"https://{LOOPBACK}:{self._scheduler_port}/readyz",
            client=False,
            what="kube-scheduler /readyz",
        )
        # Pods need the namespace's "default" ServiceAccount (token controller is up).
        wait_for(
            lambda: self._check_alive() or self.get("serviceaccount", "default", "default"),
            timeout=self._deadline_left(),
            what="ServiceAccount default/default",
        )
        self._wait_http_ok(f"http://{LOOPBACK}:{self._kwok_port}/healthz", what="kwok /healthz")

    def _ssl_context(self, *, client: bool) -> ssl.SSLContext:
        if client:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            pki = self._work() / "pki"
            if not (pki / "probe.crt").exists():
                pair = self._ca.issue("amxtune-probe", organizations=["system:masters"])
                (pki / "probe.crt").write_bytes(pair.cert_pem)
                (pki / "probe.key").write_bytes(pair.key_pem)
            ctx.load_cert_chain(str(pki / "probe.crt"), str(pki / "probe.key"))
            return ctx
        # Controller-manager and scheduler serve a self-signed certificate; only their
        # unauthenticated health endpoints are probed.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _wait_http_ok(self, url: str, *, what: str) -> None:
        self._wait_https_ok(url, client=False, what=what)

    def _wait_https_ok(self, url: str, *, client: bool, what: str) -> None:
        ctx = self._ssl_context(client=client) if url.startswith("https:") else None

        def ok() -> bool:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, timeout=3, context=ctx) as resp:
                    return bool(resp.status == 200)
            except urllib.error.HTTPError:
                return False

        wait_for(ok, timeout=self._deadline_left(), interval=0.25, what=what)

    def _dump_cluster_state(self) -> None:
        if self.apiserver_port == 0:
            return
        out = self.kubectl(
            "get",
            "nodes,pods,jobs,events,serviceaccounts",
            "-A",
            "-o",
            "wide",
            check=False,
            timeout=20,
        )
        crs = self.kubectl("get", "crd", "-o", "name", check=False, timeout=20)
        text = f"$ kubectl get nodes,pods,jobs,events,serviceaccounts -A -o wide\n{out.stdout}"
        text += f"{out.stderr}\n$ kubectl get crd\n{crs.stdout}{crs.stderr}\n"
        (self.log_dir / "cluster-state.txt").write_text(text)

    # ----------------------------------------------------------------- kubectl

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        kubeconfig: Path | None = None,
        token: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster as admin (or with a bearer `token`).

        Raises `KubectlError` (with the apiserver's message in `.stderr`) when `check`.
        """
        cmd = [str(self.binary("kubectl"))]
        if token is not None:
            cmd += [
                f"--server={self.server}",
                f"--certificate-authority={self.ca_file}",
                f"--token={token}",
                "--kubeconfig=/dev/null",
            ]
        else:
            cmd.append(f"--kubeconfig={kubeconfig or self.kubeconfig}")
        cmd += list(args)
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if check and proc.returncode != 0:
            raise KubectlError(args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def helm(self, *args: str, check: bool = True, timeout: float = 180.0
             ) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster as admin (its cache and config in the log folder)."""
        result = subprocess.run(
            [str(self.binary("helm")), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"HOME": str(self.log_dir), "PATH": "/usr/bin:/bin"},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def kubectl_json(self, *args: str, **kwargs: Any) -> Any:
        """kubectl ... -o json, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json", **kwargs).stdout)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The object as a dict, or None when it does not exist."""
        args = ["get", kind, name, "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        proc = self.kubectl(*args, check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise KubectlError(args, proc.returncode, proc.stdout, proc.stderr)
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def apply_yaml(
        self, source: str | Path, *, namespace: str | None = None, server_side: bool = False
    ) -> str:
        """`kubectl apply` a file, a directory or YAML text; returns kubectl's output."""
        args = ["apply"]
        if server_side:
            args += ["--server-side", "--force-conflicts"]
        if namespace:
            args += ["-n", namespace]
        text: str | None = None
        if isinstance(source, Path) or ("\n" not in source and Path(source).exists()):
            args += ["-f", str(source)]
        else:
            args += ["-f", "-"]
            text = source
        return self.kubectl(*args, input=text).stdout

    def create_yaml(self, text: str, *, namespace: str | None = None) -> str:
        """`kubectl create -f -` (fails when the object exists or is invalid)."""
        args = ["create", "-f", "-"] + (["-n", namespace] if namespace else [])
        return self.kubectl(*args, input=text).stdout

    def delete(
        self, kind: str, name: str, namespace: str | None = None, *, wait: bool = True
    ) -> None:
        args = ["delete", kind, name, "--ignore-not-found", f"--wait={str(wait).lower()}"]
        if namespace:
            args += ["-n", namespace]
        self.kubectl(*args, timeout=120)

    def wait_for(
        self,
        condition: Callable[[], T | None],
        *,
        timeout: float = 60.0,
        interval: float = 0.5,
        what: str = "condition",
    ) -> T:
        """See module-level `wait_for`; also fails early when a component died."""

        def checked() -> T | None:
            self._check_alive()
            return condition()

        return wait_for(checked, timeout=timeout, interval=interval, what=what)

    def wait_for_jsonpath(
        self,
        resource: str,
        jsonpath: str,
        expected: str | Callable[[str], bool],
        *,
        namespace: str | None = None,
        timeout: float = 60.0,
    ) -> str:
        """Poll `kubectl get <resource> -o jsonpath=<jsonpath>` until it equals `expected`
        (or `expected(value)` is true). Returns the value.

        Example: ``wait_for_jsonpath("pod/p", "{.status.phase}", "Running", namespace=ns)``.
        """
        args = ["get", resource, "-o", f"jsonpath={jsonpath}"]
        if namespace:
            args += ["-n", namespace]

        def matches() -> str | None:
            value = self.kubectl(*args).stdout
            ok = expected(value) if callable(expected) else value == expected
            return value if ok else None

        try:
            return self.wait_for(
                matches, timeout=timeout, what=f"{resource} {jsonpath} == {expected!r}"
            )
        except TimeoutError as exc:
            current = self.kubectl(*args, check=False)
            raise TimeoutError(f"{exc}; current value: {current.stdout!r}") from exc

    def events_for(
        self,
        obj: dict[str, Any] | None = None,
        *,
        kind: str | None = None,
        name: str | None = None,
        namespace: str | None = None,
    ) -> list[dict[str, Any]]:
        """Events whose involvedObject is `obj` (a dict from `get`) or kind/name/namespace,
        oldest first."""
        if obj is not None:
            kind = kind or obj["kind"]
            name = name or obj["metadata"]["name"]
            namespace = namespace or obj["metadata"].get("namespace")
        if not name:
            raise ValueError("events_for needs an object or a name")
        selector = f"involvedObject.name={name}"
        if kind:
            selector += f",involvedObject.kind={kind}"
        args = ["get", "events", f"--field-selector={selector}"]
        args += ["-n", namespace] if namespace else ["-A"]
        items: list[dict[str, Any]] = self.kubectl_json(*args).get("items", [])
        return sorted(
            items,
            key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "",
        )

    def create_namespace(self, name: str, *, wait_service_account: bool = True) -> str:
        self.kubectl("create", "namespace", name)
        if wait_service_account:
            self.wait_for(
                lambda: self.get("serviceaccount", "default", name),
                timeout=30,
                what=f"ServiceAccount {name}/default",
            )
        return name

    def create_token(self, service_account: str, namespace: str, duration: str = "1h") -> str:
        """A bound token for `service_account` from the TokenRequest API."""
        return self.kubectl(
            "create", "token", service_account, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()

    # ----------------------------------------------------------------- nodes

    def create_nodes(
        self, nodes: Iterable[NodeSpec] | None = None, *, wait_ready: bool = True
    ) -> list[str]:
        """Create simulated nodes (default: `default_nodes()`), managed by kwok.

        With `wait_ready`, waits until each is Ready and free of the not-ready taint,
        i.e. schedulable. Returns the node names.
        """
        specs = list(default_nodes() if nodes is None else nodes)
        if not specs:
            return []
        manifest = {"apiVersion": "v1", "kind": "List", "items": [n.manifest() for n in specs]}
        self.kubectl("create", "-f", "-", input=json.dumps(manifest))
        names = [n.name for n in specs]
        if wait_ready:
            self.wait_for(
                lambda: self._nodes_schedulable(names),
                timeout=60,
                what=f"nodes {names} Ready and untainted",
            )
        return names

    def _nodes_schedulable(self, names: Sequence[str]) -> bool:
        items = self.kubectl_json("get", "nodes", f"-l{NODE_SET_LABEL}=true")["items"]
        by_name = {n["metadata"]["name"]: n for n in items}
        for name in names:
            node = by_name.get(name)
            if node is None:
                return False
            conditions = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
            if conditions.get("Ready") != "True":
                return False
            taints = node["spec"].get("taints") or []
            if any(t["key"].startswith("node.kubernetes.io/") for t in taints):
                return False
        return True

    def node_names(self) -> list[str]:
        """Names of the simulated nodes."""
        items = self.kubectl_json("get", "nodes", f"-l{NODE_SET_LABEL}=true")["items"]
        return sorted(n["metadata"]["name"] for n in items)

    def delete_nodes(self, names: Iterable[str] | None = None) -> None:
        """Delete the given simulated nodes (default: all of them) and wait until gone."""
        targets = list(self.node_names() if names is None else names)
        if targets:
            self.kubectl("delete", "node", "--wait=true", "--ignore-not-found", *targets)

    def replace_nodes(self, nodes: Iterable[NodeSpec]) -> list[str]:
        """Make `nodes` the whole simulated node set (possibly empty)."""
        self.delete_nodes()
        return self.create_nodes(nodes)

    @contextlib.contextmanager
    def node_set(self, nodes: Iterable[NodeSpec]) -> Iterator[list[str]]:
        """Temporarily replace the node set, e.g. ``with cp.node_set(plain_nodes(2)):`` for a
        cluster without AMX; the previous set (as NodeSpecs rebuilt from the
        current nodes) is restored afterwards."""
        previous = self._current_specs()
        try:
            yield self.replace_nodes(nodes)
        finally:
            self.replace_nodes(previous)

    def _current_specs(self) -> list[NodeSpec]:
        specs = []
        base = set(NodeSpec("x").manifest()["metadata"]["labels"]) | set(AMX_LABELS)
        for node in self.kubectl_json("get", "nodes", f"-l{NODE_SET_LABEL}=true")["items"]:
            labels = node["metadata"].get("labels", {})
            capacity = node["status"].get("capacity", {})
            specs.append(
                NodeSpec(
                    name=node["metadata"]["name"],
                    amx=labels.get(AMX_LABEL) == "true",
                    cpu=capacity.get("cpu", "112"),
                    memory=capacity.get("memory", "512Gi"),
                    pods=capacity.get("pods", "110"),
                    labels={k: v for k, v in labels.items() if k not in base},
                    taints=[
                        t
                        for t in node["spec"].get("taints") or []
                        if not t["key"].startswith("node.kubernetes.io/")
                    ],
                )
            )
        return specs


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the Python process dies, so a killed
    test run (CI timeout, SIGKILL) leaves no component behind. Linux only."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _default_kept_logs_dir() -> Path:
    root = os.environ.get("AMXTUNE_CLUSTER_LOGS")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if root:
        return Path(root) / f"controlplane-{stamp}-{os.getpid()}"
    return Path(tempfile.mkdtemp(prefix=f"amxtune-cp-logs-{stamp}-"))


def _main() -> int:
    """Start a control plane with the default nodes and wait for Ctrl-C."""
    started = time.monotonic()
    bin_dir = ensure_binaries()
    with ControlPlane(bin_dir) as cp:
        cp.create_nodes()
        print(f"control plane up in {time.monotonic() - started:.1f}s", flush=True)
        print(f"export KUBECONFIG={cp.kubeconfig}", flush=True)
        print(f"logs: {cp.log_dir}   (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
