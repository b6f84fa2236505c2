#!/usr/bin/env bash
# A Debian base image made here, for building the Docker image where no container registry is reachable
# (tests/test_container.py): debootstrap --variant=minbase SUITE from the Debian mirror this machine's apt already
# uses, kept as a tar in a cache keyed by its inputs, then `docker import`ed as NAME. It has no python: the
# Dockerfile installs python3 and python3-venv with apt when its BASE_IMAGE lacks them.
#   scripts/container-base.sh NAME         e.g. mg-base:bookworm; then docker build --build-arg BASE_IMAGE=NAME ...
# Root, debootstrap and a docker CLI (DOCKER, default docker; DOCKER_HOST names the engine) are needed.
#   MG_BASE_SUITE    Debian suite (default bookworm: python 3.11, as python:3.11-slim and the cp311 torch wheel)
#   MG_BASE_MIRROR   Debian mirror (default: the first URI of /etc/apt/sources.list{,.d/*} that serves SUITE)
#   MG_CACHE_DIR     where the tar is kept (default /var/cache/manifold-guard; rm -r it to refresh the base)
set -euo pipefail
name=${1:?usage: scripts/container-base.sh NAME}
suite=${MG_BASE_SUITE:-bookworm}
variant=minbase
docker=${DOCKER:-docker}
cache=${MG_CACHE_DIR:-/var/cache/manifold-guard}

# the mirror apt already uses for SUITE: one-line ("deb [opts] URI SUITE COMPONENTS") and deb822 (.sources) files
apt_mirror() {
  local f uri
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    uri=$(awk -v s="$suite" '$1 == "deb" { sub(/\[[^]]*\]/, ""); if ($3 == s) { print $2; exit } }' "$f")
    [ -z "$uri" ] || { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    # paragraphs separated by blank lines; a paragraph serving SUITE with Types: deb gives its first URI
    uri=$(awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
      { uri = ""; ok_t = 0; ok_s = 0; on = 1
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^#/) continue
          split($i, kv, /:[ \t]*/); k = tolower(kv[1]); v = substr($i, index($i, ":") + 1); gsub(/^[ \t]+/, "", v)
          if (k == "types" && (" " v " ") ~ / deb /) ok_t = 1
          if (k == "suites" && (" " v " ") ~ (" " s " ")) ok_s = 1
          if (k == "uris") { split(v, u, /[ \t]+/); uri = u[1] }
          if (k == "enabled" && tolower(v) == "no") on = 0
        }
        if (ok_t && ok_s && on && uri != "") { print uri; exit } }' "$f")
    [ -z "$uri" ] || { echo "$uri"; return; }
  done
}
mirror=${MG_BASE_MIRROR:-$(apt_mirror)}
if [ -z "$mirror" ]; then
  echo "container-base: no apt source serves '$suite' here; set MG_BASE_MIRROR=http://<debian mirror>/debian" >&2
  exit 1
fi
[ "$(id -u)" = 0 ] || { echo "container-base: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "container-base: debootstrap is not installed" >&2; exit 1; }

arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
# the inputs: suite, variant, architecture, mirror, debootstrap's version and this recipe (this file)
key=$(printf '%s\n' "$suite" "$variant" "$arch" "$mirror" "$(debootstrap --version 2>/dev/null)" \
      "$(sha256sum <"${BASH_SOURCE[0]}")" | sha256sum | cut -c1-12)
mkdir -p "$cache"
tarball="$cache/base-$suite-$variant-$arch-$key.tar"
exec 9>"$tarball.lock"
flock 9  # one maker at a time; a second caller then finds the tar
if [ -s "$tarball" ]; then
  echo "container-base: cached $tarball"
else
  root=$(mktemp -d "$cache/rootfs.XXXXXX")
  cleanup() {
    # debootstrap mounts proc and sys inside the target while it runs: never leave one behind
    awk -v r="$root" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
    rm -rf "$root" "$root.log" "$tarball.tmp"
  }
  trap cleanup EXIT
  echo "container-base: debootstrap --variant=$variant $suite from $mirror (about 30 s, 127 MB)"
  start=$SECONDS
  debootstrap --variant="$variant" "$suite" "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -n 20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
  rm -f "$root.log"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  chmod 755 "$root"  # mktemp made it 0700: as the image's / it would lock out every user but root
  tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  echo "container-base: made $tarball in $((SECONDS - start)) s"
fi
"$docker" import "$tarball" "$name" >/dev/null
echo "container-base: imported $name"
