#!/usr/bin/env bash
# Makes a Python 3.11 base image from Debian's own packages, for builders that reach
# no image registry (python:3.11-slim comes from Docker Hub). Needs root, debootstrap
# and a Debian mirror. Usage: sudo deploy/base-image.sh [TAG]   (default t2i-base:bookworm)
set -euo pipefail

tag=${1:-t2i-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /tmp/t2i-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

# bookworm's python3 is 3.11, the version the Bento asks for; pip is there because
# BentoML's Dockerfile installs uv with it.
debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates bookworm "$rootfs" "$mirror"
# python:3.11-slim lets pip install into the system Python; Debian's PEP 668 marker would refuse it.
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
# A host behind a TLS-inspecting proxy trusts its CA through /usr/local/share/ca-certificates;
# the build's pip and uv downloads pass that proxy too. (An ordinary host has none there.)
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs"/usr/local/share/ca-certificates/
    chroot "$rootfs" update-ca-certificates
fi

# UV_SYSTEM_CERTS: uv (which installs the Bento's packages) trusts these system CAs, not only its own list.
tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' \
    --change 'ENV UV_SYSTEM_CERTS=1' --change 'CMD ["bash"]' - "$tag"
docker image ls "$tag"
