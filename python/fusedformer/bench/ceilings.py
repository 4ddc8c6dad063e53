"""The device's ceilings, measured in the same run as the sweep: the bandwidth of a large
device-to-device copy and the throughput of a large bf16 matmul through torch. Every result is
also reported as a fraction of these (memory-bound ops of copy_gbps, compute-bound of
matmul_bf16_tflops)."""

import torch

from fusedformer.bench.timing import time_cpu, time_gpu


def measure(device):
    """{"copy_gbps", "matmul_bf16_tflops"} for ``device`` ('cuda' or 'cpu')."""
    cuda = torch.device(device).type == "cuda"
    # copy reads and writes n bytes: 2n bytes moved. 1 GiB on a GPU, 64 MiB on a CPU.
    n = 2**30 if cuda else 2**26
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timer = time_gpu if cuda else time_cpu
    copy_ms = timer(lambda: dst.copy_(src))
    del src, dst
    # matmul (M, K) @ (K, N): 2 M N K FLOPs. 8192^3 on a GPU, 1024^3 on a CPU.
    m = 8192 if cuda else 1024
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm_ms = timer(lambda: a @ b)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    return {"copy_gbps": 2 * n / copy_ms / 1e6, "matmul_bf16_tflops": 2 * m**3 / mm_ms / 1e9}
