"""Triton kernels of modeconn_fast, installed as `modeconn_fast.kernels` (see setup.py's package_dir).

Triton code only: no nn.Module and no dispatch policy here; `modeconn_fast.ops` decides when they run.
"""
