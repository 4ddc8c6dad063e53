"""``fusedformer info | parity | demo`` (also ``python -m fusedformer``)."""

import argparse
import platform
import sys

import torch

import fusedformer as ff
from fusedformer import backends


def _versions():
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({exc.__class__.__name__})"
    return {"fusedformer": ff.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "cuda (torch)": torch.version.cuda or "none"}


def info(args):
    for name, version in _versions().items():
        print(f"{name:<14} {version}")
    if torch.cuda.is_available():
        device = "cuda"
        print(f"{'device':<14} {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        device = "cpu"
        note = " (TRITON_INTERPRET=1: triton kernels run interpreted)" if backends.triton_interpreted() else ""
        print(f"{'device':<14} cpu, no CUDA GPU visible{note}")
    ext = backends.cuda_extension()
    print(f"{'_C':<14} {'built: ' + ext.__file__ if ext else backends._cuda_extension_error()}")
    print(f"\nbackends on {device}:")
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name, device)
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"\nops x backends on {device} (yes, or why not):")
    matrix = backends.backend_matrix(device)
    for family, row in matrix.items():
        cells = "  ".join(f"{b}={'yes' if r is None else 'no'}" for b, r in row.items())
        print(f"  {family:<11} {cells}")
        for b, r in row.items():
            if r is not None and backends.unavailable_reason(b, device) is None:
                print(f"  {'':<11}   {b}: {r}")
    return 0


def parity(args):
    from fusedformer import parity as harness

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = harness.run(backends=args.backend, dtypes=args.dtype, device=device, quick=not args.full, ops=args.op)
    print(harness.format_table(rows))
    if args.out:
        harness.write_json(rows, device, args.out)
        print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


def demo(args):
    info(args)
    print("\nparity of the available backends against the float64 reference:")
    if not torch.cuda.is_available():
        print("(no CUDA GPU: this machine runs the reference backend, the pure-PyTorch fallback)")
    parity_args = argparse.Namespace(device=None, backend=None, dtype=["float32", "bfloat16"], full=False,
                                     op=None, out=None)
    return parity(parity_args)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fusedformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends run which ops (and why not)")
    p = sub.add_parser("parity", help="error of each backend against the float64 reference, next to torch's")
    p.add_argument("--backend", action="append", choices=backends.BACKENDS, help="repeatable; default: all available")
    p.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16", "float64"],
                   help="repeatable; default: float32, float16, bfloat16")
    p.add_argument("--op", action="append", help="repeatable; default: every op")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--full", action="store_true", help="larger shapes too")
    p.add_argument("--out", help="write the results JSON here")
    sub.add_parser("demo", help="the demo: info, then parity")
    args = parser.parse_args(argv)
    if args.command == "parity" and args.dtype is None:
        args.dtype = ["float32", "float16", "bfloat16"]
    return {"info": info, "parity": parity, "demo": demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
