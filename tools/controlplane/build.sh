#!/usr/bin/env bash
# Build the test control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd, kwok, helm) and the real nodes' components (kubelet,
# kube-proxy, CoreDNS) from Go modules at pinned versions.
#
# Output: ${AMXTUNE_CACHE:-$HOME/.cache/amxtune}/k8s-<K8S_VERSION>/bin
# The last line on stdout is that directory; progress goes to stderr.
#
# Idempotent: when every binary is present and the stamp (versions + go.sum of
# the wrapper modules) matches, it returns at once. Otherwise it builds into a
# temporary directory next to the cache and moves it into place only when every
# binary built and answers --version, so the cache is never half filled.
#
# Environment:
#   AMXTUNE_CACHE   cache root (default ~/.cache/amxtune)
#   GO              go binary (default: `go` on PATH, else /usr/local/go/bin/go)
#   BUILD_JOBS      go build -p (default: number of CPUs)
#   FORCE_REBUILD=1 rebuild even when the cache is complete
set -euo pipefail
# The whole script is one { ... } block so bash parses it before running it: editing
# this file while a build runs cannot break that build.
{

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy etcd kwok helm coredns)

log() { printf '[controlplane-build] %s\n' "$*" >&2; }
die() { printf '[controlplane-build] ERROR: %s\n' "$*" >&2; exit 1; }

cache_root="${AMXTUNE_CACHE:-$HOME/.cache/amxtune}"
dest_root="$cache_root/k8s-$K8S_VERSION"
dest="$dest_root/bin"

# The stamp names every input that decides what the binaries are: the versions,
# the wrapper modules, and this script without its comment lines (so editing a
# comment does not force a rebuild).
stamp_text() {
    printf 'K8S_VERSION=%s\nETCD_VERSION=%s\nKWOK_VERSION=%s\nHELM_VERSION=%s\nCOREDNS_VERSION=%s\n' \
        "$K8S_VERSION" "$ETCD_VERSION" "$KWOK_VERSION" "$HELM_VERSION" "$COREDNS_VERSION"
    (
        cd "$here"
        grep -v '^[[:space:]]*#' build.sh
        cat modules/*/go.mod modules/*/go.sum modules/*/*.go
    ) | sha256sum | awk '{print "inputs=" $1}'
}

cache_complete() {
    local b
    for b in "${BINARIES[@]}"; do
        [[ -x "$dest/$b" ]] || return 1
    done
    [[ -f "$dest/STAMP" ]] && [[ "$(cat "$dest/STAMP")" == "$(stamp_text)" ]]
}

if [[ "${FORCE_REBUILD:-0}" != 1 ]] && cache_complete; then
    log "cache complete: $dest"
    echo "$dest"
    exit 0
fi

# One build at a time per cache (parallel test runs, CI jobs sharing a cache):
# wait for a running build, then look again.
mkdir -p "$cache_root"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache_root/.build-k8s-$K8S_VERSION.lock"
    if ! flock -n 9; then
        log "another build is running; waiting for it"
        flock 9
    fi
    if [[ "${FORCE_REBUILD:-0}" != 1 ]] && cache_complete; then
        log "cache complete: $dest"
        echo "$dest"
        exit 0
    fi
fi

# --- Go toolchain ---------------------------------------------------------
GO="${GO:-}"
if [[ -z "$GO" ]]; then
    if command -v go >/dev/null 2>&1; then
        GO="$(command -v go)"
    elif [[ -x /usr/local/go/bin/go ]]; then
        GO=/usr/local/go/bin/go
    fi
fi
if [[ -z "$GO" ]] || ! "$GO" version >/dev/null 2>&1; then
    die "no working Go toolchain found${GO:+ ($GO)} (need Go >= 1.26 on PATH, at /usr/local/go/bin/go, or in \$GO). \
The control plane for the cluster tests is built from Go modules; install Go and retry."
fi
go_version="$("$GO" env GOVERSION)"
case "$go_version" in
    go1.2[6-9]* | go1.[3-9][0-9]* | go[2-9]*) ;;
    *) die "Go $go_version is too old: k8s.io/kubernetes $K8S_VERSION needs Go >= 1.26 ($GO)" ;;
esac

export GOTOOLCHAIN=local   # never download another toolchain
export CGO_ENABLED=0       # static binaries, no C compiler needed
export GOFLAGS="-trimpath -mod=readonly"
jobs="${BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

work="$(mktemp -d "$cache_root/.build-k8s-$K8S_VERSION.XXXXXX")"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
out="$work/bin"
mkdir -p "$out"

start=$SECONDS
log "building into $work with $go_version, -p $jobs (cold builds take 20-40 min on 2 CPUs)"

build() { # build <module dir> <ldflags> <output> <packages...>
    local mod="$1" ldflags="$2" output="$3"
    shift 3
    log "go build $* ($(( SECONDS - start ))s elapsed)"
    (cd "$here/modules/$mod" && "$GO" build -p "$jobs" -ldflags "$ldflags" -o "$output" "$@") \
        || die "go build failed in tools/controlplane/modules/$mod for: $*"
}

k8s_minor="${K8S_VERSION#v1.}"
k8s_minor="${k8s_minor%%.*}"
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
    k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

# The k8s binaries in one invocation share the package compilation.
build kubernetes "$k8s_ldflags" "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy
build etcd "-s -w" "$out/etcd" .
build kwok "-s -w" "$out/kwok" sigs.k8s.io/kwok/cmd/kwok
build coredns "-s -w" "$out/coredns" .
build helm "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "$out/helm" helm.sh/helm/v3/cmd/helm

# Every binary must exist and run before the cache is touched.
for b in "${BINARIES[@]}"; do
    [[ -x "$out/$b" ]] || die "$b was not produced"
done
"$out/kube-apiserver" --version | grep -qF "$K8S_VERSION" || die "kube-apiserver --version is not $K8S_VERSION"
"$out/kubectl" version --client | grep -qF "$K8S_VERSION" || die "kubectl version is not $K8S_VERSION"
"$out/kubelet" --version | grep -qF "$K8S_VERSION" || die "kubelet --version is not $K8S_VERSION"
"$out/coredns" -version | grep -qF "${COREDNS_VERSION#v}" || die "coredns -version is not $COREDNS_VERSION"
"$out/etcd" --version | grep -qF "${ETCD_VERSION#v}" || die "etcd --version is not $ETCD_VERSION"
"$out/kwok" --version >/dev/null || die "kwok --version failed"
"$out/helm" version --short >/dev/null || die "helm version failed"
stamp_text >"$out/STAMP"

# Swap the finished directory into place.
mkdir -p "$dest_root"
if [[ -e "$dest" ]]; then
    mv "$dest" "$work/old-bin"
fi
mv "$out" "$dest"
log "done in $(( SECONDS - start ))s: $dest"
echo "$dest"
exit 0
}
