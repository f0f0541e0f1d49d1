"""The op part of the benchmark suite: `python bench/run.py --only retrieval,experts`.

    python bench/bench_ops.py [run.py options]

Times product_key_topk and peer_experts (forward, backward, forward + backward) through
our Triton kernels, the PyTorch reference and the reference under torch.compile, with
the copy bandwidth measured first. The whole suite: bench/run.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run.main(["--only", "retrieval,experts", *sys.argv[1:]]))
