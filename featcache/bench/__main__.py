"""`python -m featcache.bench WORKER --option value ...`: one worker of `featcache bench` (see worker.py)."""

import sys

from featcache.bench.worker import main

main(sys.argv[1:])
