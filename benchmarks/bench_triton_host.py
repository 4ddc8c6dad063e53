"""Host instructions of an eager no-grad call on the triton backend, from the op's entry to its
launcher, with the triton lean entries and without them (the full path), under callgrind on a
CPU.

Every launcher the triton backend calls (kernels/*: softmax_fwd, norm_fwd, matmul_act_forward,
bias_act_forward, attention's run) is replaced by a no-op that returns outputs allocated once, so
neither the Triton interpreter nor a kernel runs: what is counted is fusedformer's and torch's
host work up to the launch (checks, selection, allocation, the launch plan), which on a GPU is
what a decode-shape call waits on besides the launch itself. The inputs are bench_overhead's
tiny tensors in float16 (linear_act takes its Triton GEMM, as on a GPU). Not counted: the
launcher's own work (the launch, attention's autotuner lookup). On a CPU the backend runs only
interpreted, so the attention plan takes the interpreter's fixed config where a GPU asks the
autotuner (inside the launch, not counted either way).

    taskset -c 1 python benchmarks/bench_triton_host.py --calls 200
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend's availability on a CPU

import fusedformer as ff  # noqa: E402
import torch  # noqa: E402
from bench_overhead import _total_instructions, op_cases  # noqa: E402  (beside this file)
from fusedformer import backends  # noqa: E402
from fusedformer._backends.tables import FAMILIES  # noqa: E402
from fusedformer.kernels import attention, bias_act, layer_norm, matmul_act, softmax  # noqa: E402
from fusedformer.vocabulary import ACTIVATIONS  # noqa: E402

FAMILY = {"softmax": "softmax", "layer_norm": "layer_norm", "rms_norm": "rms_norm", "linear_act": "linear_act",
          "feed_forward": "linear_act", "attention": "attention"}


def _replace_launchers():
    """Each launcher a no-op answering what it would have filled (allocated on its first call)."""
    kept = {}

    def once(key, make):
        if key not in kept:
            kept[key] = make()
        return kept[key]

    softmax.softmax_fwd = lambda x, y, dim: y
    layer_norm.norm_fwd = lambda x, w, b, eps, res, y, res_out, mean, rstd: (y, res_out, mean, rstd)

    def gemm(x, weight, bias, activation, *, store_preact=True, **_):
        M, N = x.shape[0], weight.shape[0]
        n_out = N // 2 if ACTIVATIONS[activation].gated else N
        return once(("gemm", M, N, activation, store_preact, x.dtype), lambda: (
            x.new_empty(M, n_out), x.new_empty(M, N) if store_preact else None))

    def epilogue(h, bias, activation, store_preact=True, out_dtype=None):
        M, N = h.shape[-2:]
        n_out = N // 2 if ACTIVATIONS[activation].gated else N
        return once(("epilogue", M, N, activation, store_preact, h.dtype), lambda: (
            h.new_empty(M, n_out, dtype=out_dtype or h.dtype), h if store_preact else None))

    matmul_act.matmul_act_forward, bias_act.bias_act_forward = gemm, epilogue
    attention.run = lambda launches: None


def _drop_lean_entries():
    """The full path: the triton implementations without lean entries, lean_choice's cache cleared."""
    for family in set(FAMILY.values()):
        impl, _ = FAMILIES[family].load("triton")
        setattr(impl, f"{family}_lean", None)
    backends.clear_selection_cache()


def child(args):
    """Under valgrind (collection off): each (path, op)'s calls with collection on, one dump each."""
    _replace_launchers()
    cases = {op: ([t.half() for t in inputs], ours) for op, (inputs, ours, _) in op_cases("cpu").items()}
    keys = []
    for path in ("lean", "full"):
        if path == "full":
            _drop_lean_entries()
        for op, (inputs, call) in cases.items():
            with torch.no_grad(), ff.use_backend("triton"):
                for _ in range(3):  # first-call costs (imports, caches) stay out
                    call(*inputs)
                torch._C._valgrind_toggle()
                for _ in range(args.calls):
                    call(*inputs)
                torch._C._valgrind_toggle_and_dump_stats()
            keys.append((path, op))
    pathlib.Path(args.keys).write_text(json.dumps(keys))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--keys", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = os.path.join(tmp, "keys.json")
        subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={tmp}/cg.out",
                        sys.executable, __file__, "--child", "--keys", keys_file, "--calls", str(args.calls)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        keys = [tuple(k) for k in json.loads(pathlib.Path(keys_file).read_text())]
        dumps = sorted(pathlib.Path(tmp).glob("cg.out.*"), key=lambda d: int(d.name.rsplit(".", 1)[1]))
        counts = dict(zip(keys, (_total_instructions(d) / args.calls for d in dumps)))
    print(f"instructions per no-grad call, backend triton, float16, launchers no-ops ({args.calls} calls)")
    print(f"{'op':<14}{'full path':>12}{'lean':>10}{'saved':>8}")
    for op in FAMILY:
        full, lean = counts[("full", op)], counts[("lean", op)]
        print(f"{op:<14}{full:>12,.0f}{lean:>10,.0f}{1 - lean / full:>8.0%}")


if __name__ == "__main__":
    main()
