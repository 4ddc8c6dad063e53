"""``fusedformer info | parity | bench | demo`` (also ``python -m fusedformer``)."""

import argparse
import platform
import sys

import torch

import fusedformer as ff
from fusedformer import backends
from fusedformer._build_info import build_record
from fusedformer._files import output_problem


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
    if backends._triton_import_error() is None:
        import triton

        from fusedformer._backends.tables import FAMILIES
        from fusedformer._backends.triton_floors import summary

        print(f"{'triton floors':<14} {summary(triton.__version__, FAMILIES)}")
    if torch.cuda.is_available():
        device = "cuda"
        sm = "".join(map(str, torch.cuda.get_device_capability()))
        print(f"{'device':<14} {torch.cuda.get_device_name()} (sm_{sm})")
    else:
        device = "cpu"
        note = " (TRITON_INTERPRET=1: triton kernels run interpreted)" if backends.triton_interpreted() else ""
        print(f"{'device':<14} cpu, no CUDA GPU visible{note}")
    ext = backends.cuda_extension()
    print(f"{'_C':<14} {'built: ' + ext.__file__ if ext else backends._cuda_extension_error()}")
    print(f"{'_C build':<14} {_describe_build(build_record())}")
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


def _describe_build(record):
    if record is None:
        return "no build record (FUSEDFORMER_BUILD_CUDA=0 or no nvcc at install, or _C built by setup.py build_ext)"
    where = f"FUSEDFORMER_BUILD_CUDA={record.get('mode')}, nvcc {record.get('nvcc')}"
    if record.get("cuda_build") == "built":
        return f"built for {', '.join(record.get('targets', []))} in {record.get('seconds')} s ({where})"
    return f"FAILED at install ({where}): {record.get('error')}"


def parity(args):
    from fusedformer import parity as harness

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = harness.run_full(backends=args.backend, dtypes=args.dtype, device=device, quick=not args.full,
                              ops=args.op)
    rows, agreement = result["rows"], result["agreement"]
    print(harness.format_table(rows, agreement))
    if args.out:
        harness.write_json(rows, device, args.out, agreement)
        print(f"wrote {args.out}")
    failed = harness.failures(rows)
    problems = [f"{len(failed)} row(s) outside 2x PyTorch's own error"] if failed else []
    # a backend asked for by name that ran nothing checked nothing: that is no pass
    for name in args.backend or []:
        mine = [r for r in rows if r["backend"] == name]
        if not any(r["ok"] is not None for r in mine):
            why = sorted({r["skipped"] for r in mine if r["skipped"]})
            problems.append(f"backend {name!r} ran no case" + (f" ({'; '.join(why)[:300]})" if why else ""))
    if not rows:
        problems.append("no case matched the selection")
    for problem in problems:
        print(f"parity FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def bench(args):
    from fusedformer import bench as harness

    preset = "full" if args.full else "tiny" if args.tiny else "headline" if args.headline else "quick"
    doc = harness.run(ops=args.op, preset=preset, dtypes=args.dtype, device=args.device, providers=args.provider,
                      passes=args.pass_, max_seconds=args.max_seconds, progress=not args.no_progress)
    paths = harness.write(doc, args.out)
    print(harness.markdown(doc))
    print(f"wrote {paths['json']} and {paths['markdown']}")
    plots = paths["plots"]
    print(f"plots: {plots}" if isinstance(plots, str) else f"wrote {len(plots)} plots under {args.out}/plots")
    print(f"to keep it: cp {paths['json']} benchmarks/results/{harness.results_name(doc)}.json "
          f"(and .md likewise)")
    ran = [r for r in doc["rows"] if not r["skipped"]]
    return 0 if ran else 1


def demo(args):
    from fusedformer import demo as demo_mod

    return demo_mod.main(seconds=args.seconds, device=args.device)


def _parity_ops():
    from fusedformer.parity import default_cases

    return sorted({case.op for case in default_cases(quick=False)})


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fusedformer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fusedformer {ff.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends run which ops (and why not)")
    p = sub.add_parser("parity", help="error of each backend against the float64 reference, next to torch's")
    p.add_argument("--backend", action="append", choices=backends.BACKENDS, help="repeatable; default: all available")
    p.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16", "float64"],
                   help="repeatable; default: float32, float16, bfloat16")
    p.add_argument("--op", action="append", choices=_parity_ops(), help="repeatable; default: every op")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the default cases (default)")
    size.add_argument("--full", action="store_true", help="larger shapes too")
    p.add_argument("--out", help="write the results JSON here (checked before any case runs)")
    from fusedformer.bench import OPS, PASSES, PROVIDERS

    b = sub.add_parser("bench", help="time every op against torch and the other libraries, beside the "
                                     "device's copy and matmul ceilings")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few shapes per op, fwd and fwd+bwd (default)")
    size.add_argument("--full", action="store_true", help="more shapes, fwd, bwd and fwd+bwd")
    size.add_argument("--tiny", action="store_true", help="toy shapes: checks the harness, measures nothing useful")
    size.add_argument("--headline", action="store_true",
                      help="the README's performance table: the GPU check's shapes and competitors")
    b.add_argument("--op", action="append", choices=list(OPS), help="repeatable; default: every op")
    b.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"],
                   help="repeatable; default: bfloat16 on a GPU, float32 on a CPU")
    b.add_argument("--provider", action="append", choices=list(PROVIDERS), help="repeatable; default: all")
    b.add_argument("--pass", dest="pass_", action="append", choices=list(PASSES),
                   help="repeatable; default: the preset's")
    b.add_argument("--device", help="default: cuda if available, else cpu")
    b.add_argument("--max-seconds", type=float, help="stop timing after this long; the rest is reported skipped")
    b.add_argument("--out", default="out/bench",
                   help="directory for bench.json, bench.md, plots/ (default: %(default)s)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = sub.add_parser("demo", help="build a small GPT and BERT, check parity, train briefly on bundled text")
    d.add_argument("--seconds", type=float, default=None,
                   help="GPT training time per backend, BERT a third of it (default: 30 on CPU, 20 on GPU)")
    d.add_argument("--device", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    if args.command == "parity" and args.dtype is None:
        args.dtype = ["float32", "float16", "bfloat16"]
    out_kind = {"parity": "file", "bench": "directory"}.get(args.command)
    if out_kind and args.out and (problem := output_problem(args.out, out_kind)):
        parser.error(f"--out: {problem}")
    return {"info": info, "parity": parity, "bench": bench, "demo": demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
