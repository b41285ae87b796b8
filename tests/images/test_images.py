"""The operator and trainer images as images: who they run as, what they answer, whether they
hold this checkout's code, what the operator's rendered pods need of them (preloaded libraries,
launchers), and rendered worker pods and the export pod run in the trainer image with a
read-only root file system and only the pods' volumes writable."""

from __future__ import annotations

import concurrent.futures
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amxtune.controller.state import last_json_line
from amxtune.render import JobIdentity, render_finetunejob
from amxtune.render.inferencejob import inference_job_for, render_inferencejob
from amxtune.settings import Settings
from amxtune_api.events import ExportCompleted, TrainingCompleted, TrainingStarted
from amxtune_api.finetunejob import FineTuneJobSpec
from amxtune_api.inferencejob import InferenceJobSpec
from tests.support.images import (
    BUILD_SCRIPT,
    OPERATOR_IMAGE,
    TEST_SUBNET,
    TRAINER_IMAGE,
    PodmanPod,
    container_env,
    run_in,
)

pytestmark = pytest.mark.images
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings(trainer_image=TRAINER_IMAGE)
LD_SO_WARNING = "ld.so"  # glibc: "ERROR: ld.so: object '...' from LD_PRELOAD cannot be preloaded"


def chart_operator_user() -> int:
    deployment = (ROOT / "charts" / "amxtune" / "templates" / "deployment.yaml").read_text()
    line = next(line for line in deployment.splitlines() if "runAsUser:" in line)
    return int(line.split(":")[1])


def test_each_image_runs_as_the_user_its_pods_ask_for(images):
    operator = run_in(OPERATOR_IMAGE, "-c", "import os; print(os.getuid(), os.getgid())",
                      entrypoint="python")
    assert operator.returncode == 0, operator.stderr
    uid = chart_operator_user()
    assert operator.stdout.split() == [str(uid), str(uid)], "the chart's runAsUser"

    trainer = run_in(TRAINER_IMAGE, "id", "-u")
    assert trainer.returncode == 0, trainer.stderr
    assert int(trainer.stdout) == SETTINGS.run_as_user != 0, "the worker pods' runAsUser"


def test_entry_points_answer(images):
    operator = run_in(OPERATOR_IMAGE, "--help")
    assert operator.returncode == 0, operator.stderr
    assert "operator" in operator.stdout and "run" in operator.stdout
    # the operator's own imports (kopf, kubernetes), not only the CLI's
    wiring = run_in(OPERATOR_IMAGE, "-c", "import amxtune.controller.main", entrypoint="python")
    assert wiring.returncode == 0, wiring.stderr

    trainer = run_in(TRAINER_IMAGE, "amxtune-train", "--help")
    assert trainer.returncode == 0, trainer.stderr
    for command in ("textual-inversion", "lora", "launch", "export-openvino", "inference"):
        assert command in trainer.stdout


SOURCE_DIGEST = """
import hashlib, pathlib, sys
digest = hashlib.sha256()
for root in sys.argv[1:]:
    base = pathlib.Path(root)
    for path in sorted(base.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(base.parent)).encode() + b"\\0" + path.read_bytes())
print(digest.hexdigest())
"""


def source_digest(*packages: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", SOURCE_DIGEST, *map(str, packages)],
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip()


@pytest.mark.parametrize(
    ("image", "packages"),
    [(OPERATOR_IMAGE, ("amxtune", "amxtune_api")),
     (TRAINER_IMAGE, ("amxtune_trainer", "amxtune_api"))],
    ids=["operator", "trainer"],
)
def test_each_image_holds_this_checkouts_code(images, image, packages):
    """A stale build (a layer cache that missed a change) would test old code."""
    local = [Path(importlib.import_module(name).__file__).parent for name in packages]
    site = "/opt/amxtune/venv/lib/python3.11/site-packages"
    inside = run_in(image, "-c", SOURCE_DIGEST, *(f"{site}/{name}" for name in packages),
                    entrypoint="python")
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.strip() == source_digest(*local), f"{image} is older than the checkout"


def rendered_preloads() -> list[str]:
    """Every library a worker pod may be told to preload, from the rendered pods."""
    paths: list[str] = []
    for allocator in ("tcmalloc", "jemalloc"):
        spec = job_spec(runtime={"memoryAllocator": allocator, "openMP": "iomp5"})
        pod = render_finetunejob(JobIdentity("robot"), spec, SETTINGS).pods[0]
        paths += [p for p in container_env(pod)["LD_PRELOAD"].split(":") if p not in paths]
    return paths


def test_every_rendered_preload_exists_in_the_trainer_image_and_preloads_cleanly(images):
    preloads = rendered_preloads()
    assert len(preloads) == 3, preloads  # tcmalloc, jemalloc, libiomp5
    for path in preloads:
        found = run_in(TRAINER_IMAGE, "test", "-f", path)
        assert found.returncode == 0, f"{path} (rendered into LD_PRELOAD) is not in the image"
        loaded = run_in(TRAINER_IMAGE, "python", "-c", "import torch; torch.ones(2).sum()",
                        extra=(f"--env=LD_PRELOAD={path}",))
        assert loaded.returncode == 0, loaded.stderr
        assert LD_SO_WARNING not in loaded.stderr, f"{path}: {loaded.stderr}"

    # the check above can fail: a path that is not there warns on stderr
    missing = run_in(TRAINER_IMAGE, "true", extra=("--env=LD_PRELOAD=/opt/amxtune/venv/lib/no.so",))
    assert LD_SO_WARNING in missing.stderr and "/opt/amxtune/venv/lib/no.so" in missing.stderr


def test_launchers_are_on_path(images):
    found = run_in(TRAINER_IMAGE, "sh", "-c", "command -v mpirun && command -v torchrun")
    assert found.returncode == 0, f"mpirun or torchrun missing:\n{found.stdout}{found.stderr}"
    mpirun = run_in(TRAINER_IMAGE, "mpirun", "-V")
    assert mpirun.returncode == 0, mpirun.stderr
    assert "Intel(R) MPI Library" in mpirun.stdout
    torchrun = run_in(TRAINER_IMAGE, "torchrun", "--help")
    assert torchrun.returncode == 0, torchrun.stderr


def manifest() -> dict:
    """The demo's job on the random-weight tiny model: two ranks in one pod, a few steps."""
    doc = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    doc["spec"]["model"] = {"name": "tiny"}
    doc["spec"]["textualInversion"] = {"placeholderToken": "<robot-toy>", "initializerToken": "toy"}
    doc["spec"]["training"].update(maxTrainSteps=4, checkpointingSteps=2, loggingSteps=1,
                                   conceptSimilarityImages=0, evalSamples=2)
    doc["spec"]["workers"].update(ranksPerNode=2, resources={"cpu": "2", "memory": "4Gi"})
    doc["spec"]["export"].update(openvino={"height": 64, "width": 64, "weightFormat": "fp32"},
                                 prompts=["a photo of a <robot-toy> on the beach"],
                                 numInferenceSteps=2)
    doc["spec"]["export"].pop("baseline", None)
    return doc


def job_spec(**changes) -> FineTuneJobSpec:
    spec = manifest()["spec"]
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value}
    return FineTuneJobSpec.model_validate(spec)


@pytest.fixture
def volumes(tmp_path) -> tuple[Path, Path]:
    """The folders that play the concepts claim (the demo's images) and the output claim."""
    data, output = tmp_path / "concepts", tmp_path / "output"
    shutil.copytree(ROOT / "examples" / "concepts" / "robot", data / "robot")
    output.mkdir()
    return data, output


def worker_pods(objects, volumes: tuple[Path, Path], workdir: Path,
                worker0_address: str | None = None) -> list[PodmanPod]:
    """The rendered workers; their rendezvous name resolves to worker 0's address on the test
    bridge, or to loopback when there is one worker."""
    data, output = volumes
    master = container_env(objects.pods[0])["MASTER_ADDR"]
    return [
        PodmanPod(
            pod,
            config_maps={objects.config_map["metadata"]["name"]: objects.config_map},
            claims={"concepts": data, objects.output_claim_name: output},
            workdir=workdir / f"worker-{rank}",
            hosts={master: worker0_address or "127.0.0.1"},
            address=worker0_address if rank == 0 else None,
        )
        for rank, pod in enumerate(objects.pods)
    ]


def test_a_rendered_worker_pod_trains_and_the_export_pod_renders_in_the_trainer_image(
        images, volumes, tmp_path):
    job = JobIdentity("robot")
    spec = job_spec()
    objects = render_finetunejob(job, spec, SETTINGS)
    _, output = volumes
    [worker] = worker_pods(objects, volumes, tmp_path)
    assert container_env(worker.pod).get("LD_PRELOAD"), "the default runtime preloads"
    assert worker.pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    trained = worker.run()
    log = trained.stdout + trained.stderr
    assert trained.returncode == 0, log[-6000:]
    assert LD_SO_WARNING not in trained.stderr, trained.stderr[-3000:]
    assert "not a writable directory" not in trained.stderr, trained.stderr[-3000:]
    # what the operator reads from the pod's log
    completed = TrainingCompleted.read(last_json_line(trained.stdout, "completed"))
    assert completed is not None and completed.steps == 4, log[-4000:]
    started = TrainingStarted.read(last_json_line(trained.stdout, "started"))
    assert started is not None and started.world_size == 2, "both ranks of the pod took part"
    assert completed.learned_embeds is not None
    learned = Path(completed.learned_embeds.replace("/output", str(output), 1))
    assert learned.is_file() and learned.stat().st_uid == SETTINGS.run_as_user

    body = inference_job_for(job, spec, objects.output_claim_name)
    inference = render_inferencejob(
        JobIdentity(body["metadata"]["name"], kind="InferenceJob"),
        InferenceJobSpec.model_validate(body["spec"]), SETTINGS,
    )
    exported = PodmanPod(
        inference.pod,
        config_maps={inference.config_map["metadata"]["name"]: inference.config_map},
        claims={objects.output_claim_name: output},
        workdir=tmp_path / "export",
    ).run()
    log = exported.stdout + exported.stderr
    assert exported.returncode == 0, log[-6000:]
    done = ExportCompleted.read(last_json_line(exported.stdout, "completed"))
    assert done is not None and done.images == 1, log[-4000:]
    assert done.export_cache == "stored"
    for path in done.image_paths:
        assert Path(path.replace("/output", str(output), 1)).is_file(), path


def test_two_rendered_worker_pods_rendezvous_over_their_network(images, volumes, tmp_path):
    """Two pods × one rank: worker 1 reaches worker 0 at the address its rendered MASTER_ADDR
    resolves to, over eth0 (GLOO_SOCKET_IFNAME), from a container of its own."""
    spec = job_spec(workers={"nodes": 2, "ranksPerNode": 1,
                             "resources": {"cpu": "1", "memory": "3Gi"}})
    objects = render_finetunejob(JobIdentity("robot"), spec, SETTINGS)
    pods = worker_pods(objects, volumes, tmp_path, worker0_address=f"{TEST_SUBNET}.10")
    with concurrent.futures.ThreadPoolExecutor(len(pods)) as pool:
        results = list(pool.map(lambda p: p.run(timeout=900), pods))
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"worker {rank}:\n{(result.stdout + result.stderr)[-5000:]}"
    started = TrainingStarted.read(last_json_line(results[0].stdout, "started"))
    assert started is not None and started.world_size == 2
    completed = TrainingCompleted.read(last_json_line(results[0].stdout, "completed"))
    assert completed is not None and completed.steps == 4


def test_a_machine_without_podman_is_told_what_to_install(tmp_path):
    """The build's first check, on a PATH that has none of podman, debootstrap and runc."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))  # all it runs before the check
    proc = subprocess.run(
        [shutil.which("bash"), str(BUILD_SCRIPT)], capture_output=True, text=True,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, timeout=60,
    )
    assert proc.returncode != 0
    assert "missing podman debootstrap runc" in proc.stderr
    assert "apt-get install podman debootstrap runc" in proc.stderr
