"""One small case per CUDA kernel of the cuda backend, forward and backward, for the sanitizers:

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py attention
    compute-sanitizer --tool initcheck python benchmarks/sanitize_cuda.py softmax layer_norm

Shapes are odd (no block or vector size divides them) and include both the 16-byte vector path
and the scalar path (a view whose rows start 2 bytes off). Each case also compares with the
reference backend, so a run that the sanitizer passes is a numerically sane one too. Exits
non-zero on any mismatch; needs a CUDA GPU and the built fusedformer._C.
"""

import sys

import fusedformer as ff
import torch


def _close(name, got, want, tol):
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    ok = err <= tol * max(1.0, want.float().abs().max().item() if want.numel() else 0.0)
    print(f"  {name:<28} max err {err:.3e} {'ok' if ok else 'MISMATCH'}")
    return ok


def _both(fn, inputs, grad_seed=1):
    """fn on the cuda backend and on the reference: outputs and input gradients."""
    results = []
    for backend in ("cuda", "reference"):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves, backend=backend)
        g = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(grad_seed),
                        device=out.device, dtype=out.dtype)
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g)
        results.append([out, *grads])
    return results


def _check(name, fn, inputs, tol):
    ours, ref = _both(fn, inputs)
    torch.cuda.synchronize()
    return all(_close(f"{name}[{i}]", a, b, tol) for i, (a, b) in enumerate(zip(ours, ref)))


def _unaligned(shape, dtype):
    """A tensor whose rows start 2 bytes past a 16-byte boundary: the kernels' scalar path."""
    n = shape[-1]
    flat = torch.randn(shape[0] * (n + 1) + 1, device="cuda").to(dtype)
    return flat[1:1 + shape[0] * (n + 1)].view(shape[0], n + 1)[:, :n]


def softmax():
    ok = True
    for x in (torch.randn(7, 1029, device="cuda", dtype=torch.float16) * 3, _unaligned((5, 333), torch.bfloat16),
              torch.randn(3, 20000, device="cuda")):  # the last one is too long for the shared-memory cache
        ok &= _check(f"softmax {tuple(x.shape)} {x.dtype}", lambda t, backend: ff.softmax(t, -1, backend=backend),
                     [x], 2e-2)
    return ok


def layer_norm():
    ok = True
    for M, N, dtype in ((9, 1031, torch.float16), (4, 13000, torch.float32)):
        x, r = torch.randn(M, N, device="cuda", dtype=dtype), torch.randn(M, N, device="cuda", dtype=dtype)
        w, b = torch.randn(N, device="cuda", dtype=dtype), torch.randn(N, device="cuda", dtype=dtype)
        ok &= _check(f"layer_norm {M}x{N} {dtype}",
                     lambda x, r, w, b, backend: ff.layer_norm(x, (N,), w, b, residual=r, backend=backend)[0],
                     [x, r, w, b], 3e-2)
    x = _unaligned((6, 77), torch.bfloat16)
    ok &= _check("layer_norm unaligned", lambda x, backend: ff.layer_norm(x, (77,), backend=backend), [x], 5e-2)
    return ok


def rms_norm():
    x = torch.randn(11, 517, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(517, device="cuda", dtype=torch.bfloat16)
    return _check("rms_norm 11x517", lambda x, w, backend: ff.rms_norm(x, (517,), w, 1e-6, backend=backend),
                  [x, w], 5e-2)


def linear_act():
    ok = True
    for act in ("gelu", "swiglu"):
        x = torch.randn(13, 40, device="cuda", dtype=torch.float16)
        w = torch.randn(2 * 37, 40, device="cuda", dtype=torch.float16) / 40**0.5
        b = torch.randn(2 * 37, device="cuda", dtype=torch.float16)
        ok &= _check(f"linear_act {act}",
                     lambda x, w, b, backend, act=act: ff.linear_act(x, w, b, act, backend=backend), [x, w, b], 3e-2)
    return ok


def attention():
    ok = True
    for D, causal, mask in ((64, False, "pad"), (128, True, None), (64, False, "float")):
        B, H, Hkv, Lq, Lk = 2, 4, 2, 67, 45
        q = torch.randn(B, H, Lq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, Lk, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, Lk, D, device="cuda", dtype=torch.bfloat16)
        m = None
        if mask == "pad":  # key padding, and batch 1 has a fully masked query row via a 4-D mask
            lengths = torch.tensor([Lk, 30], device="cuda")
            m = torch.arange(Lk, device="cuda")[None, None, None, :] < lengths[:, None, None, None]
            m = m.expand(B, 1, Lq, Lk).clone()
            m[1, 0, 3] = False
        elif mask == "float":
            m = torch.randn(1, H, Lq, Lk, device="cuda")
        ok &= _check(f"attention D={D} causal={causal} mask={mask}",
                     lambda q, k, v, backend, m=m, c=causal: ff.scaled_dot_product_attention(
                         q, k, v, m, is_causal=c, enable_gqa=True, backend=backend),
                     [q, k, v], 5e-2)
    return ok


CASES = {"softmax": softmax, "layer_norm": layer_norm, "rms_norm": rms_norm, "linear_act": linear_act,
         "attention": attention}


def main(names):
    if not torch.cuda.is_available():
        print("sanitize_cuda: needs a CUDA GPU", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"sanitize_cuda: unknown case(s) {unknown}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    ok = True
    for name in names or CASES:
        print(name)
        ok &= CASES[name]()
    torch.cuda.synchronize()
    print("all ok" if ok else "MISMATCHES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
