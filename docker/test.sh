#!/usr/bin/env bash
# The CPU image built and run for real (`make docker-test`; docker/README.md shows a run).
#
# From nothing but a Docker engine's binaries: starts dockerd if none answers, builds an
# offline base image with debootstrap (once: kept as $BASE_IMAGE), builds the CPU image,
# runs three replicas of it on loopback ports and checks them from the host with hessd's own
# client (docker/check_replicas.py), then brings up compose.yaml's three replicas, without
# Envoy, and checks those too. Removes every container, volume and network it made; keeps
# the images. Prints each step's and each check's result and time; exits non-zero on any
# failure.
#
# Environment: BASE_IMAGE (default hessd-base:bookworm, built here if missing; a pullable
# image such as python:3.11-slim-bookworm is used as it is), IMAGE (hessd:cpu), PORTS
# ("50061 50062 50063"), COMPOSE_PORTS ("50071 50072 50073", see compose.replicas.yaml),
# COMPOSE=0 to skip the compose stage, DEBIAN_MIRROR (default: this host's apt mirror),
# PYTHON (the client's interpreter, default .venv/bin/python).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
BASE_IMAGE=${BASE_IMAGE:-hessd-base:bookworm}
IMAGE=${IMAGE:-hessd:cpu}
read -r -a ports <<<"${PORTS:-50061 50062 50063}"
read -r -a compose_ports <<<"${COMPOSE_PORTS:-50071 50072 50073}"
PYTHON=${PYTHON:-$root/.venv/bin/python}
prefix=hessd-test        # containers hessd-test-N, volumes hessd-test-N-cache
label=hessd.docker-test  # on everything docker run made here, for the cleanup
project=hessd-test       # the compose project
logs=${TMPDIR:-/tmp}/hessd-docker-test
mkdir -p "$logs"

dockerd_pid="" rootfs="" compose_up="" failed=0

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
say() { printf '%s  %s\n' "$(date +%T)" "$*"; }
die() { say "FAIL $*" >&2; exit 1; }

compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose "$@"
    else
        docker-compose "$@"
    fi
}

remove_labelled() {
    docker ps -aq --filter "label=$label" | xargs -r docker rm -fv >/dev/null
    docker volume ls -q --filter "label=$label" | xargs -r docker volume rm >/dev/null
}

cleanup() {
    local rc=$?
    set +e
    if [[ -n $compose_up ]]; then
        compose -p "$project" -f "$here/compose.yaml" -f "$here/compose.replicas.yaml" \
            down --volumes --timeout 5 >"$logs/compose-down.log" 2>&1
    fi
    remove_labelled 2>/dev/null
    [[ -n $rootfs ]] && remove_rootfs
    if [[ -n $dockerd_pid ]]; then
        kill "$dockerd_pid" && wait "$dockerd_pid"
        say "stopped the dockerd started here"
    fi
    say "cleaned up: containers, volumes and networks made here (images kept)"
    exit "$rc"
}
trap cleanup EXIT

# ---- the engine

start_dockerd() {
    if docker info >/dev/null 2>&1; then
        say "dockerd: running, $(docker version --format 'server {{.Server.Version}}')"
        return
    fi
    command -v dockerd >/dev/null || die "no Docker engine: apt-get install -y docker.io"
    [[ $EUID -eq 0 ]] || die "dockerd is not running, and starting it needs root"
    dockerd >"$logs/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$dockerd_pid" 2>/dev/null || die "dockerd exited: see $logs/dockerd.log"
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || die "dockerd did not answer in 30 s: see $logs/dockerd.log"
    say "dockerd: started ($(docker info --format '{{.ServerVersion}}, {{.Driver}}'), log $logs/dockerd.log)"
}

# `docker build` with BuildKit, which reads docker/Dockerfile.cpu.dockerignore (the classic
# builder would send the whole tree, .venv included). A client from Docker 23 on builds with
# BuildKit only through the buildx plugin; an older client (Debian's docker.io 20.10 is
# /usr/bin/docker) asks the daemon's built-in BuildKit with DOCKER_BUILDKIT=1.
find_builder() {
    local client version
    for client in docker /usr/bin/docker; do
        command -v "$client" >/dev/null || continue
        if "$client" buildx version >/dev/null 2>&1; then
            build=("$client" buildx build --load --progress=plain)
            return
        fi
        version=$("$client" version --format '{{.Client.Version}}' 2>/dev/null || true)
        if [[ ${version%%.*} =~ ^[0-9]+$ ]] && ((${version%%.*} < 23)); then
            build=(env DOCKER_BUILDKIT=1 "$client" build --progress=plain)
            return
        fi
    done
    die "no client builds with BuildKit: install docker-buildx, or use a docker client < 23"
}

# ---- the offline base: Debian bookworm (python3 is 3.11) with python3-venv

host_mirror() {
    local uri
    uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
        /etc/apt/sources.list.d/*.list | grep -oE '(https?|file)://[^ ]+/debian/?( |$)' |
        head -1 | tr -d ' ')
    echo "${uri:-http://deb.debian.org/debian}"
}

remove_rootfs() {
    # debootstrap mounts /proc and /sys inside; never delete through a mount.
    awk -v r="$rootfs" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m"; done
    rm -rf --one-file-system "$rootfs" "$rootfs.log"
    rootfs=""
}

build_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base $BASE_IMAGE: cached ($(docker image inspect -f '{{.Created}}' "$BASE_IMAGE"))"
        return
    fi
    if [[ $BASE_IMAGE != hessd-base:* ]]; then
        say "base $BASE_IMAGE: not here; docker build pulls it"
        return
    fi
    command -v debootstrap >/dev/null || die "no debootstrap: apt-get install -y debootstrap"
    [[ $EUID -eq 0 ]] || die "debootstrap needs root"
    local start mirror
    start=$(now)
    mirror=${DEBIAN_MIRROR:-$(host_mirror)}
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/hessd-rootfs.XXXXXX")
    say "base $BASE_IMAGE: debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 ||
        { tail -20 "$rootfs.log"; die "debootstrap failed"; }
    # The host's own CAs (/usr/local/share/ca-certificates): where HTTPS leaves through an
    # intercepting proxy, pip in the build trusts what the host trusts. Debian's pip reads
    # the system bundle. Only this local base gets them; the Dockerfiles carry none.
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >>"$rootfs.log" 2>&1
    fi
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
    tar --numeric-owner -C "$rootfs" -c . |
        docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    remove_rootfs
    say "base $BASE_IMAGE: built in $(since "$start") s ($(docker run --rm "$BASE_IMAGE" python3 --version), $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{ printf "%d MB", $1 / 1e6 }'))"
}

build_image() {
    local start
    start=$(now)
    find_builder
    say "image $IMAGE: ${build[*]} -f docker/Dockerfile.cpu --build-arg BASE_IMAGE=$BASE_IMAGE"
    "${build[@]}" -f "$here/Dockerfile.cpu" --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" \
        "$root" >"$logs/build.log" 2>&1 || { tail -30 "$logs/build.log"; die "docker build failed"; }
    say "image $IMAGE: built in $(since "$start") s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%d MB", $1 / 1e6 }'), log $logs/build.log)"
}

# ---- replicas

run_replicas() {
    local i start
    start=$(now)
    for i in 1 2 3; do
        docker volume create --label "$label" "$prefix-$i-cache" >/dev/null
        docker run -d --name "$prefix-$i" --label "$label" --stop-timeout 40 \
            -p "127.0.0.1:${ports[i - 1]}:50051" -v "$prefix-$i-cache:/var/cache/hessd/jax" \
            "$IMAGE" >/dev/null
    done
    say "replicas: $prefix-1..3 on 127.0.0.1:${ports[*]} (docker run in $(since "$start") s)"
}

check() {
    local start c
    start=$(now)
    if ! "$PYTHON" "$here/check_replicas.py" "$@"; then
        failed=1
        for c in $(printf '%s\n' "$@" | sed -n 's/^\([^-][^=]*\)=.*/\1/p'); do
            docker logs -t "$c" >"$logs/$c.log" 2>&1
        done
        say "the replicas' logs: $logs/*.log"
    fi
    say "checks: $(since "$start") s"
}

compose_replicas() {
    if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
        say "compose: SKIPPED, neither 'docker compose' nor docker-compose is installed"
        return
    fi
    local start i id replicas=()
    start=$(now)
    # Envoy's image cannot be had offline: start the three replica services by name, which
    # leaves envoy (nothing depends on it) out; compose.replicas.yaml publishes their gRPC
    # ports on loopback, as Envoy would otherwise reach them.
    compose_up=1
    export HESSD_IMAGE=$IMAGE HESSD_GRPC_PORT_1=${compose_ports[0]} \
        HESSD_GRPC_PORT_2=${compose_ports[1]} HESSD_GRPC_PORT_3=${compose_ports[2]}
    compose -p "$project" -f "$here/compose.yaml" -f "$here/compose.replicas.yaml" \
        up -d --no-build hessd-1 hessd-2 hessd-3 >"$logs/compose-up.log" 2>&1 ||
        { cat "$logs/compose-up.log"; die "compose up failed"; }
    for i in 1 2 3; do
        id=$(compose -p "$project" -f "$here/compose.yaml" -f "$here/compose.replicas.yaml" ps -q "hessd-$i")
        replicas+=(--replica "$(docker inspect -f '{{.Name}}' "$id" | tr -d /)=127.0.0.1:${compose_ports[i - 1]}")
    done
    say "compose ($(compose version --short 2>/dev/null || true)): hessd-1..3 up in $(since "$start") s, without envoy"
    check "${replicas[@]}" --checks health,healthcheck,quickstart,oip,spread,kill
}

main() {
    local start
    start=$(now)
    [[ -x $PYTHON ]] || die "no $PYTHON: make serve (or PYTHON=...) first"
    "$PYTHON" -c 'import hessd.client, grpc_health.v1' || die "$PYTHON lacks hessd.client or grpc_health"
    start_dockerd
    # Leftovers of an interrupted run would hold the names, ports and old caches.
    remove_labelled
    build_base
    build_image
    run_replicas
    check --replica "$prefix-1=127.0.0.1:${ports[0]}" --replica "$prefix-2=127.0.0.1:${ports[1]}" \
        --replica "$prefix-3=127.0.0.1:${ports[2]}"
    docker rm -fv "$prefix-1" "$prefix-2" "$prefix-3" >/dev/null
    [[ ${COMPOSE:-1} == 0 ]] || compose_replicas
    if ((failed)); then
        die "docker-test: some checks failed ($(since "$start") s)"
    fi
    say "docker-test: all passed in $(since "$start") s"
}

main "$@"
