"""What can be checked about the images without a container engine.

The Dockerfiles are not built here (no Docker engine); these tests keep them consistent with
the repository, the pins and the paths the operator renders into LD_PRELOAD.
"""

import re
from pathlib import Path

import pytest

from amxtune.settings import Settings

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "trainer_image" / "Dockerfile"]


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_copied_path_exists(dockerfile):
    copies = [rest for word, rest in instructions(dockerfile) if word == "COPY"]
    assert copies
    for rest in copies:
        if rest.startswith("--from"):
            continue
        *sources, _target = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"


def trainer_env() -> dict[str, str]:
    env = {}
    for word, rest in instructions(ROOT / "trainer_image" / "Dockerfile"):
        if word == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = value.replace("$VIRTUAL_ENV", env.get("VIRTUAL_ENV", ""))
    return env


def test_preloaded_libraries_are_where_the_trainer_image_installs_them():
    settings = Settings()
    text = (ROOT / "trainer_image" / "Dockerfile").read_text()
    # Debian's libgoogle-perftools4 / libjemalloc2 ship these sonames in the multiarch dir
    assert "libgoogle-perftools4" in text
    assert settings.tcmalloc_path == "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"
    assert "libjemalloc2" in text
    assert settings.jemalloc_path == "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    # the intel-openmp wheel installs lib/libiomp5.so under the environment's prefix
    assert "intel-openmp" in text
    assert settings.iomp5_path == f"{trainer_env()['VIRTUAL_ENV']}/lib/libiomp5.so"


def test_images_run_as_the_users_the_operator_and_chart_expect():
    trainer = (ROOT / "trainer_image" / "Dockerfile").read_text()
    assert f"--uid {Settings().run_as_user}" in trainer
    assert f"USER {Settings().run_as_user}" in trainer
    chart = (ROOT / "charts" / "amxtune" / "templates" / "deployment.yaml").read_text()
    operator_uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert f"runAsUser: {operator_uid}" in chart


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "requirements" / "pins.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            found[name.strip().lower()] = version.strip()
    return found


def test_images_install_from_the_project_pins():
    operator = (ROOT / "Dockerfile").read_text()
    trainer = (ROOT / "trainer_image" / "Dockerfile").read_text()
    assert "-c requirements/pins.txt ./api ./operator" in operator
    assert "grep -E '^(torch|torchvision)==' requirements/pins.txt" in trainer
    # the trainer needs the shared models, not the operator (kopf, kubernetes, prometheus)
    assert "-c /tmp/constraints.txt ./api './trainer_image[export]'" in trainer
    assert "COPY operator/" not in trainer and "./operator" not in trainer
    for name in ("torch", "torchvision", "intel-openmp", "impi-rt", "optimum-intel"):
        assert name in pins(), f"{name} is not pinned in requirements/pins.txt"
    # the legacy variant's versions are the ones intel-extension-for-pytorch 2.8 needs
    assert "intel-extension-for-pytorch==2.8.0" in trainer and "torch==2.8.0" in trainer
