#!/usr/bin/env bash
# Install a real single-node Slurm (Debian/Ubuntu packages) for tests/test_slurm.py.
# Needs root and the package mirror; configuring and starting the daemons is the test's job.
#   sudo cluster/slurm/dev/install-local-slurm.sh
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge)
if command -v slurmctld slurmd sbatch munged >/dev/null; then
    echo "slurm and munge already installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}"
