#!/usr/bin/env bash
# Run a mining job: ./run_mining.sh JOB.toml [mining run options...]
#
# On first use it makes a virtual environment (.venv beside this script, or
# $MINING_VENV) and installs the project into it; later runs reuse it.
# It also works as a plain sbatch script (the job then runs on the node it is
# given, with the local executor unless the spec says otherwise):
#
#   sbatch --gpus=8 --cpus-per-task=32 --mem=512G --time=24:00:00 run_mining.sh pipelines/mst5-en-de.toml
#
#SBATCH --job-name=mining
#SBATCH --output=mining-%j.out
set -euo pipefail

# Under sbatch the script runs from a spool copy; SLURM_SUBMIT_DIR is where it was submitted.
if [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_SUBMIT_DIR:-}" && -f "${SLURM_SUBMIT_DIR}/run_mining.sh" ]]; then
  here="${SLURM_SUBMIT_DIR}"
else
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fi
venv="${MINING_VENV:-$here/.venv}"
python="${PYTHON:-python3}"

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  echo "usage: $0 JOB.toml [--set section.key=value ...] [--stage STAGE] [--force]" >&2
  echo "       (runs: mining run JOB.toml ...; see 'mining run --help')" >&2
  exit 2
fi

if [[ ! -x "$venv/bin/mining" ]]; then
  echo "run_mining.sh: setting up $venv (first run only)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  # torch first, pinned: the project itself asks only for a range, which an
  # installed torch satisfies, so pip never swaps in another multi-GB build.
  "$venv/bin/pip" install --quiet "torch==${MINING_TORCH_VERSION:-2.13.0}"
  "$venv/bin/pip" install --quiet -e "$here[cpu-encoder,slurm]"
fi

exec "$venv/bin/mining" run "$@"
