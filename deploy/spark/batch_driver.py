"""The batch job's entry point for spark-submit (deploy/spark/submit.sh): the same command as
`seg-compute batch ...`, in the driver that spark-submit starts. Under spark-submit the session
takes its master, driver address and jars from spark-submit (compute/spark.py)."""

import sys

from compute.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
