"""The two images, built by tools/images/build.sh, and rendered pods run in them with podman.

`ensure_images()` runs the build (seconds when podman's layer cache is warm) and fails with the
build's own message (a missing podman or debootstrap, a failed step) instead of skipping.

`PodmanPod` runs a pod the operator rendered the way a kubelet would run it, minus the node:
the container's command with $(VAR) expanded from its env, the env itself, the pod's user and
group, fsGroup on the writable volumes, the container's securityContext (capabilities, privilege
escalation, a read-only root file system: then only the pod's volumes are writable), ConfigMaps
as read-only files, emptyDirs and claims as folders the test owns. The network is a bridge of
the test's own with no route out and no DNS (`eth0` inside, as in a pod, for the rendered
GLOO_SOCKET_IFNAME); names the pod must resolve, such as the rendezvous name of worker 0, are
given as `hosts` (what cluster DNS would answer).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from amxtune.quantity import parse_quantity
from amxtune_trainer.builtin.models import cache_root

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "tools" / "images" / "build.sh"
OPERATOR_IMAGE = "localhost/amxtune-operator:dev"
TRAINER_IMAGE = "localhost/amxtune-trainer:dev"
TEST_NETWORK = "amxtune-test-pods"
# The bridge's subnet, so that a test can give worker 0 the address its peers resolve it to.
TEST_SUBNET = "10.89.201"


ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_env_refs(text: str, env: dict[str, str]) -> str:
    """$(VAR) from the container's env, as Kubernetes expands a command; unknown ones stay."""
    return ENV_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def cache_dir() -> Path:
    return cache_root() / "images"  # AMXTUNE_CACHE, as for the build script


def podman_env() -> dict[str, str]:
    """The build script's podman configuration (runc, no default ulimits), for every call."""
    return {**os.environ, "CONTAINERS_CONF": str(cache_dir() / "containers.conf")}


class ImageBuildFailed(RuntimeError):
    pass


def ensure_images(timeout: float = 3600.0) -> list[str]:
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise ImageBuildFailed(proc.stderr.strip()[-4000:] or f"exit code {proc.returncode}")
    return proc.stdout.strip().splitlines()[-1].split()


def podman(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_env()
    )


def pod_network() -> str:
    """An internal bridge (no route out, no DNS) the tests own: containers get an eth0."""
    if podman("network", "exists", TEST_NETWORK).returncode != 0:
        created = podman("network", "create", "--internal", "--disable-dns",
                         f"--subnet={TEST_SUBNET}.0/24", TEST_NETWORK)
        if created.returncode != 0 and podman("network", "exists", TEST_NETWORK).returncode:
            raise AssertionError(f"podman network create failed: {created.stderr}")
    return TEST_NETWORK


def run_in(image: str, *command: str, entrypoint: str | None = None,
           extra: tuple[str, ...] = (), timeout: float = 600.0,
           ) -> subprocess.CompletedProcess[str]:
    """`podman run --rm` without network; `entrypoint` replaces the image's."""
    args = ["run", "--rm", "--network=none", *extra]
    if entrypoint is not None:
        args.append(f"--entrypoint={entrypoint}")
    return podman(*args, image, *command, timeout=timeout)


def container_env(pod: dict) -> dict[str, str]:
    """The literal env of a rendered pod's one container."""
    env: dict[str, str] = {}
    for item in pod["spec"]["containers"][0].get("env", []):
        assert "value" in item, f"{item['name']}: only literal values are run here"
        env[item["name"]] = item["value"]
    return env


@dataclass
class PodmanPod:
    """A rendered pod (one container) with its ConfigMaps, run with podman.

    `claims` maps a claim name to the folder that plays its volume; emptyDirs get folders of
    their own under `workdir`.
    """

    pod: dict
    config_maps: dict[str, dict]
    claims: dict[str, Path]
    workdir: Path
    hosts: dict[str, str] = field(default_factory=dict)
    address: str | None = None  # on the test bridge; podman picks one when None

    def _container(self) -> dict:
        containers = self.pod["spec"]["containers"]
        assert len(containers) == 1, "one container per amxtune pod"
        unsupported = {"args", "workingDir", "envFrom"} & set(containers[0])
        assert not unsupported, f"not run here: {unsupported}"
        return containers[0]

    def environment(self) -> dict[str, str]:
        return container_env(self.pod)

    @property
    def container_name(self) -> str:
        return f"amxtune-test-{self.pod['metadata']['name']}-{os.getpid()}"

    def command(self) -> list[str]:
        env = self.environment()
        return [expand_env_refs(part, env) for part in self._container()["command"]]

    def _volume_args(self, fs_group: int | None) -> list[str]:
        volumes = {v["name"]: v for v in self.pod["spec"].get("volumes", [])}
        args: list[str] = []
        for mount in self._container().get("volumeMounts", []):
            volume = volumes[mount["name"]]
            read_only = bool(mount.get("readOnly"))
            if "configMap" in volume:
                folder = self.workdir / "configmaps" / mount["name"]
                folder.mkdir(parents=True, exist_ok=True)
                config_map = self.config_maps[volume["configMap"]["name"]]
                for key, text in config_map.get("data", {}).items():
                    (folder / key).write_text(text)
                for key, encoded in config_map.get("binaryData", {}).items():
                    (folder / key).write_bytes(base64.b64decode(encoded))
                os.chmod(folder, 0o755)
                read_only = True  # the kubelet mounts ConfigMaps read-only whatever is asked
            elif "persistentVolumeClaim" in volume:
                folder = self.claims[volume["persistentVolumeClaim"]["claimName"]]
                read_only = read_only or bool(volume["persistentVolumeClaim"].get("readOnly"))
            elif "emptyDir" in volume:
                if mount["mountPath"] == "/dev/shm":
                    limit = volume["emptyDir"].get("sizeLimit")
                    size = int(parse_quantity(limit)) if limit else 64 * 2**20
                    args.append(f"--shm-size={size}b")
                    continue
                folder = self.workdir / "emptydirs" / mount["name"]
                folder.mkdir(parents=True, exist_ok=True)
            else:
                raise AssertionError(f"volume kind not run here: {volume}")
            if fs_group is not None and not read_only:
                _give_to_group(folder, fs_group)  # what the kubelet does for fsGroup
            args.append(f"--volume={folder}:{mount['mountPath']}:{'ro' if read_only else 'rw'}")
        return args

    def podman_args(self) -> list[str]:
        spec = self.pod["spec"]
        security = spec.get("securityContext", {})
        container = self._container()
        container_security = container.get("securityContext", {})
        args = [
            "run", "--rm", f"--network={pod_network()}",
            f"--hostname={spec.get('hostname', self.pod['metadata']['name'])}",
            f"--name={self.container_name}",
        ]
        if container_security.get("readOnlyRootFilesystem"):
            # podman would add writable tmpfs at /tmp, /var/tmp and /run; a kubelet does not
            args += ["--read-only", "--read-only-tmpfs=false"]
        uid = security.get("runAsUser")
        if uid is not None:
            args.append(f"--user={uid}:{security.get('runAsGroup', uid)}")
        fs_group = security.get("fsGroup")
        if fs_group is not None:
            args.append(f"--group-add={fs_group}")
        for cap in container_security.get("capabilities", {}).get("drop", []):
            args.append(f"--cap-drop={cap}")
        if container_security.get("allowPrivilegeEscalation") is False:
            args.append("--security-opt=no-new-privileges")
        limits = container.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            cpus = min(float(parse_quantity(limits["cpu"])), os.cpu_count() or 1)
            args.append(f"--cpus={cpus}")
        if "memory" in limits:  # /dev/shm counts too, as in the pod's memory cgroup
            args.append(f"--memory={int(parse_quantity(limits['memory']))}b")
        args.append("--pids-limit=-1")  # a kubelet sets none by default
        if self.address:
            args.append(f"--ip={self.address}")
        for name, address in self.hosts.items():
            args.append(f"--add-host={name}:{address}")
        for name, value in self.environment().items():
            args.append(f"--env={name}={value}")
        args += self._volume_args(fs_group)
        return args

    def run(self, timeout: float = 1200.0) -> subprocess.CompletedProcess[str]:
        command = self.command()
        try:
            return podman(*self.podman_args(), f"--entrypoint={command[0]}",
                          self._container()["image"], *command[1:], timeout=timeout)
        finally:  # a timed-out client leaves its container running under conmon
            podman("rm", "--force", "--ignore", self.container_name, timeout=120)


def _give_to_group(folder: Path, gid: int) -> None:
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, -1, gid)
        mode = path.stat().st_mode
        os.chmod(path, mode | 0o060 | (0o2010 if path.is_dir() else 0))

