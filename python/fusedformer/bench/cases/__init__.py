"""One file per benchmarked op. Each module defines

    SHAPES    {"tiny": [...], "cpu": [...], "quick": [...], "full": [...]}: shape dicts
    make(shape, dtype, device) -> (inputs, static, diff): tensors, keyword constants, and the
                                   positions of the inputs a backward differentiates
    work(shape, pass_, dtype) -> (flops, bytes): what one call counts (the other is None)
    providers(device, shape) -> {provider: fn(*inputs, **static), or the reason it cannot run}
"""

from fusedformer.bench.cases import attention, feed_forward, layer_norm, linear_act, rms_norm, softmax

OPS = {"attention": attention, "softmax": softmax, "layer_norm": layer_norm, "rms_norm": rms_norm,
       "linear_act": linear_act, "feed_forward": feed_forward}
