"""`benchmarks/throughput.py` with the engine's projection fusion skipped (`models/fusion.py`): the end-to-end A/B
baseline of fused q/k/v and gate/up matmuls. Same arguments and output as throughput.py.

    python benchmarks/unfused.py --num-prompts 256 --input-len 512 --output-len 128 --num-scheduler-steps 8
"""
import os
import runpy
import sys

import jaxpaged.engine

jaxpaged.engine.fuse_projections = lambda model, **_: model  # the engine calls it once after loading
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)  # throughput.py's own imports (results, roofline, workloads)
sys.argv[0] = os.path.join(here, "throughput.py")
runpy.run_path(sys.argv[0], run_name="__main__")
