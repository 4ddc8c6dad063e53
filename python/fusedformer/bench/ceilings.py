"""The device's ceilings, measured in the same run as the sweep: the bandwidth of a large
device-to-device copy and the throughput of a large bf16 matmul through torch. Every result is
also reported as a fraction of these (memory-bound ops of copy_gbps, compute-bound of
matmul_bf16_tflops)."""

import torch

from fusedformer.bench.timing import timing


def copy_gbps(device, nbytes):
    """A copy reads and writes ``nbytes``: 2 * nbytes moved per call."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return 2 * nbytes / timing(device, lambda: dst.copy_(src)).median_ms / 1e6


def matmul_bf16_tflops(device, n):
    """(n, n) @ (n, n) in bf16: 2 n^3 FLOPs per call."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timing(device, lambda: a @ b).median_ms / 1e9


def measure(device):
    """{"copy_gbps", "matmul_bf16_tflops"} for ``device``: 1 GiB copy and 8192^3 matmul on a GPU,
    64 MiB and 1024^3 on a CPU."""
    cuda = torch.device(device).type == "cuda"
    result = {"copy_gbps": copy_gbps(device, 2**30 if cuda else 2**26),
              "matmul_bf16_tflops": matmul_bf16_tflops(device, 8192 if cuda else 1024)}
    if cuda:
        torch.cuda.empty_cache()
    return result
