#!/usr/bin/env bash
# Build the two images from the repository's Dockerfiles with podman, on a machine without a
# container registry:
#   localhost/amxtune-operator:dev   (Dockerfile)
#   localhost/amxtune-trainer:dev    (trainer_image/Dockerfile)
#
# The Dockerfiles stay as users run them (FROM python:3.11-slim-bookworm, torch from the
# PyTorch CPU index); here the build arguments point at:
#   - a base image made locally: debootstrap (minbase bookworm) + Debian's python3.11, then
#     `podman import` (no registry needed; made once, tagged by the hash of its recipe);
#   - PyPI for torch (the CUDA build, which runs on the CPU), unless AMXTUNE_TORCH_INDEX_URL says
#     otherwise.
# Builds use podman's layer cache, so a second run with nothing changed takes seconds.
#
# The last line on stdout names the images; progress goes to stderr.
#
# Environment:
#   AMXTUNE_CACHE            cache root (default ~/.cache/amxtune): the podman configuration
#                            and the base image's work folder live under images/
#   AMXTUNE_TORCH_INDEX_URL  torch's index (default https://pypi.org/simple)
#   DEBIAN_MIRROR            debootstrap's mirror (default http://deb.debian.org/debian)
#   AMXTUNE_IMAGES           which to build: "operator trainer" (default), or one of them
set -euo pipefail
{

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] ERROR: %s\n' "$*" >&2; exit 1; }

missing=()
for tool in podman debootstrap runc; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    die "missing ${missing[*]}: install with \`apt-get install podman debootstrap runc\` (Debian/Ubuntu, as root) and retry"
fi
if [[ "$(id -u)" != 0 ]]; then
    die "run as root: debootstrap makes the base image as root, and the images tier runs rootful podman"
fi

cache="${AMXTUNE_CACHE:-$HOME/.cache/amxtune}/images"
mkdir -p "$cache"

# podman's configuration for these builds and the images test tier (tests/support/images.py
# sets the same CONTAINERS_CONF): runc, because crun refuses this machine's hybrid cgroup
# layout; no default ulimits, which root in an unprivileged VM may not raise.
export CONTAINERS_CONF="$cache/containers.conf"
cat >"$CONTAINERS_CONF.new" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
mv "$CONTAINERS_CONF.new" "$CONTAINERS_CONF"

# --- base image: Debian bookworm + Debian's python3.11 -----------------------
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# python3-distutils by name: debootstrap does not resolve python3.11-venv's virtual dependency.
packages="python3.11,python3-venv,python3-distutils,python-is-python3,ca-certificates"
suite=bookworm
image_config=(--change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]')
# The tag names the recipe, so a changed package list makes a new base instead of reusing one.
recipe_hash="$(printf '%s\n' minbase "$suite" "$packages" "${image_config[@]}" | sha256sum | cut -c1-12)"
base="localhost/amxtune-base:bookworm-python3.11-$recipe_hash"

# The root file system is made in a folder of its own and imported under a temporary name, then
# tagged: a failed or interrupted run leaves neither a half-made folder nor a half-made base
# (whose tag would otherwise be reused as complete).
make_base() {
    local work status=0
    work="$(mktemp -d "$cache/base.XXXXXX")" || return 1
    if ! debootstrap --variant=minbase --include="$packages" "$suite" "$work/rootfs" "$mirror" \
        >"$cache/debootstrap.log" 2>&1; then
        rm -rf "$work"
        die "debootstrap of Debian $suite from $mirror failed (last lines below; full log in $cache/debootstrap.log):
$(tail -5 "$cache/debootstrap.log")"
    fi
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
        "$work/rootfs/debootstrap"
    local partial="$base-partial"
    tar --numeric-owner -C "$work/rootfs" -c . \
        | podman import --quiet "${image_config[@]}" - "$partial" >/dev/null || status=$?
    rm -rf "$work"
    if ((status == 0)) && podman tag "$partial" "$base"; then
        podman rmi "$partial" >/dev/null
        return 0
    fi
    podman rmi -f "$partial" >/dev/null 2>&1 || true
    return 1
}

if podman image exists "$base"; then
    log "base image $base present"
else
    log "making the base image $base with debootstrap (about a minute)"
    make_base || die "could not make the base image $base"
fi

# --- the two images ----------------------------------------------------------
# pip inside the build trusts this machine's CA bundle (a TLS-inspecting proxy may sign PyPI's
# certificate). It is mounted beside the image's own bundle, never over it, and only for the
# build: neither file ends up in an image.
build_mounts=()
host_ca="${AMXTUNE_HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"
if [[ -r "$host_ca" ]]; then
    printf '[global]\ncert = /run/amxtune-host-ca.crt\n' >"$cache/pip.conf"
    build_mounts+=(-v "$host_ca:/run/amxtune-host-ca.crt:ro" -v "$cache/pip.conf:/etc/pip.conf:ro")
fi

# podman 4.3 (buildah 1.28) reuses a cached COPY layer after a copied file changed when it
# reads the repository's .dockerignore; with an ignore file of its own it does not. It leaves
# out what a checkout may or may not have (`pip install -e` writes api/*.egg-info): with it,
# two checkouts of one commit built different images, each imported again into the test nodes.
ignore="$cache/build.ignore"
printf '**/__pycache__/\n**/*.egg-info/\n' >"$ignore"
torch_index="${AMXTUNE_TORCH_INDEX_URL:-https://pypi.org/simple}"
built=()
for image in ${AMXTUNE_IMAGES:-operator trainer}; do
    case "$image" in
        operator) dockerfile="$repo/Dockerfile"; args=() ;;
        trainer) dockerfile="$repo/trainer_image/Dockerfile"; args=(--build-arg "TORCH_INDEX_URL=$torch_index") ;;
        *) die "unknown image '$image' in AMXTUNE_IMAGES (expected operator and/or trainer)" ;;
    esac
    tag="localhost/amxtune-$image:dev"
    log "building $tag from ${dockerfile#"$repo/"}"
    start=$SECONDS
    podman build --layers --network=host --ignorefile="$ignore" "${build_mounts[@]}" \
        --build-arg "BASE_IMAGE=$base" "${args[@]}" \
        -f "$dockerfile" -t "$tag" "$repo" >"$cache/build-$image.log" 2>&1 \
        || die "podman build of $tag failed (last lines below; full log in $cache/build-$image.log):
$(tail -15 "$cache/build-$image.log")"
    size="$(podman image inspect --format '{{.Size}}' "$tag")"
    log "$tag built in $((SECONDS - start)) s, $((size / 1000000)) MB"
    built+=("$tag")
done
echo "${built[*]}"
exit 0
}
