"""Quantization: per-tensor projections and Binary-Relax / Binary-Connect as optax transformations."""

from enquant.quant.projections import binary_codes
from enquant.quant.projections import dequantize
from enquant.quant.projections import make_codes
from enquant.quant.projections import make_projection
from enquant.quant.projections import mbit_codes
from enquant.quant.projections import per_member
from enquant.quant.projections import project_binary
from enquant.quant.projections import project_mbit
from enquant.quant.projections import project_ternary
from enquant.quant.projections import ternary_codes
from enquant.quant.projections import MBIT_METHODS
from enquant.quant.projections import TERNARY_METHODS
from enquant.quant.relax import binary_connect
from enquant.quant.relax import binary_relax
from enquant.quant.relax import BinaryRelaxState
from enquant.quant.relax import conv_kernel_mask
from enquant.quant.relax import float_weights
from enquant.quant.relax import path_names
from enquant.quant.relax import quantized
from enquant.quant.relax import relaxed_weights
from enquant.quant.relax import resolve_mask
from enquant.quant.relax import snap_params

__all__ = [
    "BinaryRelaxState",
    "MBIT_METHODS",
    "TERNARY_METHODS",
    "binary_codes",
    "binary_connect",
    "binary_relax",
    "conv_kernel_mask",
    "dequantize",
    "float_weights",
    "make_codes",
    "make_projection",
    "path_names",
    "mbit_codes",
    "per_member",
    "project_binary",
    "project_mbit",
    "project_ternary",
    "quantized",
    "relaxed_weights",
    "resolve_mask",
    "snap_params",
    "ternary_codes",
]
