#!/usr/bin/env bash
# spark-submit for the batch job (`seg-compute batch`) on a Spark cluster.
#
#   deploy/spark/submit.sh client  MASTER [spark-submit options] -- BATCH OPTIONS
#   deploy/spark/submit.sh cluster MASTER [spark-submit options] -- BATCH OPTIONS
#
# client:  the driver runs here (a CronJob pod, a shell), executors on the cluster: MASTER is
#          spark://HOST:7077, k8s://https://API:443 or yarn. The jars come from this checkout's
#          cache (python -m compute.sparkjars fetches them with Maven once), sent with --jars.
# cluster: the driver runs on the cluster too, from the segments-compute image
#          (deploy/docker/Dockerfile), which holds the project and the jars in /opt/spark-jars;
#          MASTER is k8s://https://API:443 (Spark standalone has no cluster mode for Python).
#          SEG_IMAGE, SEG_K8S_NAMESPACE and SEG_K8S_SERVICE_ACCOUNT pick the image, namespace and
#          the driver's service account (it creates the executor pods).
#
# Executors build each segment's bitmap (pyroaring), so their Python must have the project:
# on Kubernetes they run the same image; on a standalone or YARN cluster install it on the
# workers, or ship a packed venv (--archives env.tar.gz#env --conf
# spark.pyspark.python=./env/bin/python).
#
# The batch options are seg-compute batch's (`seg-compute batch --help`), for example
#   -- --lake s3a://lake --definitions defs.toml --out /tmp/segments --publish-kafka K:9092
# With --publish-kafka the driver publishes the segment set through the publisher (guards
# included); without it, run seg-publish --input on what --out holds.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

usage() { echo "usage: $0 client|cluster MASTER [spark-submit options] -- BATCH OPTIONS" >&2; exit 2; }
[ $# -ge 2 ] || usage
mode=$1 master=$2
shift 2
submit_opts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do submit_opts+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
spark_submit=${SPARK_SUBMIT:-spark-submit}
common=(
  --master "$master"
  --name seg-compute-batch
  --conf spark.sql.session.timeZone=UTC
  --conf spark.ui.showConsoleProgress=false
)

case "$mode" in
  client)
    python=${PYSPARK_PYTHON:-python3}
    jars_dir=${SEG_SPARK_JARS_DIR:-$repo/.cache/spark-jars}
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    SEG_SPARK_JARS_DIR="$jars_dir" "$python" -m compute.sparkjars >&2
    jars=$(find "$jars_dir" -maxdepth 1 -name '*.jar' | sort | paste -sd, -)
    exec "$spark_submit" "${common[@]}" --deploy-mode client --jars "$jars" \
      --conf "spark.pyspark.python=$python" --conf "spark.pyspark.driver.python=$python" \
      "${submit_opts[@]}" "$here/batch_driver.py" "$@"
    ;;
  cluster)
    image=${SEG_IMAGE:-registry.example.com/segments-compute:0.1.0}
    # the image's jar cache, listed from the same pom: the names are the same
    jars_dir=${SEG_SPARK_JARS_DIR:-$repo/.cache/spark-jars}
    jars=$(find "$jars_dir" -maxdepth 1 -name '*.jar' -printf 'local:///opt/spark-jars/%f\n' |
      sort | paste -sd, -)
    exec "$spark_submit" "${common[@]}" --deploy-mode cluster --jars "$jars" \
      --conf "spark.kubernetes.container.image=$image" \
      --conf "spark.kubernetes.namespace=${SEG_K8S_NAMESPACE:-segments}" \
      --conf "spark.kubernetes.authenticate.driver.serviceAccountName=${SEG_K8S_SERVICE_ACCOUNT:-spark}" \
      --conf spark.kubernetes.driverEnv.SEG_SPARK_JARS_DIR=/opt/spark-jars \
      --conf spark.pyspark.python=python3 \
      "${submit_opts[@]}" local:///app/deploy/spark/batch_driver.py "$@"
    ;;
  *) usage ;;
esac
