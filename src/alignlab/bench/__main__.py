"""``python -m alignlab.bench _worker SPEC.json OUT.json``: the worker process that ``launch`` (``worker.py``)
starts; it runs the runner named in the spec and writes its raw measurements as JSON."""

import sys

from alignlab.bench.worker import run_worker

if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        sys.exit(run_worker(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m alignlab.bench _worker SPEC.json OUT.json (use `alignlab bench` instead)")
