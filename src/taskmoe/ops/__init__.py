"""Stateless sequence ops; each fast form has a plain-loop ``*_ref`` twin and a one-step form.

- :mod:`~taskmoe.ops.causal_conv`: dilated depthwise (optionally gated) causal convolution.
- :mod:`~taskmoe.ops.linear_attention`: chunked causal linear attention with per-head decay.
- :mod:`~taskmoe.ops.selective_scan`: Mamba-style selective scan (chunked two-level scan).
- :mod:`~taskmoe.ops.kernels`: optional CUDA kernels (``fla-core``, ``mamba-ssm``) and their dispatch.
"""

from taskmoe.ops.causal_conv import causal_conv, causal_conv_ref, causal_conv_step
from taskmoe.ops.linear_attention import linear_attention, linear_attention_ref, linear_attention_step
from taskmoe.ops.selective_scan import selective_scan, selective_scan_ref, selective_scan_step

__all__ = [
    "causal_conv", "causal_conv_ref", "causal_conv_step",
    "linear_attention", "linear_attention_ref", "linear_attention_step",
    "selective_scan", "selective_scan_ref", "selective_scan_step",
]
