#!/usr/bin/env bash
# Install a real single-node Slurm (Debian's slurm-wlm + munge) for tests/test_slurm.py.
# Idempotent: does nothing if the binaries are already there. Never fails the CI run:
# without apt (or without root) it prints why and exits 0; the Slurm tests then skip.
set -u

need=(slurmctld slurmd sbatch srun scontrol sinfo munged)
missing=0
for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 0 ]; then
    echo "install-slurm: slurm-wlm and munge already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: apt-get not available; skipping (Slurm tests will be skipped)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-slurm: not root and no passwordless sudo; skipping (Slurm tests will be skipped)"
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# Do not let the packages' postinst start system-wide daemons: the test fixture runs
# its own slurmctld/slurmd/munged with a private config.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod +x "$policy" && created_policy=1
fi

rc=0
$SUDO apt-get update -qq >/dev/null || rc=$?
if [ "$rc" = 0 ]; then
    $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || rc=$?
fi
[ "$created_policy" = 1 ] && $SUDO rm -f "$policy"

if [ "$rc" != 0 ]; then
    echo "install-slurm: apt-get failed (exit $rc); skipping (Slurm tests will be skipped)"
    exit 0
fi
echo "install-slurm: installed $(dpkg-query -W -f='slurm-wlm ${Version}' slurm-wlm 2>/dev/null) and munge"
exit 0
