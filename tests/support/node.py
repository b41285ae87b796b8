"""Real Kubernetes nodes on this machine, for the e2e tier: pods run as containers.

Each `RealNode` is what a worker machine runs: Debian's containerd (with runc and Debian's CNI
plugins) and a kubelet built from the same k8s.io/kubernetes module as the control plane
(tools/controlplane/build.sh). One kube-proxy (iptables) and one CoreDNS, both built from
their Go modules, serve the cluster: the nodes share this machine's kernel, so one set of
Service rules serves them all.

Every address is one the tests own, on this machine: `host_network()` makes a bridge with no
ports (`amxtune-host`) carrying the apiserver's, the DNS server's and each node's address, and
each node's pods sit on a bridge of their own (`amxtune-cni<i>`). Pods have routes to those
addresses and to Services only; CoreDNS serves the cluster zone and forwards nothing.

Where these nodes differ from a production node (the machine has cgroup v1 and root lacks
CAP_SYS_RESOURCE): no QoS cgroups, no node-allocatable enforcement, OOM scores clamped by
containerd (`restrict_oom_score_adj`), swap allowed. Images come from podman
(`podman save | ctr images import`, once per image ID, into one containerd root kept in the
cache, which each node's root is a hard-linked copy of), so pods use
`imagePullPolicy: IfNotPresent` or `Never`; nothing is pulled.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import IO

from amxtune_trainer.builtin.models import cache_root
from tests.support.controlplane import (
    LOOPBACK,
    ControlPlane,
    ControlPlaneError,
    Processes,
    _default_kept_logs_dir,
    free_port,
    wait_for,
)
from tests.support.images import podman, podman_env

ROOT = Path(__file__).resolve().parents[2]
PAUSE_SOURCE = ROOT / "tools" / "controlplane" / "pause.c"

HOST_BRIDGE = "amxtune-host"
HOST_PREFIX = "10.89.210"
APISERVER_IP = f"{HOST_PREFIX}.1"
DNS_IP = f"{HOST_PREFIX}.2"
CLUSTER_DOMAIN = "cluster.local"
SERVICE_CIDR = "10.96.0.0/16"
# Every pod subnet lies in here: node i has 10.89.(212 + i).0/24.
POD_CIDR = "10.89.208.0/20"
NODE_LABEL = "amxtune.io/real-node"  # "true"; "masked-cpu" on the node with an older CPU
MASKED_NODE = "real-masked"

CNI_BIN_DIR = Path("/usr/lib/cni")
TOOLS = {  # what must be installed, and the Debian package that has it
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "iptables": "iptables",
    "gcc": "gcc",
    "podman": "podman",
}


class NodeUnavailable(ControlPlaneError):
    """This machine cannot run a real node; the message names what to install."""


def node_ip(index: int) -> str:
    return f"{HOST_PREFIX}.{10 + index}"


def pod_subnet(index: int) -> str:
    return f"10.89.{212 + index}.0/24"


def check_tools() -> None:
    missing = {pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
    missing |= {"containernetworking-plugins" for plugin in ("bridge", "host-local", "loopback")
                if not (CNI_BIN_DIR / plugin).exists()}
    if not Path("/usr/lib/x86_64-linux-gnu/libc.a").exists() and shutil.which("gcc"):
        missing.add("libc6-dev")
    if missing:
        raise NodeUnavailable(
            "the real nodes of the e2e tier need "
            f"`apt-get install {' '.join(sorted(missing))}` (as root)")
    if os.geteuid() != 0:
        raise NodeUnavailable("the real nodes of the e2e tier run containerd and a kubelet: "
                              "run the tests as root")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NodeUnavailable(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


@contextlib.contextmanager
def host_network(nodes: int) -> Iterator[None]:
    """The test-owned addresses: a bridge without ports holding the apiserver's, DNS's and
    the nodes' addresses (local delivery only; nothing routes them off this machine)."""
    _ip("link", "del", HOST_BRIDGE, check=False)  # left by a killed run
    _ip("link", "add", HOST_BRIDGE, "type", "bridge")
    try:
        for address in (APISERVER_IP, DNS_IP, *(node_ip(i) for i in range(nodes))):
            _ip("addr", "add", f"{address}/32", "dev", HOST_BRIDGE)
        _ip("link", "set", HOST_BRIDGE, "up")
        yield
    finally:
        _ip("link", "del", HOST_BRIDGE, check=False)


def _kube_chains() -> dict[tuple[str, str], list[str]]:
    """iptables rules of the KUBE-* chains (kube-proxy's, and the kubelet's canary and
    firewall chains), per (binary, table)."""
    found = {}
    for binary in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            listed = subprocess.run([binary, "-t", table, "-S"], capture_output=True, text=True)
            rules = listed.stdout.splitlines()
            if any(rule.startswith("-N KUBE-") for rule in rules):
                found[(binary, table)] = rules
    return found


def remove_kube_chains() -> None:
    """What the kubelets and kube-proxy left in iptables (a kubelet has no clean-up)."""
    run = partial(subprocess.run, capture_output=True)
    for (binary, table), rules in _kube_chains().items():
        for rule in rules:
            words = shlex.split(rule)
            if words[0] == "-A" and not words[1].startswith("KUBE-") and "KUBE-" in rule:
                run([binary, "-t", table, "-D", *words[1:]])
        chains = [rule.split()[1] for rule in rules if rule.startswith("-N KUBE-")]
        for chain in chains:
            run([binary, "-t", table, "-F", chain])
        for chain in chains:
            run([binary, "-t", table, "-X", chain])


def remove_leftover_pod_networks() -> None:
    """Network namespaces (with their veth) of pods on these nodes whose sandbox was never
    torn down: a killed run's."""
    pods = ipaddress.ip_network(POD_CIDR)
    for netns in Path("/var/run/netns").glob("cni-*"):
        listed = subprocess.run(["ip", "-n", netns.name, "-4", "-o", "addr"],
                                capture_output=True, text=True).stdout
        addresses = [word.split("/")[0] for word in listed.split() if "/" in word]
        if any(ipaddress.ip_address(a) in pods for a in addresses):
            subprocess.run(["ip", "netns", "delete", netns.name], capture_output=True)


def check_not_a_node() -> None:
    """KUBE-* chains with no kubelet running are a killed run's, removed; with one running
    this machine is a Kubernetes node already, whose rules the tests must not touch."""
    remove_leftover_pod_networks()
    if not _kube_chains():
        return
    if subprocess.run(["pgrep", "-x", "kubelet"], capture_output=True).returncode == 0:
        raise NodeUnavailable("a kubelet runs on this machine: the e2e tier's real nodes "
                              "would share its iptables chains; run the tests elsewhere")
    remove_kube_chains()


def pause_image() -> str:
    """containerd's sandbox image: tools/controlplane/pause.c, static, FROM scratch."""
    digest = hashlib.sha256(PAUSE_SOURCE.read_bytes()).hexdigest()[:12]
    tag = f"localhost/amxtune-pause:{digest}"
    if podman("image", "exists", tag).returncode == 0:
        return tag
    with tempfile.TemporaryDirectory() as context:
        compiled = subprocess.run(
            ["gcc", "-static", "-Os", "-o", f"{context}/pause", str(PAUSE_SOURCE)],
            capture_output=True, text=True)
        if compiled.returncode != 0:
            raise NodeUnavailable(f"could not compile {PAUSE_SOURCE}: {compiled.stderr}")
        Path(context, "Containerfile").write_text(
            'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n')
        built = podman("build", "--network=none", "-t", tag, context)
        if built.returncode != 0:
            raise NodeUnavailable(f"podman build of {tag} failed: {built.stderr[-2000:]}")
    return tag


class RealNode:
    """containerd + kubelet for node `index`, registered as `name` with the control plane."""

    def __init__(self, cp: ControlPlane, index: int, name: str, workdir: Path,
                 processes: Processes, env: dict[str, str] | None = None) -> None:
        self.cp, self.index, self.name = cp, index, name
        self.env = env or {}
        self.work = workdir / name
        self.processes = processes
        self.ip = node_ip(index)
        self.bridge = f"amxtune-cni{index}"
        # A copy of the image store for this run (in the cache, to be on the store's file
        # system: the copy is hard links).
        self.containerd_root = cache_root() / "node" / f"containerd-{index}"
        self.socket = self.work / "containerd.sock"

    # ----------------------------------------------------------------- containerd

    def ctr(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        return _ctr(self.socket, *args, timeout=timeout)

    def _start_containerd(self, sandbox_image: str) -> None:
        cni_dir = self.work / "cni"
        cni_dir.mkdir(parents=True)
        conflist = {
            "cniVersion": "0.4.0",
            "name": f"amxtune-pods-{self.index}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": pod_subnet(self.index)}]],
                        # only this machine's test addresses and the Services: no way out
                        "routes": [{"dst": POD_CIDR}, {"dst": f"{HOST_PREFIX}.0/24"},
                                   {"dst": SERVICE_CIDR}],
                        "dataDir": str(self.work / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (cni_dir / "10-amxtune.conflist").write_text(json.dumps(conflist, indent=1))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        base_spec = f'base_runtime_spec = "{self._base_runtime_spec()}"' if self.env else ""
        config = f"""version = 2
root = "{self.containerd_root}"
state = "{self.work / 'containerd-state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.work / 'opt'}"
[{cri}]
  sandbox_image = "{sandbox_image}"
  # root here lacks CAP_SYS_RESOURCE: a sandbox's oom_score_adj of -998 would fail
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      {base_spec}
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_dir}"
"""
        config_path = self.work / "containerd.toml"
        config_path.write_text(config)
        self.processes.spawn(f"containerd-{self.index}",
                             ["containerd", "--config", str(config_path)])
        wait_for(lambda: self.processes.check_alive() or self.ctr("version").returncode == 0,
                 timeout=60, what=f"containerd of {self.name}")

    def _base_runtime_spec(self) -> Path:
        """containerd's default OCI spec plus this node's environment for every container,
        with each library of its LD_PRELOAD bind-mounted read-only under /opt/amxtune-node
        and listed in the container's /etc/ld.so.preload (the CPU mask: this node's CPU looks
        older to everything its pods run). Not through the LD_PRELOAD variable: a container
        that sets its own (the operator's tcmalloc) would replace it, and the mask with it."""
        shown = subprocess.run(["ctr", "oci", "spec"], capture_output=True, text=True)
        if shown.returncode != 0:
            raise NodeUnavailable(f"ctr oci spec failed: {shown.stderr.strip()}")
        spec = json.loads(shown.stdout)
        env = dict(self.env)
        preload = []
        for library in filter(None, env.pop("LD_PRELOAD", "").split(":")):
            inside = f"/opt/amxtune-node/{Path(library).name}"
            spec["mounts"].append({"destination": inside, "type": "bind", "source": library,
                                   "options": ["rbind", "ro"]})
            preload.append(inside)
        if preload:
            listing = self.work / "ld.so.preload"
            listing.write_text("\n".join(preload) + "\n")
            spec["mounts"].append({"destination": "/etc/ld.so.preload", "type": "bind",
                                   "source": str(listing), "options": ["rbind", "ro"]})
        spec["process"]["env"] = [f"{key}={value}" for key, value in env.items()]
        path = self.work / "base-runtime-spec.json"
        path.write_text(json.dumps(spec, indent=1))
        return path

    def _remove_containers(self) -> None:
        """Every container a stopped kubelet left running."""
        for container in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("tasks", "rm", "-f", container)
            self.ctr("containers", "rm", container)

    # ----------------------------------------------------------------- kubelet

    def _start_kubelet(self) -> None:
        cp, work = self.cp, self.work
        pki = work / "pki"
        pki.mkdir()
        serving = cp._ca.issue(self.name, server=True, dns_names=[self.name],
                               ip_addresses=[self.ip])
        (pki / "kubelet.crt").write_bytes(serving.cert_pem)
        (pki / "kubelet.key").write_bytes(serving.key_pem)
        client = cp._ca.issue(f"system:node:{self.name}", organizations=["system:nodes"])
        kubeconfig = work / "kubelet.kubeconfig"
        cp._write_kubeconfig(kubeconfig, f"system:node:{self.name}", client)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.ip,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": LOOPBACK,
            "healthzPort": free_port(),
            "tlsCertFile": str(pki / "kubelet.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet.key"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(cp.ca_file)},
            },
            "authorization": {"mode": "Webhook"},
            "clusterDomain": CLUSTER_DOMAIN,
            "clusterDNS": [DNS_IP],
            "resolvConf": "",  # pods see cluster DNS only, never this machine's resolvers
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            # not /var/log/pods: each kubelet removes the log folders of pods it does not run
            "podLogsDir": str(work / "pod-logs"),
            # this machine: cgroup v1, cgroupfs, swap, no QoS cgroups or allocatable enforcing
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "localStorageCapacityIsolation": False,
            # the images were imported, nothing can pull them again: never collect them
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "serializeImagePulls": False,
            "maxPods": 20,
            "staticPodPath": "",
        }
        config_path = work / "kubelet.yaml"
        config_path.write_text(json.dumps(config, indent=1))
        self.processes.spawn(f"kubelet-{self.index}", [
            str(cp.binary("kubelet")),
            f"--config={config_path}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={work / 'kubelet'}",
            f"--node-ip={self.ip}",
            f"--hostname-override={self.name}",
            f"--node-labels={NODE_LABEL}={'masked-cpu' if self.env else 'true'}",
            "--v=1",
        ])

    def start(self, sandbox_image: str, images: ImageStore) -> RealNode:
        self.work.mkdir(parents=True)
        images.copy_to(self.containerd_root)
        self._start_containerd(sandbox_image)
        self._start_kubelet()
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        jsonpath = '{.status.conditions[?(@.type=="Ready")].status}'

        def ready() -> bool:
            self.processes.check_alive()
            return self.cp.kubectl("get", "node", self.name, "-o", f"jsonpath={jsonpath}",
                                   check=False).stdout == "True"

        wait_for(ready, timeout=timeout, what=f"node {self.name} Ready")

    def stop(self) -> None:
        """The kubelet first, then every container it left, then containerd."""
        self.processes.stop(f"kubelet-{self.index}")
        with contextlib.suppress(Exception):
            self._remove_containers()
        self.processes.stop(f"containerd-{self.index}")
        _unmount_below(self.work)
        _remove_tree(self.containerd_root)
        _ip("link", "del", self.bridge, check=False)


def _ctr(socket: Path, *args: str, timeout: float = 1800,
         stdin: int | IO[bytes] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ctr", "--address", str(socket), "--namespace", "k8s.io", *args],
                          stdin=stdin, capture_output=True, text=True, timeout=timeout)


class ImageStore:
    """The images every node has, in one containerd root kept in the cache; each node runs on
    a hard-linked copy of it (`copy_to`). The trainer image is 6.6 GB, held twice by
    containerd (its layers as blobs and unpacked): one copy per node would take 13 GB each.

    `update` imports each image once per image ID (podman's), streamed from `podman save`
    (no archive on disk), through a containerd of its own that stops before any copy is made.
    """

    def __init__(self, root: Path, work: Path, processes: Processes) -> None:
        self.root, self.work, self.processes = root, work, processes
        self.socket = work / "containerd.sock"

    def update(self, images: list[str]) -> None:
        stamps = self.root / "imported.json"
        imported = json.loads(stamps.read_text()) if stamps.exists() else {}
        current = {}
        for image in images:
            image_id = podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()
            if not image_id:
                raise NodeUnavailable(f"podman has no image {image} (make images)")
            current[image] = image_id
        if current == imported:
            return
        self.work.mkdir(parents=True)
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.work / "containerd.toml"
        # only what an import needs: no CRI, no snapshotters but overlayfs (the nodes')
        config.write_text(f"""version = 2
root = "{self.root}"
state = "{self.work / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.work / 'opt'}"
""")
        _unmount_below(self.root)  # what a killed import left
        self.processes.spawn("containerd-images", ["containerd", "--config", str(config)])
        try:
            wait_for(lambda: self.processes.check_alive()
                     or _ctr(self.socket, "version").returncode == 0,
                     timeout=60, what="containerd of the image store")
            listed = set(_ctr(self.socket, "images", "ls", "-q").stdout.split())
            for image, image_id in current.items():
                if imported.get(image) == image_id and image in listed:
                    continue
                if image in listed:  # keep the old version's layers while the new one unpacks
                    _ctr(self.socket, "images", "tag", "--force", image, f"{image}-replaced")
                self._import(image)
                imported[image] = image_id
                stamps.write_text(json.dumps(imported, indent=1))
            # what CRI knows them by: their names and their IDs (the config digest, as
            # podman's); the rest (replaced versions) only now, once nothing unpacks on them
            keep = set(current) | {f"sha256:{image_id}" for image_id in current.values()}
            for name in set(_ctr(self.socket, "images", "ls", "-q").stdout.split()) - keep:
                _ctr(self.socket, "images", "rm", "--sync", name)
            stamps.write_text(json.dumps(current, indent=1))
        finally:
            self.processes.stop("containerd-images")
            _unmount_below(self.root)

    def _import(self, image: str) -> None:
        with open(self.work / f"save-{image.replace('/', '_')}.log", "w+b") as errors:
            saver = subprocess.Popen(["podman", "save", "--format", "docker-archive", image],
                                     stdout=subprocess.PIPE, stderr=errors, env=podman_env())
            assert saver.stdout is not None
            try:
                loaded = _ctr(self.socket, "images", "import", "-", stdin=saver.stdout)
            finally:
                saver.stdout.close()
                saved = saver.wait(timeout=60)
            errors.seek(0)
            if saved != 0:
                raise NodeUnavailable(f"podman save {image} failed: "
                                      f"{errors.read().decode(errors='replace').strip()}")
        if loaded.returncode != 0:
            raise NodeUnavailable(f"ctr images import of {image} failed: "
                                  f"{loaded.stderr.strip()}")

    def copy_to(self, root: Path) -> None:
        """`root`, replaced by hard links to the store's files (layers are never written in
        place: a container writes to an upper layer of its own), except containerd's two
        databases, which each node writes: those are copied."""
        _remove_tree(root)
        copied = subprocess.run(["cp", "-a", "--link", str(self.root), str(root)],
                                capture_output=True, text=True)
        if copied.returncode != 0:
            raise NodeUnavailable(f"could not copy the image store {self.root} to {root}: "
                                  f"{copied.stderr.strip()}")
        for database in ("io.containerd.metadata.v1.bolt/meta.db",
                         "io.containerd.snapshotter.v1.overlayfs/metadata.db"):
            linked = root / database
            if linked.exists():
                linked.unlink()
                shutil.copy2(self.root / database, linked)


def _remove_tree(folder: Path) -> None:
    """`folder` and whatever a killed run left mounted below it."""
    if folder.exists():
        _unmount_below(folder)
        shutil.rmtree(folder)


def _unmount_below(folder: Path) -> None:
    """What the kubelet mounted under its root (secrets, tokens) and did not unmount."""
    prefix = str(folder.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True)


class RealCluster:
    """The control plane on a test-owned address, `nodes` real nodes, kube-proxy, CoreDNS.

    `masked_cpu` (the environment of tests/support/cpumask.py) adds one more node,
    `real-masked`, whose containers all run with it: a node whose CPU is older than its labels
    may say. Use as a context manager; the images (`make images`) must exist in podman.
    """

    def __init__(self, images: list[str], nodes: int = 2, *,
                 masked_cpu: dict[str, str] | None = None,
                 workdir_parent: Path | None = None) -> None:
        self.images = images
        self.node_count = nodes
        self.masked_cpu = masked_cpu
        self.workdir_parent = workdir_parent
        self.cp = ControlPlane(address=APISERVER_IP, workdir_parent=workdir_parent)
        self.nodes: list[RealNode] = []
        self.processes: Processes | None = None  # once the cluster's folder exists
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> RealCluster:
        check_tools()
        check_not_a_node()
        try:
            self._start()
        except BaseException:
            self._keep_logs()
            self._exit.close()
            raise
        return self

    def _keep_logs(self) -> None:
        if self.processes is not None:
            kept = _default_kept_logs_dir()
            shutil.copytree(self.processes.log_dir, kept / "nodes", dirs_exist_ok=True)
            print(f"real-node logs kept in {kept / 'nodes'}")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None:
            self._keep_logs()
        # pods first, so that each kubelet stops its containers and frees their network
        with contextlib.suppress(Exception):
            self.cp.kubectl("delete", "pods", "--all", "--all-namespaces", "--wait=true",
                            "--timeout=90s", timeout=120, check=False)
        self._exit.close()

    def _start(self) -> None:
        sandbox_image = pause_image()
        total = self.node_count + (1 if self.masked_cpu else 0)
        self._exit.enter_context(host_network(total))
        self._exit.callback(remove_kube_chains)
        self._exit.enter_context(self.cp)
        self.work = Path(tempfile.mkdtemp(prefix="amxtune-nodes-", dir=self.workdir_parent))
        self._exit.callback(shutil.rmtree, self.work, True)
        logs = self.work / "logs"
        logs.mkdir()
        self.processes = Processes(logs)
        self._exit.callback(self.processes.stop)
        self._start_coredns()
        for index in range(total):
            masked = index == self.node_count
            node = RealNode(self.cp, index, MASKED_NODE if masked else f"real-{index}",
                            self.work, self.processes, env=self.masked_cpu if masked else None)
            self.nodes.append(node)
            self._exit.callback(node.stop)
            # a killed run's copy first: the disk may have room for one more version only
            _remove_tree(node.containerd_root)
        images = ImageStore(cache_root() / "node" / "images", self.work / "images",
                            self.processes)
        images.update([sandbox_image, *self.images])
        for node in self.nodes:
            node.start(sandbox_image, images)
        # after the kubelets: kube-proxy gives up when its node does not appear in time
        self._start_kube_proxy()
        for node in self.nodes:
            node.wait_ready()

    def _start_coredns(self) -> None:
        cp = self.cp
        cp.apply_yaml(COREDNS_RBAC)
        client = cp._ca.issue("system:amxtune-coredns")
        kubeconfig = self.work / "coredns.kubeconfig"
        cp._write_kubeconfig(kubeconfig, "system:amxtune-coredns", client)
        ready_port = free_port()
        corefile = self.work / "Corefile"
        corefile.write_text(f"""{CLUSTER_DOMAIN}:53 {{
    bind {DNS_IP}
    errors
    ready {LOOPBACK}:{ready_port}
    kubernetes {CLUSTER_DOMAIN} {{
        kubeconfig {kubeconfig} amxtune-test
        pods insecure
    }}
}}
.:53 {{
    bind {DNS_IP}
    errors
}}
""")
        self.processes.spawn("coredns", [str(cp.binary("coredns")), "-conf", str(corefile)])
        cp._wait_http_ok(f"http://{LOOPBACK}:{ready_port}/ready", what="CoreDNS /ready")

    def _start_kube_proxy(self) -> None:
        cp = self.cp
        client = cp._ca.issue("system:kube-proxy")
        kubeconfig = self.work / "kube-proxy.kubeconfig"
        cp._write_kubeconfig(kubeconfig, "system:kube-proxy", client)
        args = [str(cp.binary("kube-proxy")), f"--kubeconfig={kubeconfig}",
                "--proxy-mode=iptables"]

        def stop_and_clean_up() -> None:  # its iptables rules go with it
            self.processes.stop("kube-proxy")
            subprocess.run([*args, "--cleanup"], capture_output=True)

        self._exit.callback(stop_and_clean_up)
        self.processes.spawn("kube-proxy", [
            *args,
            "--hostname-override=real-0",
            f"--cluster-cidr={POD_CIDR}",
            f"--healthz-bind-address={LOOPBACK}:{free_port()}",
            f"--metrics-bind-address={LOOPBACK}:{free_port()}",
            # leave this machine's sysctls alone
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0s",
            "--conntrack-tcp-timeout-close-wait=0s",
            "--iptables-localhost-nodeports=false",
            "--v=1",
        ])

    def kill(self, namespace: str, pod: str) -> None:
        """SIGKILL every process of the pod's container, on its node (a process killed
        under the kubelet, as the OOM killer or a crash would)."""
        found = self.cp.kubectl_json("get", "pod", pod, "-n", namespace)
        node = next(n for n in self.nodes if n.name == found["spec"]["nodeName"])
        container = found["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
        killed = node.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", container)
        if killed.returncode != 0:
            raise AssertionError(f"ctr tasks kill {container} failed: {killed.stderr}")

    def logs(self) -> dict[str, str]:
        """The last lines of every node component's log."""
        return self.processes.tails()


COREDNS_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:amxtune-coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:amxtune-coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:amxtune-coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:amxtune-coredns"}
"""
