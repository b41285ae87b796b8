"""The Dockerfiles install from the project's pins, including the parts the images tier does
not build (the intel-legacy variant). What the built images contain and do (users, preloaded
libraries, launchers, rendered pods) is checked by running them: tests/images/.
"""

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


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
    assert "--no-deps --force-reinstall ./api ./trainer_image" in trainer
    assert "COPY operator/" not in trainer and "./operator" not in trainer
    for name in ("torch", "torchvision", "intel-openmp", "impi-rt", "optimum-intel"):
        assert name in pins(), f"{name} is not pinned in requirements/pins.txt"
    # the legacy variant's versions are the ones intel-extension-for-pytorch 2.8 needs
    assert "intel-extension-for-pytorch==2.8.0" in trainer and "torch==2.8.0" in trainer
