#!/usr/bin/env bash
# Build (once) a Debian base image for deploy/Containerfile from Debian's own packages, for
# machines that reach Debian's archive but no image registry. Prints the image name.
#
#   BASE=$(deploy/image/debian-base.sh) && podman --runtime runc build --network host \
#       --build-arg BASE="$BASE" -f deploy/Containerfile -t refund-gate .
#
# The image carries Debian's Python 3.11 (what the official python:3.11-slim image carries at
# /usr/local) and libgomp1 (LightGBM). Its tag is a hash of what goes into it, so a change here
# builds a new one; the root tree is cached as a tarball under $CACHE_DIR (podman's own storage
# may be wiped), so a rerun on the same machine imports it in seconds instead of running
# debootstrap (minutes).
set -euo pipefail

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
INCLUDE=${INCLUDE:-python3,python3-venv,libgomp1}
CACHE_DIR=${CACHE_DIR:-/var/cache/refund-gate}

key=$({ cat "${BASH_SOURCE[0]}"; printf '%s\n' "$SUITE" "$MIRROR" "$INCLUDE"; } | sha256sum | cut -c1-12)
image="localhost/refund-gate-base:$SUITE-$key"
tarball="$CACHE_DIR/base-$SUITE-$key.tar"

if podman image exists "$image"; then
  echo "$image"
  exit 0
fi
if [ ! -s "$tarball" ]; then
  mkdir -p "$CACHE_DIR"
  root=$(mktemp -d "$CACHE_DIR/root.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap $SUITE into $root (cached as $tarball)" >&2
  debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$root" "$MIRROR" >&2
  # As Debian's own slim images do: no manuals, translations or docs (copyright files stay), now
  # or for packages installed later; no apt lists or caches (whoever needs them fetches them).
  cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log
  tar -C "$root" -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
fi
podman import - "$image" <"$tarball" >&2
echo "$image"
