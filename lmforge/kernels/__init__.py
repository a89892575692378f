"""Inference kernels, and the module swaps that install them on a model the caller owns.

    model = lmforge.kernels.install(model)     # in place; idempotent; a no-op where nothing applies
    model = lmforge.kernels.uninstall(model)   # plain modules again (ONNX export, training)

    rows.py / rows.cpp  lmforge's CPU decode kernels: few-row matmuls (fp32, bf16, int8 weights) and
                        few-query attention, compiled on first use
    decode.py           DecodeLinear / DecodeAttention and install / uninstall (PyTorch's faster
                        layouts where the C++ kernel did not build)
    hugepages.py        the weights moved into transparent huge pages
    quant.py            the matmuls of weight-only int8/int4 layers (compress/qlinear.py)

`lmforge.load` installs them; a model built by hand (model.build) stays plain until the caller does.
The engine (infer/engine.py) never changes the model it is given.
"""

from lmforge.kernels.decode import install, installed, uninstall

__all__ = ["install", "installed", "uninstall"]
