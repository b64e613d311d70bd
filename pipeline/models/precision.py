"""The precision rule, once: what a model runs in and what its rows record.

Torch-free, so the coordinator (which records it) and the encoder actors (which run it) share
it without the coordinator importing torch.
"""

from __future__ import annotations


def run_precision(declared: str, on_gpu: bool) -> str:
    """A model's declared autocast dtype on a GPU ("fp16", "bf16", "fp32"); fp32 on a CPU."""
    return declared if on_gpu else "fp32"


def precision_label(declared: str, on_gpu: bool, tf32: bool = False) -> str:
    """What a row records: the run precision, "+tf32" where fp32 matmuls run as TF32."""
    p = run_precision(declared, on_gpu)
    return p + "+tf32" if tf32 and on_gpu and p == "fp32" else p
