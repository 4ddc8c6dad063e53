"""The torch backend: the op table on torch's own fused implementations (aten kernels), on any
device where they exist. It is the CPU path of ``auto``; the reference stays the oracle."""
