"""FineTuneJob -> ConfigMap, headless Service, worker Pods, output PVC. Pure: no API calls."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR

from amxtune import names
from amxtune.quantity import parse_quantity
from amxtune.render.common import (
    JobIdentity,
    RenderError,
    object_meta,
    pod,
    resource_list,
    volume_for_pvc,
)
from amxtune.settings import Settings
from amxtune_api.finetunejob import (
    AUTO,
    AUTO_RANKS_WITHOUT_MEMORY,
    MEMORY_PER_POD_GI,
    MEMORY_PER_RANK_GI,
    FineTuneJobSpec,
    LayoutStatus,
    MemoryAllocator,
    Method,
    OpenMP,
)
from amxtune_api.training import TrainerConfig

CONFIG_MOUNT = "/etc/amxtune"
CONFIG_FILE = "trainer.json"
HOSTFILE = "hostfile"
DATA_MOUNT = "/data"
OUTPUT_MOUNT = "/output"
MODEL_MOUNT = "/models"
HF_HOME = "/var/cache/huggingface"
# Built-in models are written on first use; the pod's cache emptyDir is writable even where the
# root file system is read-only (the trainer's default, ~/.cache/amxtune, is in the image).
BUILTIN_MODEL_CACHE = f"{HF_HOME}/amxtune"
LOGS_DIR = "logs"  # inside the job's output folder: failing ranks' tracebacks
HOSTNAME_LABEL = "kubernetes.io/hostname"
# spec.method -> the `amxtune-train` subcommand that trains it
TRAINER_COMMAND = {Method.textualInversion: "textual-inversion", Method.lora: "lora"}


@dataclass(frozen=True)
class RankLayout:
    """How each worker pod's CPUs are split among its ranks."""

    cores_per_worker: int
    ranks_per_node: int
    ccl_workers: int
    reason: str = "spec.workers.ranksPerNode"

    @property
    def cores_per_rank(self) -> int:
        return self.cores_per_worker // self.ranks_per_node

    @property
    def omp_threads(self) -> int:
        return self.cores_per_rank - self.ccl_workers

    def status(self, spec: FineTuneJobSpec) -> dict:
        """status.layout: the layout, and the global batch it makes."""
        world_size = spec.workers.nodes * self.ranks_per_node
        training = spec.training
        return LayoutStatus(
            ranks_per_node=self.ranks_per_node,
            threads_per_rank=self.omp_threads,
            ccl_workers_per_rank=self.ccl_workers,
            world_size=world_size,
            global_batch_size=world_size * training.train_batch_size
            * training.gradient_accumulation_steps,
            reason=self.reason,
        ).to_wire()


def auto_ranks_per_node(cores: int, ccl_workers: int, memory_bytes: int | None) -> tuple[int, str]:
    """ranksPerNode: auto, and why. One rank per core left after each rank's oneCCL workers:
    on every CPU measured, ranks of fewer threads gave more samples/s per node
    (docs/performance.md, "Rank layout"). No more than the memory holds at the default's
    per-rank cost, or AUTO_RANKS_WITHOUT_MEMORY when no memory is given."""
    by_cores = max(1, cores // (ccl_workers + 1))
    if memory_bytes is None:
        by_memory = AUTO_RANKS_WITHOUT_MEMORY
        memory_limit = "the most without spec.workers.resources.memory"
    else:
        gib = 2**30
        by_memory = max(1, (memory_bytes - MEMORY_PER_POD_GI * gib) // (MEMORY_PER_RANK_GI * gib))
        memory_limit = (f"what the pod's memory holds at {MEMORY_PER_POD_GI}Gi + "
                        f"{MEMORY_PER_RANK_GI}Gi per rank")
    if by_cores <= by_memory:
        per = "core" if not ccl_workers else f"{ccl_workers + 1} cores (compute and oneCCL)"
        return by_cores, f"auto: one rank per {per} of {cores}"
    return by_memory, f"auto: {by_memory}, {memory_limit}"


def rank_layout(spec: FineTuneJobSpec) -> RankLayout:
    cpu = parse_quantity(spec.workers.resources.cpu)
    cores = int(cpu.to_integral_value(rounding=ROUND_FLOOR))
    ccl_workers = spec.runtime.ccl.worker_count
    if spec.workers.ranks_per_node == AUTO:
        memory = spec.workers.resources.memory
        ranks, reason = auto_ranks_per_node(
            cores, ccl_workers, None if memory is None else int(parse_quantity(memory))
        )
        layout = RankLayout(cores, ranks, ccl_workers, reason)
    else:
        layout = RankLayout(cores, int(spec.workers.ranks_per_node), ccl_workers)
    if layout.omp_threads < 1:
        raise RenderError(
            "spec.workers.resources.cpu",
            f"{spec.workers.resources.cpu} CPUs cannot host {layout.ranks_per_node} ranks that "
            f"each keep {layout.ccl_workers} core(s) for oneCCL and need at least one compute "
            f"core: give at least {layout.ranks_per_node * (layout.ccl_workers + 1)} CPUs, or "
            "lower spec.workers.ranksPerNode / spec.runtime.ccl.workerCount",
        )
    return layout


def output_path(job: JobIdentity, spec: FineTuneJobSpec) -> str:
    """Folder inside the output volume that holds this job's results."""
    return (spec.output.path or job.name).strip("/")


def model_location(spec: FineTuneJobSpec) -> str:
    if spec.model.pvc is not None:
        return f"{MODEL_MOUNT}/{spec.model.pvc.path}".rstrip("/")
    assert spec.model.name is not None  # the schema requires name or pvc
    return spec.model.name


def trainer_config(job: JobIdentity, spec: FineTuneJobSpec) -> TrainerConfig:
    """The trainer's options, as every rank reads them from the ConfigMap."""
    data_dir = DATA_MOUNT
    if spec.data.pvc is not None and spec.data.pvc.path:
        data_dir = f"{DATA_MOUNT}/{spec.data.pvc.path.strip('/')}"
    # Always resume: a worker recreated after a failure continues from the last checkpoint.
    training = spec.training.model_copy(update={"resume_from_checkpoint": "latest"})
    return TrainerConfig(
        pretrained_model_name_or_path=model_location(spec),
        revision=spec.model.revision,
        train_data_dir=data_dir,
        output_dir=f"{OUTPUT_MOUNT}/{output_path(job, spec)}",
        require_amx=spec.workers.require_amx,
        textual_inversion=spec.textual_inversion,
        lora=spec.lora,
        training=training,
        runtime=spec.runtime.to_trainer_options(),
    )


def hostfile(job: JobIdentity, spec: FineTuneJobSpec, settings: Settings) -> str:
    """One line per worker, like the recipe's nodefile (for mpirun users)."""
    slots = rank_layout(spec).ranks_per_node
    return "".join(
        f"{names.worker_dns(job.name, job.namespace, rank, settings.cluster_domain)} "
        f"slots={slots}\n"
        for rank in range(spec.workers.nodes)
    )


def rank_environment(
    job: JobIdentity, spec: FineTuneJobSpec, settings: Settings, node_rank: int
) -> list[dict]:
    """Environment of worker `node_rank`: threads, allocator, oneCCL, rendezvous, token."""
    layout = rank_layout(spec)
    preload = []
    if spec.runtime.memory_allocator == MemoryAllocator.tcmalloc:
        preload.append(settings.tcmalloc_path)
    elif spec.runtime.memory_allocator == MemoryAllocator.jemalloc:
        preload.append(settings.jemalloc_path)
    if spec.runtime.open_mp == OpenMP.iomp5:
        preload.append(settings.iomp5_path)
    env = {
        "OMP_NUM_THREADS": str(layout.omp_threads),
        "KMP_AFFINITY": "granularity=fine,compact,1,0",
        "KMP_BLOCKTIME": "1",
        "CCL_ATL_TRANSPORT": spec.runtime.ccl.transport,
        "CCL_WORKER_COUNT": str(layout.ccl_workers),
        "FI_PROVIDER": spec.runtime.ccl.fi_provider,
        "I_MPI_HYDRA_IFACE": spec.runtime.network_interface,
        "GLOO_SOCKET_IFNAME": spec.runtime.network_interface,
        "MASTER_ADDR": names.worker_dns(job.name, job.namespace, 0, settings.cluster_domain),
        "MASTER_PORT": str(spec.runtime.master_port),
        "AMXTUNE_NODE_RANK": str(node_rank),
        "AMXTUNE_NUM_NODES": str(spec.workers.nodes),
        "AMXTUNE_RANKS_PER_NODE": str(layout.ranks_per_node),
        "HF_HOME": HF_HOME,
        "AMXTUNE_CACHE": BUILTIN_MODEL_CACHE,
        "MPLCONFIGDIR": "/tmp/matplotlib",  # loss.png; the home folder is read-only
        "PYTHONUNBUFFERED": "1",
    }
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    out = [{"name": k, "value": v} for k, v in env.items()]
    if spec.model.token_secret_ref is not None:
        ref = spec.model.token_secret_ref
        out.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    out.extend({"name": e.name, "value": e.value} for e in spec.runtime.env)
    return out


def worker_command(job: JobIdentity, spec: FineTuneJobSpec, node_rank: int) -> list[str]:
    """The trainer's launcher (a static torchrun that fails in one line), this node's ranks.

    Worker 0 keeps failing ranks' tracebacks on the output volume; the others print them in
    the pod's log.
    """
    log_dir = (
        [f"--log-dir={OUTPUT_MOUNT}/{output_path(job, spec)}/{LOGS_DIR}"] if node_rank == 0 else []
    )
    return [
        "amxtune-train",
        "launch",
        f"--nnodes={spec.workers.nodes}",
        f"--nproc-per-node={rank_layout(spec).ranks_per_node}",
        f"--node-rank={node_rank}",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        *log_dir,
        "--",
        TRAINER_COMMAND[spec.method],
        f"--config={CONFIG_MOUNT}/{CONFIG_FILE}",
    ]


@dataclass
class FineTuneJobObjects:
    config_map: dict
    service: dict
    pods: list[dict]
    output_claim: dict | None
    output_claim_name: str
    extra: list[dict] = field(default_factory=list)

    def all(self) -> list[dict]:
        objects = [self.config_map, self.service, *self.pods]
        return ([self.output_claim] if self.output_claim else []) + objects


def render_config_map(job: JobIdentity, spec: FineTuneJobSpec, settings: Settings) -> dict:
    config = trainer_config(job, spec).to_wire()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(job, names.config_map(job.name), "config"),
        "data": {
            CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True) + "\n",
            HOSTFILE: hostfile(job, spec, settings),
        },
    }


def render_service(job: JobIdentity, spec: FineTuneJobSpec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(job, names.service(job.name), "worker"),
        "spec": {
            "clusterIP": "None",
            # DNS names must resolve before the ranks are ready: they rendezvous to get ready.
            "publishNotReadyAddresses": True,
            "selector": {names.JOB_LABEL: job.name, "app.kubernetes.io/component": "worker"},
            "ports": [{"name": "rendezvous", "port": spec.runtime.master_port}],
        },
    }


def render_output_claim(job: JobIdentity, spec: FineTuneJobSpec) -> dict | None:
    volume = spec.output.pvc
    if volume.create is None:
        return None
    claim: dict = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        # No owner reference: results outlive the job.
        "metadata": object_meta(
            job, names.output_claim(job.name, volume.claim_name), "output", owned=False
        ),
        "spec": {
            "accessModes": [volume.create.access_mode],
            "resources": {"requests": {"storage": str(volume.create.size)}},
        },
    }
    if volume.create.storage_class_name is not None:
        claim["spec"]["storageClassName"] = volume.create.storage_class_name
    return claim


def _affinity(
    job: JobIdentity, spec: FineTuneJobSpec, settings: Settings, excluded_nodes: list[str]
) -> dict:
    affinity: dict = {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": {names.JOB_LABEL: job.name}},
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    }
    expressions = []
    if spec.workers.require_amx:
        expressions = [
            {"key": key, "operator": "In", "values": ["true"]}
            for key in spec.workers.amx_node_labels or settings.amx_node_labels
        ]
    if excluded_nodes:  # nodes whose CPU lacked AMX despite their labels (NodeLacksAmx)
        expressions.append(
            {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": sorted(excluded_nodes)}
        )
    if expressions:
        affinity["nodeAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": expressions}]
            }
        }
    return affinity


def render_worker(
    job: JobIdentity,
    spec: FineTuneJobSpec,
    settings: Settings,
    node_rank: int,
    attempt: int,
    excluded_nodes: list[str] | None = None,
) -> dict:
    claim = names.output_claim(job.name, spec.output.pvc.claim_name)
    mounts = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "hf-cache", "mountPath": HF_HOME},
    ]
    volumes: list[dict] = [
        {"name": "config", "configMap": {"name": names.config_map(job.name)}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.workers.shm_size)}},
        {"name": "hf-cache", "emptyDir": {}},
    ]
    if spec.model.pvc is not None:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
        volumes.append(volume_for_pvc("model", spec.model.pvc.claim_name, read_only=True))
    if node_rank == 0:  # only rank 0 reads the data (it broadcasts the latents) and writes results
        mounts.append({"name": "data", "mountPath": DATA_MOUNT, "readOnly": True})
        if spec.data.pvc is not None:
            volumes.append(volume_for_pvc("data", spec.data.pvc.claim_name, read_only=True))
        else:
            assert spec.data.config_map is not None
            volumes.append({"name": "data", "configMap": {"name": spec.data.config_map.name}})
        mounts.append({"name": "output", "mountPath": OUTPUT_MOUNT})
        volumes.append(volume_for_pvc("output", claim))
    meta = object_meta(job, names.worker(job.name, node_rank), "worker")
    meta["labels"][names.RANK_LABEL] = str(node_rank)
    meta["labels"][names.ATTEMPT_LABEL] = str(attempt)
    image = spec.runtime.image or settings.trainer_image
    container = {
        "name": "trainer",
        "image": image,
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "command": worker_command(job, spec, node_rank),
        "env": rank_environment(job, spec, settings, node_rank),
        "resources": resource_list(
            spec.workers.pod_resources(rank_layout(spec).ranks_per_node)
        ),
        "volumeMounts": mounts,
    }
    if node_rank == 0:
        container["ports"] = [{"name": "rendezvous", "containerPort": spec.runtime.master_port}]
    pod_spec = {
        "hostname": names.worker(job.name, node_rank),
        "subdomain": names.service(job.name),
        "affinity": _affinity(job, spec, settings, excluded_nodes or []),
        "containers": [container],
        "volumes": volumes,
    }
    return pod(meta, pod_spec, settings, spec.workers.node_selector, spec.workers.tolerations)


def render_finetunejob(
    job: JobIdentity,
    spec: FineTuneJobSpec,
    settings: Settings,
    attempt: int = 0,
    excluded_nodes: list[str] | None = None,
) -> FineTuneJobObjects:
    rank_layout(spec)  # fail early, before anything is rendered
    return FineTuneJobObjects(
        config_map=render_config_map(job, spec, settings),
        service=render_service(job, spec),
        pods=[
            render_worker(job, spec, settings, rank, attempt, excluded_nodes)
            for rank in range(spec.workers.nodes)
        ],
        output_claim=render_output_claim(job, spec),
        output_claim_name=names.output_claim(job.name, spec.output.pvc.claim_name),
    )
