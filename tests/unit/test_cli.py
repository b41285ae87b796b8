"""`amxtune render` and `amxtune crds` as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def amxtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "amxtune.cli", *args], capture_output=True, text=True, check=False
    )


def test_render_prints_every_object_of_the_example():
    result = amxtune("render", str(ROOT / "examples" / "finetunejob.yaml"), "-n", "team-a")
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    kinds = [o["kind"] for o in objects]
    assert kinds == ["PersistentVolumeClaim", "ConfigMap", "Service"] + ["Pod"] * 4
    assert {o["metadata"]["namespace"] for o in objects} == {"team-a"}


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"training": {"resolution": 500}}, "spec.training.resolution: "),
        (
            {"workers": {"nodes": 0}},
            "spec.workers.nodes: Input should be greater than or equal to 1",
        ),
        (
            {"model": {"name": "x", "pvc": {"claimName": "m"}}},
            "spec.model: set exactly one of name and pvc",
        ),
        (
            {"textualInversion": {"placeholderToken": "<a b>", "initializerToken": "toy"}},
            "spec.textualInversion.placeholderToken: ",
        ),
        ({"export": {"prompts": []}}, "spec.export.prompts: "),
    ],
)
def test_render_rejects_bad_specs_with_the_field_path(tmp_path, patch, expected):
    doc = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    doc["spec"].update(patch)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = amxtune("render", str(path))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_render_reports_a_missing_file_in_one_line(tmp_path):
    result = amxtune("render", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "cannot read" in result.stderr


def test_crds_print_both_definitions():
    result = amxtune("crds")
    assert result.returncode == 0
    names = [d["metadata"]["name"] for d in yaml.safe_load_all(result.stdout)]
    assert names == ["finetunejobs.amxtune.io", "inferencejobs.amxtune.io"]


def test_amxtune_run_keeps_the_users_preload_and_drops_the_images_paths(tmp_path, monkeypatch):
    import argparse

    from amxtune.local import LocalPlan

    own = tmp_path / "libmine.so"
    own.write_bytes(b"")
    monkeypatch.setenv("LD_PRELOAD", str(own))
    args = argparse.Namespace(file=str(ROOT / "examples" / "demo.yaml"), model=None, data=None,
                              volume=[], output=tmp_path, ranks=None, max_train_steps=None,
                              no_export=True)
    plan = LocalPlan(args)
    preload = plan.environment()["LD_PRELOAD"].split(":")
    assert preload[0] == str(own)
    assert all(Path(p).exists() for p in preload)  # the image's tcmalloc path is not here
    # the pods' folders (cache volume, /tmp) and rendezvous are not this machine's
    for name in ("HF_HOME", "AMXTUNE_CACHE", "MPLCONFIGDIR", "MASTER_ADDR", "GLOO_SOCKET_IFNAME"):
        monkeypatch.delenv(name, raising=False)
    assert not {"HF_HOME", "AMXTUNE_CACHE", "MPLCONFIGDIR", "MASTER_ADDR",
                "GLOO_SOCKET_IFNAME"} & set(LocalPlan(args).environment())
    config = plan.trainer_config()
    assert config["requireAmx"] is False and config["outputDir"] == str(tmp_path / "robot-toy")


@pytest.mark.parametrize(("memory_gib", "ranks"), [(64, 3), (16, 2)])
def test_amxtune_run_decides_auto_ranks_for_this_machine(tmp_path, monkeypatch, memory_gib,
                                                         ranks):
    import argparse

    from amxtune import local

    doc = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    doc["spec"]["workers"]["ranksPerNode"] = "auto"
    manifest = tmp_path / "auto.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    (tmp_path / "concepts").symlink_to(ROOT / "examples" / "concepts")
    monkeypatch.setattr(local.os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": memory_gib * 2**30 // 4096}
    monkeypatch.setattr(local.os, "sysconf", pages.__getitem__)
    args = argparse.Namespace(file=str(manifest), model=None, data=None, volume=[],
                              output=tmp_path, ranks=None, max_train_steps=None, no_export=True)
    plan = local.LocalPlan(args)
    assert (plan.ranks, plan.threads) == (ranks, 3 // ranks)
    assert plan.layout_reason.startswith("auto: ")
