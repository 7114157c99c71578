"""The CUDA code paths, run on emulated CUDA tensors (`cuda_emulation.py`). A package, so that its conftest
does not replace the root `conftest` module that other tests import from."""
