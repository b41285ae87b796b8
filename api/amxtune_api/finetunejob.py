"""FineTuneJob (amxtune.io/v1alpha1): spec and status.

The CRD schema (crds/finetunejobs.amxtune.io.yaml) is generated from these models by
amxtune.crd; defaults live in the schema so the apiserver applies them and the operator never
writes the spec. Rules the apiserver can check (CEL) are attached with `cel(...)`.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import Field, PlainValidator, StringConstraints, WithJsonSchema, model_validator

from amxtune_api.base import ApiModel, cel
from amxtune_api.export import ExportSpec
from amxtune_api.kube import (
    DNS_SUBDOMAIN_PATTERN,
    LABEL_KEY_PATTERN,
    EnvVar,
    LabelKey,
    LabelValue,
    Name,
    PvcPath,
    Quantity,
    Resources,
    SecretKeyRef,
    Toleration,
    check_sub_path,
    sub_path_rule,
)
from amxtune_api.training import (
    LORA_FILE,  # noqa: F401 (re-exported)
    LoraOptions,
    TextualInversionOptions,
    TrainerRuntimeOptions,
    TrainingOptions,
)

GROUP = "amxtune.io"
VERSION = "v1alpha1"
AMX_LABELS = [
    "feature.node.kubernetes.io/cpu-cpuid.AMXBF16",
    "feature.node.kubernetes.io/cpu-cpuid.AMXTILE",
]


class Method(StrEnum):
    textualInversion = "textualInversion"
    lora = "lora"


# spec.method -> its options section (camelCase, as in the manifest)
METHOD_SECTION = {Method.textualInversion: "textualInversion", Method.lora: "lora"}


class ModelSource(ApiModel):
    """The base model: a hub id (or built-in name), or a diffusers folder on a volume."""

    model_config = cel("has(self.name) != has(self.pvc)", "set exactly one of name and pvc")

    name: str | None = Field(
        default=None, min_length=1,
        description="Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a built-in "
        "model ('toyworld', 'tiny', 'sd15-arch').",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag, commit).")
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret holding a Hugging Face token for gated models."
    )
    pvc: PvcPath | None = Field(
        default=None, description="A diffusers pipeline folder on a volume, mounted read-only."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.name is None) == (self.pvc is None):
            raise ValueError("set exactly one of name and pvc")
        return self


class ConfigMapImages(ApiModel):
    name: Name = Field(description="ConfigMap whose binaryData holds the concept images.")


class DataSource(ApiModel):
    """The concept images; only worker 0 mounts them (it broadcasts the latents)."""

    model_config = cel(
        "has(self.pvc) != has(self.configMap)", "set exactly one of pvc and configMap"
    )

    pvc: PvcPath | None = None
    config_map: ConfigMapImages | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.pvc is None) == (self.config_map is None):
            raise ValueError("set exactly one of pvc and configMap")
        return self


# A worker pod's memory when spec.workers.resources.memory is not set: one copy of the frozen
# networks, shared by the pod's ranks, plus each rank's own (docs/performance.md, "One copy of
# the frozen weights per node"; Stable Diffusion 1.5 at 512 px).
MEMORY_PER_POD_GI = 8
MEMORY_PER_RANK_GI = 4
# ranksPerNode: auto without a memory limit stops here: the most ranks per pod whose memory was
# measured (docs/performance.md, "Rank layout").
AUTO_RANKS_WITHOUT_MEMORY = 4
AUTO = "auto"
MAX_RANKS_PER_NODE = 64


def _ranks_per_node(value: object) -> int | str:
    # One message for both forms (a union would report each branch's failure). `type(...) is
    # int`: a bool is an int too, and strict validation refuses "4", as the apiserver does.
    if value == AUTO or (type(value) is int and 1 <= value <= MAX_RANKS_PER_NODE):
        return value  # type: ignore[return-value]
    raise ValueError(f"expected an integer from 1 to {MAX_RANKS_PER_NODE} or '{AUTO}', "
                     f"got {value!r}")


RanksPerNode = Annotated[
    int | str,
    PlainValidator(_ranks_per_node),
    WithJsonSchema({"anyOf": [
        {"type": "integer", "minimum": 1, "maximum": MAX_RANKS_PER_NODE},
        {"type": "string", "pattern": f"^{AUTO}$"},
    ]}),
]


class WorkerResources(Resources):
    """Requests = limits for every worker (Guaranteed QoS, so CPU pinning is honoured)."""

    memory: Quantity | None = Field(
        default=None,
        description=f"Memory per worker pod. Default: {MEMORY_PER_POD_GI}Gi + "
        f"{MEMORY_PER_RANK_GI}Gi per rank (ranksPerNode), from Stable Diffusion 1.5 at 512 px: "
        "one copy of the frozen weights shared by the pod's ranks, and each rank's "
        "activations and packed weights.",
    )


class Workers(ApiModel):
    nodes: int = Field(default=1, ge=1, le=256, description="Worker pods, one per AMX node.")
    ranks_per_node: RanksPerNode = Field(
        default=1,
        description="Training processes (ranks) per worker pod, or 'auto': one per core left "
        "after the ranks' oneCCL workers, as many as the pod's memory holds at "
        f"{MEMORY_PER_RANK_GI}Gi per rank beyond the first {MEMORY_PER_POD_GI}Gi, at most "
        f"{AUTO_RANKS_WITHOUT_MEMORY} when resources.memory is not set. The choice and the "
        "global batch it makes are in status.layout.",
    )
    resources: WorkerResources = Field(default_factory=WorkerResources)
    require_amx: bool = Field(
        default=True, description="Only schedule on nodes labelled with every amxNodeLabels key."
    )
    amx_node_labels: list[LabelKey] | None = Field(
        default=None, min_length=1,
        description="Node labels (value 'true') that mark AMX nodes; the operator's configured "
        "keys when empty (Node Feature Discovery's AMXBF16 and AMXTILE by default).",
    )
    # Keys are checked here and by the apiserver when the pods are created (ObjectRefused): a
    # CEL rule over map keys costs more than the apiserver allows a CRD.
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=64)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    shm_size: Quantity = Field(default="2Gi", description="Size of the memory-backed /dev/shm.")
    scheduling_timeout_seconds: int | None = Field(
        default=None, ge=1, description="Fail when workers stay unschedulable this long."
    )

    def pod_resources(self, ranks_per_node: int) -> Resources:
        """cpu and memory of each worker pod of `ranks_per_node` ranks (resolved, 'auto' being
        decided by the operator), the memory default filled in."""
        memory = self.resources.memory
        if memory is None:
            memory = f"{MEMORY_PER_POD_GI + MEMORY_PER_RANK_GI * ranks_per_node}Gi"
        return Resources(cpu=self.resources.cpu, memory=memory)

    @model_validator(mode="after")
    def _selector_keys_are_label_keys(self) -> Workers:
        for key in self.node_selector:
            if not re.match(LABEL_KEY_PATTERN, key):
                raise ValueError(f"nodeSelector key {key!r} is not a label key ([prefix/]name of "
                                 "letters, digits, '-', '_', '.')")
        return self


class CclTransport(StrEnum):
    ofi = "ofi"
    mpi = "mpi"


class Ccl(ApiModel):
    transport: CclTransport = Field(default=CclTransport.ofi, description="CCL_ATL_TRANSPORT.")
    worker_count: int = Field(
        default=1, ge=0, le=16,
        description="CCL_WORKER_COUNT: cores per rank kept for oneCCL (0 with the gloo backend).",
    )
    fi_provider: str = Field(default="tcp", description="FI_PROVIDER for the ofi transport.")


class MemoryAllocator(StrEnum):
    tcmalloc = "tcmalloc"
    jemalloc = "jemalloc"
    default = "default"


class OpenMP(StrEnum):
    iomp5 = "iomp5"
    gomp = "gomp"


class Runtime(TrainerRuntimeOptions):
    image: str | None = Field(
        default=None, min_length=1,
        description=(
            "Trainer image; the operator's configured default when empty. Its containers run "
            "as uid 1000 with a read-only root file system: they may write only to /tmp, "
            "/var/cache/huggingface (HF_HOME), /dev/shm and /output."
        ),
    )
    image_pull_policy: str = Field(default="IfNotPresent", pattern="^(Always|IfNotPresent|Never)$")
    ccl: Ccl = Field(default_factory=Ccl)
    network_interface: str = Field(
        default="eth0", min_length=1, max_length=15, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.:@]*$",
        description="I_MPI_HYDRA_IFACE / the ranks' interface (a Linux interface name).",
    )
    memory_allocator: MemoryAllocator = Field(default=MemoryAllocator.tcmalloc)
    open_mp: OpenMP = Field(default=OpenMP.iomp5, alias="openMP")
    master_port: int = Field(default=29500, ge=1024, le=65535)
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables.")

    def to_trainer_options(self) -> TrainerRuntimeOptions:
        """The part of the runtime the trainer itself reads."""
        fields = set(TrainerRuntimeOptions.model_fields)
        return TrainerRuntimeOptions.model_validate(self.model_dump(include=fields))


class PvcCreate(ApiModel):
    size: Quantity = Field(default="20Gi")
    # a DNS subdomain, or "" for no dynamic provisioning, as in Kubernetes
    storage_class_name: Annotated[str, StringConstraints(
        max_length=253, pattern=DNS_SUBDOMAIN_PATTERN.replace("^", "^(", 1)[:-1] + ")?$",
    )] | None = None
    access_mode: str = Field(
        default="ReadWriteOnce", pattern="^(ReadWriteOnce|ReadWriteMany|ReadWriteOncePod)$"
    )


class OutputVolume(ApiModel):
    model_config = cel(
        "has(self.create) || has(self.claimName)",
        "name an existing claimName, or ask for one to be created with create",
    )

    claim_name: Name | None = Field(
        default=None,
        description="Claim to write to; with create, the name of the claim to create "
        "(default JOB-output). It is kept when the job is deleted.",
    )
    create: PvcCreate | None = None

    @model_validator(mode="after")
    def _claim_or_create(self) -> OutputVolume:
        if self.create is None and self.claim_name is None:
            raise ValueError("name an existing claimName, or ask for one to be created with create")
        return self


class Output(ApiModel):
    model_config = cel(sub_path_rule("path"), "path must be a relative path inside the volume, "
                       "without '..'")

    pvc: OutputVolume = Field(default_factory=lambda: OutputVolume(create=PvcCreate()))
    path: str | None = Field(
        default=None, max_length=1024,
        description="Folder inside the volume; the job's name by default.",
    )

    @model_validator(mode="after")
    def _inside(self) -> Output:
        check_sub_path(self.path)
        return self


class FineTuneJobSpec(ApiModel):
    model_config = cel(
        "(self.method == 'textualInversion') == has(self.textualInversion) && "
        "(self.method == 'lora') == has(self.lora)",
        "give the options section of spec.method and no other: textualInversion for method "
        "textualInversion (the default), lora for method lora",
    )

    method: Method = Field(
        default=Method.textualInversion,
        description="textualInversion learns a new token's embedding; lora trains LoRA "
        "adapters. The section of the same name holds the method's options.",
    )
    model: ModelSource
    data: DataSource
    textual_inversion: TextualInversionOptions | None = None
    lora: LoraOptions | None = None
    training: TrainingOptions = Field(default_factory=TrainingOptions)
    workers: Workers = Field(default_factory=Workers)
    runtime: Runtime = Field(default_factory=Runtime)
    output: Output = Field(default_factory=Output)
    export: ExportSpec | None = Field(
        default=None,
        description="After training, export to OpenVINO and render these prompts in an "
        "InferenceJob (NAME-export) on the same volume.",
    )
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Worker restarts before the job fails."
    )
    suspend: bool = Field(
        default=False, description="Delete the workers and keep everything else; false resumes."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job when it runs longer than this."
    )

    @model_validator(mode="after")
    def _method_options(self) -> FineTuneJobSpec:
        given = {"textualInversion": self.textual_inversion is not None,
                 "lora": self.lora is not None}
        wanted = METHOD_SECTION[self.method]
        if not given[wanted]:
            raise ValueError(f"{wanted} is required when method is {self.method}")
        others = [name for name, present in given.items() if present and name != wanted]
        if others:
            raise ValueError(f"{others[0]} is the section of another method; with method "
                             f"{self.method} give only {wanted}")
        return self



class Phase(StrEnum):
    Pending = "Pending"
    Running = "Running"
    Exporting = "Exporting"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Suspended = "Suspended"


class Condition(ApiModel):
    """metav1.Condition."""

    type: str
    status: str = Field(pattern="^(True|False|Unknown)$")
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class LayoutStatus(ApiModel):
    """How the ranks are laid out, as rendered (ranksPerNode: auto resolved)."""

    ranks_per_node: int
    threads_per_rank: int = Field(description="OMP_NUM_THREADS of each rank.")
    ccl_workers_per_rank: int
    world_size: int = Field(description="Ranks in all: nodes x ranksPerNode.")
    global_batch_size: int = Field(
        description="Images per optimizer step: worldSize x trainBatchSize x "
        "gradientAccumulationSteps."
    )
    reason: str = Field(description="Why this many ranks per pod.")


class WorkersStatus(ApiModel):
    ready: int = 0
    total: int = 0
    display: str = Field(default="0/0", description="ready/total, for kubectl get.")


class Progress(ApiModel):
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None
    display: str = Field(default="", description="step/maxSteps, for kubectl get.")
    updated: str | None = None


class Outputs(ApiModel):
    claim_name: str | None = None
    path: str | None = None
    embeddings: str | None = Field(default=None, description="Learned embedding file "
                                   "(textual inversion), relative to the volume.")
    lora: str | None = Field(default=None, description="LoRA weights file (diffusers format; "
                             "the kohya-named copy lies beside it), relative to the volume.")
    pipeline: str | None = None
    inference_job: str | None = None
    # Set from the InferenceJob's status; without them in the schema the apiserver pruned
    # what the operator wrote.
    openvino: str | None = Field(default=None, description="The exported OpenVINO pipeline.")
    samples: str | None = Field(default=None, description="The rendered samples' grid.")


class TrainerReport(ApiModel):
    """What rank 0 of the current attempt said when it started: its CPU and the paths taken."""

    attempt: int = 0
    node: str | None = None
    cpu: str | None = Field(default=None, description="Rank 0's CPU and instruction sets.")
    cpu_class: str | None = Field(default=None, description="AMX, AVX512-BF16, AVX-512, AVX2.")
    mixed_precision: str | None = Field(default=None, description="bf16 or fp32, as used.")
    precision_reason: str | None = None
    notices: list[str] = Field(
        default_factory=list, description="Fast paths turned off, and why (one line each)."
    )


class FineTuneJobStatus(ApiModel):
    observed_generation: int | None = None
    phase: Phase | None = None
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    workers: WorkersStatus | None = None
    layout: LayoutStatus | None = None
    progress: Progress | None = None
    trainer: TrainerReport | None = None
    restarts: int = Field(default=0, description="Restarts counted against backoffLimit.")
    attempt: int = Field(
        default=0,
        description="The workers' current attempt (label amxtune.io/attempt): restarts plus "
        "moves away from nodes that lacked AMX.",
    )
    excluded_nodes: list[str] = Field(
        default_factory=list,
        description="Nodes labelled AMX whose CPU had none (NodeLacksAmx); not used again.",
    )
    disruptions: int = Field(
        default=0,
        description="Times a worker was lost (its pod deleted, evicted or preempted) and all "
        "workers restarted from the latest checkpoint; not counted against backoffLimit.",
    )
    pods_created_for_attempt: int | None = Field(
        default=None,
        description="The attempt whose worker pods were all created: a pod of it that goes "
        "missing after that was lost.",
    )
    start_time: str | None = None
    completion_time: str | None = None
    outputs: Outputs | None = None
