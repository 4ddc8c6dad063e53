"""Host overhead of fusedformer against the torch ops it replaces, side by side in one run.

Parts (``--part``, repeatable; default ops, models, memory):

- ``ops``: per-call time of every public op on tiny tensors against the torch op(s) it replaces,
  with and without grad (with grad: forward + autograd.grad). Every repetition times each
  candidate for ``--calls`` calls, candidates in a fresh random order per repetition
  (interleaved); the row gives the median over ``--reps`` repetitions and the 25-75% spread.
  Grad mode and the backend are set once around a repetition's calls (torch.no_grad(),
  ff.use_backend per ``--backends`` entry), not per call: the figure is the op call alone, so
  the reference (the old CPU ``auto``) and torch (the new one) appear in the same run.
- ``callgrind``: the ``ops`` candidates again, as instructions per call under valgrind's callgrind
  (repeatable where wall time on a shared machine is not): the script re-runs itself under
  valgrind with collection off, toggling it on around each candidate's calls.
- ``models``: Hugging Face GPT-2, Llama and BERT from small configs (``--layers`` layers, hidden
  256, sequence 128, batch 4, dropout 0, nothing downloaded), unpatched (attn_implementation
  'sdpa') against a deep copy patched with ff.patch (one per backend), forward (eval, no grad)
  and a training step (forward, loss backward, SGD step), interleaved.
- ``memory``: attention forward + backward peak memory (B=1, H=8, D=64, L in ``--lengths``),
  each provider in a fresh subprocess: the Linux peak RSS (VmHWM) is reset after the inputs exist
  (``echo 5 > /proc/self/clear_refs``) and read after the backward; the figure is VmHWM minus
  the RSS before the call. Large tensors are mmapped by malloc and returned on free, so RSS
  follows tensor memory.

On a CPU everything runs on one thread (torch.set_num_threads(1)); pin the process too for less
noise: ``taskset -c 1 python benchmarks/bench_overhead.py``. On a GPU ``ops`` reports two figures
per call from the same repetitions: host time and device time. Before each repetition a
``torch.cuda._sleep`` kernel, calibrated to outlast the repetition's host loop, holds the GPU, so
no launch waits for it: the CPU clock around the loop measures the host's work alone (a hidden
synchronize would show as the whole sleep), and CUDA events recorded after the sleep and after
the loop time the queued kernels back to back, without the host's gaps. Host time above device
time means the op is host-bound at that shape: what decides decode-shape speed.

    python benchmarks/bench_overhead.py --out benchmarks/results     # writes <device>-<date>-overhead.json/.md
    python benchmarks/bench_overhead.py --part ops --backends torch --reps 5
    python benchmarks/bench_overhead.py --readme      # README's CPU table from the newest cpu-*-overhead.json
"""

import argparse
import contextlib
import copy
import datetime
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

import fusedformer as ff
import torch
import torch.nn.functional as F
from gpu_clock import GpuClock  # beside this file
from overhead_report import markdown, median_ratios, ratio_rows, summary, write_readme

PARTS = ("ops", "callgrind", "models", "memory")


# --------------------------------------------------------------------------------------------
# ops: each public op and the torch op(s) it replaces, on tiny tensors
# --------------------------------------------------------------------------------------------


def op_cases(device):
    """{op: (inputs, fusedformer call, torch call)}."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    x, w, b = randn(4, 64), randn(64), randn(64)
    w1, b1, w2, b2 = randn(128, 64), randn(128), randn(64, 128), randn(64)
    q, k, v = randn(1, 2, 8, 16), randn(1, 2, 8, 16), randn(1, 2, 8, 16)
    return {
        "softmax": ((x,), lambda x: ff.softmax(x, -1), lambda x: torch.softmax(x, -1)),
        "layer_norm": ((x, w, b), lambda x, w, b: ff.layer_norm(x, (64,), w, b),
                       lambda x, w, b: F.layer_norm(x, (64,), w, b)),
        "rms_norm": ((x, w), lambda x, w: ff.rms_norm(x, (64,), w, 1e-6), lambda x, w: F.rms_norm(x, (64,), w, 1e-6)),
        "linear_act": ((x, w1, b1), lambda x, w, b: ff.linear_act(x, w, b, "gelu"),
                       lambda x, w, b: F.gelu(F.linear(x, w, b))),
        "feed_forward": ((x, w1, b1, w2, b2), lambda *a: ff.feed_forward(*a, "gelu"),
                         lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)),
        "attention": ((q, k, v), lambda q, k, v: ff.scaled_dot_product_attention(q, k, v, is_causal=True),
                      lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    }


def _runner(fn, inputs, grad, backend):
    """``run(n)``: n calls of ``fn`` (forward, or forward + autograd.grad), with grad mode and
    the backend set once around them."""
    if grad:
        inputs = [t.detach().requires_grad_() for t in inputs]
        grad_out = torch.ones_like(fn(*inputs))

        def call():
            torch.autograd.grad(fn(*inputs), inputs, grad_out)
    else:
        def call():
            fn(*inputs)
    grad_mode = contextlib.nullcontext if grad else torch.no_grad

    def run(n):
        with grad_mode(), _backend(backend):
            for _ in range(n):
                call()
    return run


def _backend(name):
    return ff.use_backend(name) if name is not None else contextlib.nullcontext()


def candidates(device, backends, ops=None):
    """{(op, grad, provider): callable}; provider 'torch' or 'ff-<backend>'."""
    out = {}
    for op, (inputs, ours, theirs) in op_cases(device).items():
        if ops and op not in ops:
            continue
        for grad in (False, True):
            out[(op, grad, "torch")] = _runner(theirs, inputs, grad, None)
            for name in backends:
                out[(op, grad, f"ff-{name}")] = _runner(ours, inputs, grad, name)
    return out


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns, reps, calls, device, seed=0):
    """({key: [host us per call, one per repetition]}, {key: [device us per call]} on a GPU, else
    None): each repetition runs every ``fn(calls)``, the fns in a fresh random order."""
    clock = GpuClock(fns, calls) if torch.device(device).type == "cuda" else None
    for fn in fns.values():  # warm-up: first-call costs (allocator, caches, JIT) stay out
        fn(3)
    _sync(device)
    host = {key: [] for key in fns}
    on_device = {key: [] for key in fns} if clock else None
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for key in order:
            if clock:
                host_s, device_s = clock.time(key, fns[key])
                on_device[key].append(device_s / calls * 1e6 if device_s is not None else float("nan"))
            else:
                t0 = time.perf_counter()
                fns[key](calls)
                host_s = time.perf_counter() - t0
            host[key].append(host_s / calls * 1e6)
    return host, on_device


def run_ops(args):
    fns = candidates(args.device, args.backends, args.ops)
    host, on_device = interleaved(fns, args.reps, args.calls, args.device)
    rows = ratio_rows(host, "us_per_call")
    if on_device is not None:
        for row in rows:
            row["device_us_per_call"] = summary(on_device[(row["op"], row["grad"], row["provider"])])
    return rows


# --------------------------------------------------------------------------------------------
# callgrind: instructions per call
# --------------------------------------------------------------------------------------------


def callgrind_child(args):
    """Under valgrind (collection off): toggle collection on around each candidate's calls and dump."""
    fns = candidates("cpu", args.backends, args.ops)
    keys = list(fns)
    for fn in fns.values():
        fn(3)
    for key in keys:
        torch._C._valgrind_toggle()
        fns[key](args.calls)
        torch._C._valgrind_toggle_and_dump_stats()
    pathlib.Path(args.callgrind_keys).write_text(json.dumps([list(k) for k in keys]))


def run_callgrind(args):
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = os.path.join(tmp, "keys.json")
        cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={tmp}/cg.out",
               sys.executable, __file__, "--callgrind-child", "--callgrind-keys", keys_file,
               "--calls", str(args.calls), "--backends", *args.backends] + (["--ops", *args.ops] if args.ops else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        keys = [tuple(k) for k in json.loads(pathlib.Path(keys_file).read_text())]
        dumps = sorted(pathlib.Path(tmp).glob("cg.out.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
        counts = [_total_instructions(p) / args.calls for p in dumps]
    assert len(counts) == len(keys), f"callgrind wrote {len(counts)} dumps for {len(keys)} candidates"
    return ratio_rows(dict(zip(keys, counts)), "instructions_per_call")


def _total_instructions(path):
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


# --------------------------------------------------------------------------------------------
# models: patched vs unpatched Hugging Face models
# --------------------------------------------------------------------------------------------


def hf_models(layers):
    """{name: model} from small configs: hidden 256, 4 heads, dropout 0, sdpa attention."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    vocab, hidden = 1000, 256
    return {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           attn_implementation="sdpa")),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=688,
                                              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256, attn_implementation="sdpa")),
        "bert": BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                           num_attention_heads=4, intermediate_size=1024, hidden_dropout_prob=0.0,
                                           attention_probs_dropout_prob=0.0, attn_implementation="sdpa")),
    }


def _model_step(model, batch, train, backend):
    """``run(n)``: n forward passes (eval, no grad) or training steps."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4) if train else None

    def step():
        if train:
            model.train()
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()
        else:
            model.eval()
            with torch.no_grad():
                model(**batch)

    def run(n):
        with _backend(backend):
            for _ in range(n):
                step()
    return run


def run_models(args):
    torch.manual_seed(0)
    fns = {}
    for name, model in hf_models(args.layers).items():
        ids = torch.randint(0, 1000, (args.batch, args.seq))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        patched = ff.patch(copy.deepcopy(model), backend=None)
        for train in (False, True):
            fns[(name, train, "torch")] = _model_step(model, batch, train, None)
            for backend in args.backends:
                fns[(name, train, f"ff-{backend}")] = _model_step(patched, batch, train, backend)
    samples, _ = interleaved(fns, args.model_reps, 1, "cpu")
    rows = ratio_rows({k: [t / 1e3 for t in v] for k, v in samples.items()}, "ms_per_step")
    for r in rows:
        r["model"], r["pass"] = r.pop("op"), "train" if r.pop("grad") else "forward"
        r["provider"] = {"torch": "unpatched"}.get(r["provider"], r["provider"].replace("ff-", "patched-"))
    return rows


# --------------------------------------------------------------------------------------------
# memory: attention forward + backward peak RSS, one subprocess per provider
# --------------------------------------------------------------------------------------------


def _status_kb(field):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(provider, length):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, length, 64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, 8, length, 64)
    if provider == "torch":
        def fn():
            return F.scaled_dot_product_attention(q, k, v)
    else:
        def fn():
            return ff.scaled_dot_product_attention(q, k, v, backend=provider.replace("ff-", ""))
    before = _status_kb("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    torch.autograd.grad(fn(), (q, k, v), grad_out)
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def run_memory(args):
    rows = []
    for length in args.lengths:
        for provider in ["torch"] + [f"ff-{b}" for b in args.backends]:
            out = subprocess.run([sys.executable, __file__, "--memory-child", provider, "--lengths", str(length)],
                                 check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append({"L": length, "provider": provider, **json.loads(out.stdout.strip().splitlines()[-1])})
        base = next(r["peak_mb"] for r in rows if r["L"] == length and r["provider"] == "torch")
        for r in rows:
            if r["L"] == length:
                r["ratio_to_torch"] = r["peak_mb"] / base
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", action="append", choices=PARTS, help="repeatable; default: ops, models, memory")
    p.add_argument("--backends", nargs="+", default=["reference", "torch"], help="fusedformer backends to time")
    p.add_argument("--ops", nargs="+", help="a subset of the ops")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--calls", type=int, help="calls per repetition (default 200; 50 on a GPU, whose launch "
                   "queue must hold a repetition's kernels behind the sleep)")
    p.add_argument("--model-reps", type=int, default=7)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048])
    p.add_argument("--out", help="directory for <device>-<date>-overhead.json and .md")
    p.add_argument("--readme", action="store_true", help="only regenerate README.md's CPU table from the newest "
                   "(or --results) cpu-*-overhead.json")
    p.add_argument("--results", help="with --readme: the results file")
    p.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--callgrind-keys", help=argparse.SUPPRESS)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.readme:
        return write_readme(args.results)
    if args.calls is None:
        args.calls = 50 if torch.device(args.device).type == "cuda" else 200
    torch.set_num_threads(1)
    if args.memory_child:
        return memory_child(args.memory_child, args.lengths[0])
    if args.callgrind_child:
        return callgrind_child(args)
    parts = args.part or ["ops", "models", "memory"]
    device = torch.device(args.device)
    doc = {"kind": "overhead", "date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "versions": {"torch": torch.__version__, "fusedformer": ff.__version__}, "threads": 1,
           "method": (f"one thread; ops: {args.calls} calls per sample, {args.reps} interleaved samples, median and "
                      f"p25-p75; callgrind: instructions per call over {args.calls} calls; models: "
                      f"{args.model_reps} interleaved steps each ({args.layers} layers, hidden 256, seq {args.seq}, "
                      f"batch {args.batch}); memory: VmHWM above the RSS before the call, fresh process each")}
    runs = {"ops": run_ops, "callgrind": run_callgrind, "models": run_models, "memory": run_memory}
    for part in parts:
        doc[part] = runs[part](args)
        print(f"{part}: done", file=sys.stderr)
    # the target's figure: median over ops of each provider's ratio to torch, tiny tensors, no grad
    doc["summary"] = {measure: {f"ff-{b}": median_ratios(doc[part], f"ff-{b}") for b in args.backends}
                      for measure, part in (("wall", "ops"), ("instructions", "callgrind")) if part in doc}
    text = markdown(doc)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = "cpu" if device.type == "cpu" else doc["device"].lower().replace(" ", "-")
        stem = out / f"{slug}-{doc['date']}-overhead"
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
        stem.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
