"""peer-kernels: fast Triton kernels for PEER layers (He, "Mixture of A Million Experts").

Public API:
    product_key_topk(query, sub_keys, k, *, candidates=None, backend="auto")
    peer_experts(x, indices, gates, down, up, *, activation="gelu", backend="auto", ...)
    PEER(dim, ...)                  the nn.Module
    expert_usage(...), ExpertUsage  expert usage / unevenness (paper Table 2)
    reference                       the same ops in plain PyTorch
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _load_kernels():
    # Installed: peer_kernels/csrc_triton is a subpackage. Plain checkout: the kernels
    # live in ../csrc_triton; load that folder under the same module name.
    name = __name__ + ".csrc_triton"
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "csrc_triton")) or name in _sys.modules:
        return
    src = _os.path.join(_os.path.dirname(here), "csrc_triton")
    spec = _ilu.spec_from_file_location(name, _os.path.join(src, "__init__.py"), submodule_search_locations=[src])
    if spec is None:
        raise ImportError(f"peer_kernels: kernel folder not found at {src}")
    mod = _ilu.module_from_spec(spec)
    _sys.modules[name] = mod
    spec.loader.exec_module(mod)


_load_kernels()

from . import reference  # noqa: E402
from .retrieval import product_key_topk  # noqa: E402
from .experts import peer_experts  # noqa: E402
from .layer import PEER  # noqa: E402
from .usage import ExpertUsage, expert_usage  # noqa: E402

__version__ = "0.1.0"
__all__ = ["product_key_topk", "peer_experts", "PEER", "expert_usage", "ExpertUsage", "reference"]
