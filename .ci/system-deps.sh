#!/usr/bin/env bash
# System packages some tests use (a one-node Slurm for the launch test).
# Best effort: without root or without the packages those tests skip with a reason.
set -u
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v slurmd >/dev/null; then
  echo "installing slurm-wlm and munge for the Slurm launch test…"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge iproute2 >/dev/null) \
    || echo "could not install slurm-wlm/munge: the Slurm test will be skipped"
fi
exit 0
