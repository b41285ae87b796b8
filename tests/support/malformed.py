"""Malformed FineTuneJob manifests, each with what is wrong and the field the refusal must name.

Every entry is refused twice with its field path: offline by `amxtune run` / `amxtune render`
(tests/unit/test_malformed_offline.py) and at apply by the real apiserver with the CRDs installed
(tests/cluster/test_malformed_at_apply.py). A change is merged into tests.support.jobs.job(): a dict
merges key by key, anything else replaces.
"""

from __future__ import annotations

import copy

from tests.support.jobs import job

# Refused offline only: a CEL rule over map keys costs more than the apiserver allows a CRD, so
# the apiserver refuses these when the operator creates the pod, and the job fails at once
# with its message (ObjectRefused; tests/cluster/test_operator.py).
OFFLINE_ONLY: list[tuple[str, str, dict, str]] = [
    ("selector-key-space", "a node-selector key with a space", {"spec": {"workers": {
        "nodeSelector": {"pool name": "amx"}}}}, "nodeSelector"),
]

# (id, what is wrong, change merged into the job (None deletes), the field the message names)
CASES: list[tuple[str, str, dict, str]] = [
    # --- types: the apiserver does not coerce, so neither may we
    ("nodes-string", "an integer written as a string", {"spec": {"workers": {"nodes": "4"}}},
     "workers.nodes"),
    ("suspend-yes", "a boolean written as a word", {"spec": {"suspend": "yes"}}, "suspend"),
    ("lr-string", "a number written as a string", {"spec": {"training": {"learningRate": "0.1"}}},
     "training.learningRate"),
    # --- numbers out of range
    ("nodes-zero", "no workers", {"spec": {"workers": {"nodes": 0}}}, "workers.nodes"),
    ("resolution-500", "not a multiple of 8", {"spec": {"training": {"resolution": 500}}},
     "training.resolution"),
    ("ranks-zero", "no ranks", {"spec": {"workers": {"ranksPerNode": 0}}}, "workers.ranksPerNode"),
    ("ranks-too-many", "more ranks than allowed", {"spec": {"workers": {"ranksPerNode": 65}}},
     "workers.ranksPerNode"),
    ("ranks-word", "a word other than auto", {"spec": {"workers": {"ranksPerNode": "max"}}},
     "workers.ranksPerNode"),
    ("ranks-string", "a count written as a string (int-or-string: only 'auto' is a string)",
     {"spec": {"workers": {"ranksPerNode": "4"}}}, "workers.ranksPerNode"),
    ("steps-zero", "nothing to train", {"spec": {"training": {"maxTrainSteps": 0}}},
     "training.maxTrainSteps"),
    ("lr-negative", "a negative learning rate", {"spec": {"training": {"learningRate": -1}}},
     "training.learningRate"),
    ("port-low", "a privileged rendezvous port", {"spec": {"runtime": {"masterPort": 80}}},
     "runtime.masterPort"),
    # --- quantities, as Kubernetes writes them, greater than zero
    ("memory-negative", "a negative memory", {"spec": {"workers": {"resources": {
        "memory": "-1Gi"}}}}, "workers.resources.memory"),
    ("memory-two-dots", "not a quantity", {"spec": {"workers": {"resources": {
        "memory": "1.2.3Gi"}}}}, "workers.resources.memory"),
    ("cpu-zero", "no CPU", {"spec": {"workers": {"resources": {"cpu": "0"}}}},
     "workers.resources.cpu"),
    ("cpu-zero-int", "no CPU, as an integer", {"spec": {"workers": {"resources": {"cpu": 0}}}},
     "workers.resources.cpu"),
    ("cpu-word", "a word for a quantity", {"spec": {"workers": {"resources": {"cpu": "lots"}}}},
     "workers.resources.cpu"),
    ("storage-negative", "a negative volume size", {"spec": {"output": {"pvc": {"create": {
        "size": "-5Gi"}}}}}, "output.pvc.create.size"),
    ("shm-unit", "an unknown unit", {"spec": {"workers": {"shmSize": "2GB"}}},
     "workers.shmSize"),
    # --- names and labels
    ("claim-double-dot", "a claim name with an empty DNS label", {"spec": {"output": {"pvc": {
        "claimName": "out..put"}}}}, "output.pvc.claimName"),
    ("storage-class-space", "a storage class name with a space", {"spec": {"output": {"pvc": {
        "create": {"storageClassName": "fast ssd"}}}}}, "output.pvc.create.storageClassName"),
    ("claim-upper", "a claim name in capitals", {"spec": {"data": {"pvc": {
        "claimName": "Concepts"}}}}, "data.pvc.claimName"),
    ("selector-value-long", "a node-selector value over 63 characters", {"spec": {"workers": {
        "nodeSelector": {"pool": "a" * 64}}}}, "nodeSelector"),
    ("amx-label-space", "an AMX node label key with a space", {"spec": {"workers": {
        "amxNodeLabels": ["cpu amx"]}}}, "workers.amxNodeLabels"),
    ("toleration-exists-value", "operator Exists with a value", {"spec": {"workers": {
        "tolerations": [{"key": "amx", "operator": "Exists", "value": "true"}]}}},
     "Exists"),
    ("toleration-operator", "an unknown toleration operator", {"spec": {"workers": {
        "tolerations": [{"key": "amx", "operator": "Maybe"}]}}}, "operator"),
    ("secret-name", "a Secret name with a slash", {"spec": {"model": {
        "name": "org/model", "tokenSecretRef": {"name": "hf/token"}}}},
     "model.tokenSecretRef.name"),
    ("env-name", "an environment variable name with a space", {"spec": {"runtime": {
        "env": [{"name": "MY VAR", "value": "1"}]}}}, "runtime.env"),
    ("interface-command", "a network interface that is a shell command", {"spec": {"runtime": {
        "networkInterface": "eth0 && reboot"}}}, "runtime.networkInterface"),
    # --- paths inside volumes
    ("data-climbs", "a data sub-path climbing out of the volume", {"spec": {"data": {"pvc": {
        "path": "../../etc"}}}}, "data.pvc"),
    ("data-absolute", "an absolute data sub-path", {"spec": {"data": {"pvc": {
        "path": "/etc"}}}}, "data.pvc"),
    ("output-climbs", "an output path climbing out of the volume", {"spec": {"output": {
        "path": "runs/../../x"}}}, "output"),
    ("export-cache-climbs", "an export cache folder climbing out of its volume",
     {"spec": {"export": {"prompts": ["a <x>"], "cache": {"path": "../other-team"}}}},
     "export.cache"),
    ("export-cache-claim", "an export cache claim that is not a DNS name",
     {"spec": {"export": {"prompts": ["a <x>"], "cache": {"claimName": "Cache Claim"}}}},
     "export.cache.claimName"),
    # --- the concept
    ("token-newline", "a placeholder token with a newline and a command",
     {"spec": {"textualInversion": {"placeholderToken": "<a>\n$(reboot)"}}},
     "textualInversion.placeholderToken"),
    ("token-equals-initializer", "a placeholder token equal to its initializer",
     {"spec": {"textualInversion": {"placeholderToken": "toy", "initializerToken": "toy"}}},
     "textualInversion"),
    ("token-missing", "no placeholder token", {"spec": {"textualInversion": {
        "placeholderToken": None}}}, "placeholderToken"),
    # --- the method and its section
    ("lora-without-section", "method lora without its lora section",
     {"spec": {"method": "lora", "textualInversion": None}}, "lora"),
    ("lora-and-textual-inversion", "method lora with the other method's section too",
     {"spec": {"method": "lora", "lora": {"rank": 4}}}, "textualInversion"),
    ("lora-section-without-method", "a lora section under the default method",
     {"spec": {"lora": {"rank": 4}}}, "lora"),
    ("method-unknown", "an unknown method", {"spec": {"method": "dreambooth"}}, "method"),
    ("lora-rank-zero", "a LoRA rank of 0", {"spec": {"method": "lora", "textualInversion": None,
                                                    "lora": {"rank": 0}}}, "lora.rank"),
    ("lora-alpha-zero", "a LoRA alpha of 0", {"spec": {"method": "lora", "textualInversion": None,
                                                      "lora": {"alpha": 0}}}, "lora.alpha"),
    ("lora-target-unknown", "an unknown LoRA target module", {"spec": {
        "method": "lora", "textualInversion": None, "lora": {"targetModules": ["to_x"]}}},
     "lora.targetModules"),
    ("lora-prompt-spaces", "an instance prompt of spaces only", {"spec": {
        "method": "lora", "textualInversion": None, "lora": {"instancePrompt": "   "}}},
     "lora.instancePrompt"),
    ("prompt-spaces", "a prompt of spaces only", {"spec": {"export": {"prompts": ["   "]}}},
     "export.prompts"),
    ("prompts-batch", "prompts that do not fill the batches", {"spec": {"export": {
        "prompts": ["a", "b", "c"], "openvino": {"batchSize": 2}}}}, "batch"),
    # --- structure
    ("unknown-field", "a misspelt field", {"spec": {"training": {"learningrate": 0.1}}},
     "learningrate"),
    ("two-models", "two model sources", {"spec": {"model": {"pvc": {"claimName": "m"}}}},
     "set exactly one of name and pvc"),
    ("scheduler", "an unknown scheduler", {"spec": {"training": {"lrScheduler": "warp"}}},
     "training.lrScheduler"),
    ("no-data", "no data source", {"spec": {"data": None}}, "data"),
    # --- names of the job itself
    ("name-dot", "a job name with a dot (the workers' Service name breaks)",
     {"metadata": {"name": "robot.v2"}}, "metadata.name"),
    ("name-long", "a job name too long for its pods' host names",
     {"metadata": {"name": "a" * 49}}, "metadata.name"),
]


def merge(base: dict, change: dict) -> dict:
    for key, value in change.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def malformed(change: dict) -> dict:
    doc = job()
    doc["spec"]["export"] = {"prompts": ["a photo of a <dicoo>"]}
    return merge(doc, change)
