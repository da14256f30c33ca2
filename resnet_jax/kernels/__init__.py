"""Fast CPU kernels for the train step: oneDNN convolutions and BatchNorm as XLA
FFI custom calls (`onednn.py`, built from `csrc/onednn_ops.cc` on first use or
by `python -m resnet_jax.kernels build`), a transpose-free convolution kernel
gradient (`cpu_conv.py`), and the allocator settings that keep XLA:CPU's step
buffers resident (`host_memory.py`)."""
