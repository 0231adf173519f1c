"""The torch backend: the reference kernels, the graph executor and its CPU and CUDA fast paths."""
