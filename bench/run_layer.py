"""The PEER layer part of the benchmark suite: `python bench/run.py --only layer`.

    python bench/run_layer.py [run.py options]

Times the layer forward, backward and forward + backward through our Triton kernels, the
PyTorch reference, the reference under torch.compile and peer-pytorch (paper config and
sweeps on a GPU; tiny sizes on the CPU, where the timings are CPU timings, not the
product's numbers). The whole suite: bench/run.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run.main(["--only", "layer", *sys.argv[1:]]))
