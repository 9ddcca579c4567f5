#!/usr/bin/env bash
# Entry point of a Ray job (`ray job submit --address http://HEAD:8265 --working-dir . -- bash pipelines/ray_job.sh`).
# Runs on the cluster's head node; RAY_ADDRESS is set by Ray for jobs, so the build joins the running cluster.
# Rerunning the same command after a failure resumes: finished tasks are skipped, the bytes are the same.
set -euo pipefail
CONFIG=${PACKPREP_CONFIG:-pipelines/ray_cluster.toml}
exec packprep build --config "$CONFIG" --executor ray "$@"
