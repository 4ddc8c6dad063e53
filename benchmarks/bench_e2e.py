"""End-to-end benchmark of ff.patch on Hugging Face models: a GPT-2-small-shaped training step
(``e2e-gpt2-train``) and BERT-base-shaped inference (``e2e-bert-infer``), randomly initialized
from configs (nothing downloaded), against HF eager (sdpa attention) and torch.compile.

Providers (the ``compiled`` field of ``shape`` says whether torch.compile wraps the model):
  torch-eager          HF model, attn_implementation='sdpa'
  torch-compile        the same under torch.compile
  fusedformer-triton   ff.patch(model, backend='triton'), eager and compiled
  fusedformer-cuda     ff.patch(model, backend='cuda'), eager and compiled
  fusedformer-reference  (only with --device cpu: a smoke run of this script, not a benchmark)

Rows follow the results format (docs/results-format.md), plus ``tokens_per_s`` and ``peak_mem_gb``. ``tflops``
counts the model's matmul FLOPs (2 per weight per token forward, x3 with backward, plus attention
QK^T and PV); ``frac_of_ceiling`` divides it by the bf16 matmul ceiling measured in the same run.

    python benchmarks/bench_e2e.py                       # both ops, GPU, writes benchmarks/results/
    python benchmarks/bench_e2e.py --op e2e-bert-infer --batch 32 --seq 512
    python benchmarks/bench_e2e.py --device cpu --tiny   # CPU smoke run of the script itself
"""

import argparse
import contextlib
import datetime
import json
import pathlib
import sys
import time

import torch

OPS = ("e2e-gpt2-train", "e2e-bert-infer")


def gpt2_model(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    size = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=512) if tiny else dict(
        n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)
    # dropout 0: the fused MLP path and the attention kernel run in training (as modern LM training does)
    cfg = GPT2Config(**size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


def bert_model(tiny):
    from transformers import BertConfig, BertModel

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                vocab_size=512) if tiny else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                  intermediate_size=3072, vocab_size=30522)
    return BertModel(BertConfig(**size, attn_implementation="sdpa"), add_pooling_layer=False)


def model_flops(model, tokens, batch, seq, layers, hidden, train):
    """Matmul FLOPs of one step: weights (embeddings excluded, the tied LM head included) and the
    attention's two batched matmuls (halved when causal is not counted: we count the full square)."""
    n_weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n
                    and "wpe" not in n and "embeddings" not in n)
    if hasattr(model, "lm_head"):
        n_weights += model.lm_head.weight.numel()
    fwd = 2 * n_weights * tokens + 4 * batch * seq * seq * hidden * layers
    return 3 * fwd if train else fwd


def measure_ceilings(device):
    if device.type != "cuda":
        return {"copy_gbps": None, "matmul_bf16_tflops": None}
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() / ms / 1e6
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    ms = do_bench(lambda: a @ a)
    return {"copy_gbps": copy_gbps, "matmul_bf16_tflops": 2 * 8192 ** 3 / ms / 1e9}


def timed(step, device, warmup, iters):
    """Median ms of ``step()`` after warm-up (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def providers(device):
    import fusedformer as ff

    names = ["torch-eager", "torch-compile"]
    for backend in ("triton", "cuda"):
        if device.type == "cuda" and backend in ff.available_backends(device):
            names += [f"fusedformer-{backend}", f"fusedformer-{backend}+compile"]
    if device.type == "cpu":
        names += ["fusedformer-reference"]
    return names


def build(op, provider, device, dtype, tiny):
    import fusedformer as ff

    model = (gpt2_model if op == "e2e-gpt2-train" else bert_model)(tiny).to(device, dtype)
    compiled = provider.endswith("+compile") or provider == "torch-compile"
    backend = provider.split("-", 1)[1].removesuffix("+compile") if provider.startswith("fusedformer") else None
    report = None
    if backend is not None:
        _, report = ff.patch(model, backend=backend, return_report=True)
    runner = torch.compile(model) if compiled else model
    return model, runner, compiled, report


def run_one(op, provider, device, dtype, batch, seq, tiny, warmup, iters):
    torch.manual_seed(0)
    model, runner, compiled, report = build(op, provider, device, dtype, tiny)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    train = op == "e2e-gpt2-train"
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            opt.zero_grad(set_to_none=True)
            runner(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
    else:
        model.eval()
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)

        def step():
            with torch.inference_mode():
                runner(input_ids=ids, attention_mask=mask)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    ms = timed(step, device, warmup, iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    layers = getattr(cfg, "n_layer", None) or cfg.num_hidden_layers
    hidden = getattr(cfg, "n_embd", None) or cfg.hidden_size
    flops = model_flops(model, batch * seq, batch, seq, layers, hidden, train)
    row = {"op": op, "provider": provider.removesuffix("+compile"), "dtype": str(dtype).removeprefix("torch."),
           "pass": "fwd+bwd" if train else "fwd",
           "shape": {"B": batch, "L": seq, "layers": layers, "hidden": hidden, "compiled": compiled},
           "ms": ms, "tflops": flops / ms / 1e9, "gbps": None, "frac_of_ceiling": None,
           "tokens_per_s": batch * seq / ms * 1e3, "peak_mem_gb": peak}
    if report is not None:
        row["patched"] = len(report.replaced)
        row["left"] = [f"{n}: {why}" for n, _, why in report.left]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=OPS + ("all",), default="all")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--provider", action="append", help="only these providers (repeatable)")
    p.add_argument("--tiny", action="store_true", help="tiny models: a smoke run, not a benchmark")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_e2e: no CUDA device; pass --device cpu --tiny for a smoke run")
    dtype = getattr(torch, args.dtype)
    ceilings = measure_ceilings(device)
    rows = []
    for op in OPS if args.op == "all" else (args.op,):
        batch = args.batch or (2 if args.tiny else 8 if op == "e2e-gpt2-train" else 32)
        seq = args.seq or (16 if args.tiny else 1024 if op == "e2e-gpt2-train" else 512)
        for provider in args.provider or providers(device):
            try:
                row = run_one(op, provider, device, dtype, batch, seq, args.tiny, args.warmup, args.iters)
            except Exception as e:  # a provider that fails is reported, not silently dropped
                row = {"op": op, "provider": provider, "dtype": args.dtype, "shape": {"B": batch, "L": seq},
                       "error": f"{type(e).__name__}: {e}"}
            if ceilings["matmul_bf16_tflops"] and row.get("tflops"):
                row["frac_of_ceiling"] = row["tflops"] / ceilings["matmul_bf16_tflops"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import triton

    result = {"kind": "bench", "device": name, "date": datetime.date.today().isoformat(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                           "cuda": torch.version.cuda, "transformers": __import__("transformers").__version__},
              "ceilings": ceilings, "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e_{name.replace(' ', '_')}_{result['date']}" + ("_tiny" if args.tiny else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result):
    lines = [f"# e2e benchmark — {result['device']}, {result['date']}", "",
             f"versions: {result['versions']}; ceilings: {result['ceilings']}", "",
             "| op | provider | compiled | dtype | B x L | ms | tokens/s | TFLOP/s | peak GiB | vs torch-eager | "
             "vs torch-compile |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in result["rows"]:
        if "ms" in r and r["provider"] == "torch-eager":
            base[(r["op"], "eager")] = r["ms"]
        if "ms" in r and r["provider"] == "torch-compile":
            base[(r["op"], "compile")] = r["ms"]
    for r in result["rows"]:
        s = r["shape"]
        if "error" in r:
            lines.append(f"| {r['op']} | {r['provider']} | | {r['dtype']} | {s['B']} x {s['L']} | error: "
                         f"{r['error'][:80]} | | | | | |")
            continue
        ratio = {k: (f"{base[(r['op'], k)] / r['ms']:.2f}x" if (r["op"], k) in base else "") for k in
                 ("eager", "compile")}
        peak = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else ""
        lines.append(f"| {r['op']} | {r['provider']} | {s['compiled']} | {r['dtype']} | {s['B']} x {s['L']} | "
                     f"{r['ms']:.2f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {peak} | {ratio['eager']} | "
                     f"{ratio['compile']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
