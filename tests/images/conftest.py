"""images tier: the two images built by tools/images/build.sh (`make images`), run with podman."""

from __future__ import annotations

import pytest

from tests.support.images import ImageBuildFailed, ensure_images


@pytest.fixture(scope="session")
def images() -> list[str]:
    """Both images, built or brought up to date (seconds when nothing changed). A machine
    that cannot build them fails this tier with the build's message; it does not skip."""
    try:
        return ensure_images()
    except ImageBuildFailed as exc:
        pytest.fail(f"the images could not be built:\n{exc}", pytrace=False)
