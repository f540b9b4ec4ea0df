"""Hand-written eager PyTorch implementations of stdlib models, the baselines of `python -m bench`.

Each is written the way a PyTorch user would write the model from its paper (nn.Linear, nn.RMSNorm,
F.scaled_dot_product_attention, a cached rotary table, torch.func for the inner gradient), without
looking at or reusing archc's generated code or runtime; `load_archc_state` maps a generated
module's state_dict onto it, and tests/test_bench.py checks both compute the same function.
"""
from bench.reference.depth_recurrent import DepthRecurrentRef
from bench.reference.hrm import HRMRef
from bench.reference.mor import MoRRef
from bench.reference.titans import TitansMACRef

REFERENCES = {
    "depth_recurrent": DepthRecurrentRef,
    "hrm": HRMRef,
    "mor": MoRRef,
    "titans": TitansMACRef,
}

__all__ = ["REFERENCES", "DepthRecurrentRef", "HRMRef", "MoRRef", "TitansMACRef"]
