import os

# Spawned ranks inherit this: one thread each keeps 4 ranks on 2 cores from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
