"""``fusedformer demo`` (``make demo``): a small GPT and a small BERT from fusedformer.models,
their parity against the float64 reference, and a short training run on text shipped with the
package (byte-level: one token per byte), printing loss, tokens/s and which backend ran.

On a GPU the model runs on the fused kernels (``auto``: the fastest backend per op) and again,
with the same weights and batches, on the reference backend, side by side. On a CPU no fused
kernel can run: ``auto`` picks torch's own CPU kernels (the torch backend) or the reference, and
the demo says so.
"""

import contextlib
import copy
import importlib.resources
import time

import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer.parity import max_error
from fusedformer.vocabulary import parity_bound

MASK_ID = 256  # BERT's [MASK]: one id past the 256 byte values
MIN_STEPS = 8  # "loss goes down" needs a few steps however slow the machine
EVAL_BATCHES = 4  # held-out batches behind each loss the demo prints
SAMPLE = dict(do_sample=True, temperature=0.8, top_k=20)  # greedy decoding of a tiny model repeats spaces


def load_text(name="lighthouse.txt"):
    """The bundled training text (python/fusedformer/data/), as a uint8 tensor of its bytes."""
    raw = importlib.resources.files("fusedformer").joinpath("data", name).read_bytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def decode(ids):
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _describe(seen):
    return ", ".join(f"{fam}={'/'.join(sorted(names))}" for fam, names in sorted(seen.items())) or "none"


def split(data):
    """(train, held out): the text's last tenth is never trained on, only evaluated."""
    cut = data.numel() * 9 // 10
    return data[:cut], data[cut:]


def _batch(data, batch, seq, gen, device):
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    x = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).to(device)
    return x[:, :-1], x[:, 1:]


def gpt_loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def bert_loss(model, x, gen):
    """Masked-LM: 15% of the bytes replaced by [MASK], the loss on those positions."""
    chosen = torch.rand(x.shape, generator=gen).to(x.device) < 0.15
    chosen[:, 0] |= ~chosen.any(1)  # at least one masked position per row
    logits = model.mlm_logits(x.masked_fill(chosen, MASK_ID))
    return F.cross_entropy(logits.float()[chosen], x[chosen])


def build(kind, device, small):
    from fusedformer.models import GPT, Bert, BertConfig, GPTConfig

    width, layers = (96, 3) if small else (256, 4)
    torch.manual_seed(0)
    if kind == "gpt":
        cfg = GPTConfig(vocab_size=256, n_positions=256, n_embd=width, n_layer=layers, n_head=4, dropout=0.0)
        return GPT(cfg).to(device)
    cfg = BertConfig(vocab_size=257, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=4 * width, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=256)
    return Bert(cfg).to(device)


def model_parity(kind, model, data, device, backend, dtype):
    """Forward + backward of ``model`` in ``dtype`` on ``backend`` against the float64 model on the
    reference backend, beside the reference backend's own error in ``dtype`` (the 2x rule of
    fusedformer.parity). Returns (ok, worst ratio, worst tensor name, what ran)."""
    gen = torch.Generator().manual_seed(1)
    x, y = _batch(data, 2, 32, gen, device)

    def grads(m, name, dt):
        m = copy.deepcopy(m).to(dt)
        m.zero_grad(set_to_none=True)
        def forward_backward():
            out = m(x)
            if kind == "gpt":
                F.cross_entropy(out.double().reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
            else:
                (out.double() ** 2).mean().backward()
            return out

        with ff.use_backend(name):
            seen = ff.explain(forward_backward)
        result = {"out": seen.result.detach()}
        result.update({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        return result, seen.backends()

    oracle, _ = grads(model, "reference", torch.float64)
    ours, seen = grads(model, backend, dtype)
    theirs, _ = grads(model, "reference", dtype)
    ok, worst, worst_name = True, 0.0, ""
    for name, want in oracle.items():
        err, torch_err = max_error(ours[name], want), max_error(theirs[name], want)
        scale = float(want.abs().max()) if want.numel() else 0.0
        ok &= err <= parity_bound(torch_err, dtype, scale)
        ratio = err / torch_err if torch_err > 0 else (0.0 if err == 0 else float("inf"))
        if ratio >= worst:
            worst, worst_name = ratio, name
    return ok, worst, worst_name, seen


def held_out_loss(kind, model, held, device, batch, seq):
    """Mean loss over EVAL_BATCHES fixed batches of the held-out text (same batches, and for BERT
    the same masks, on every call), without dropout or gradients."""
    gen = torch.Generator().manual_seed(3)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = []
        for _ in range(EVAL_BATCHES):
            x, y = _batch(held, batch, seq, gen, device)
            losses.append(float(gpt_loss(model, x, y) if kind == "gpt" else bert_loss(model, x, gen)))
    model.train(was_training)
    return sum(losses) / len(losses)


def train(kind, model, data, device, seconds, backend, batch, seq, log_every_s):
    """Train for ``seconds`` (at least MIN_STEPS steps) under ``backend`` (None: auto). Returns
    (steps, tokens/s after the first step, {op: backends that ran}); the first step runs under
    ff.explain and outside the clock (it compiles the kernels on a GPU)."""
    gen = torch.Generator().manual_seed(2)
    # 1e-3 and clipping: at 3e-3 the small GPT collapses to the byte frequencies (loss ~3.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    cuda = torch.device(device).type == "cuda"

    def step():
        x, y = _batch(data, batch, seq, gen, device)
        loss = gpt_loss(model, x, y) if kind == "gpt" else bert_loss(model, x, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach()), x.numel()  # float(): a sync, so the clock measures finished steps

    with ff.use_backend(backend) if backend else contextlib.nullcontext():
        first = ff.explain(step)
        print(f"    step     1  training-batch loss {first.result[0]:.3f}  (not timed: warm-up)")
        steps, tokens = 1, 0
        t0 = last_log = time.perf_counter()
        while True:
            loss, n = step()
            steps, tokens = steps + 1, tokens + n
            now = time.perf_counter()
            if now - last_log >= log_every_s:
                print(f"    step {steps:>5}  training-batch loss {loss:.3f}  {tokens / (now - t0):>10,.0f} tokens/s")
                last_log = now
            if now - t0 >= seconds and steps >= MIN_STEPS:
                break
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    return steps, tokens / elapsed, first.backends()


def train_and_report(kind, model, data, held, device, seconds, backend, batch, seq, log_every_s):
    """Train, printing what ran, the held-out loss before and after and the speed; returns
    (tokens/s, whether the held-out loss went down)."""
    before = held_out_loss(kind, model, held, device, batch, seq)
    steps, tps, ran = train(kind, model, data, device, seconds, backend, batch, seq, log_every_s)
    after = held_out_loss(kind, model, held, device, batch, seq)
    print(f"    ran: {_describe(ran)}")
    print(f"    held-out loss {before:.3f} before training -> {after:.3f} after {steps} steps (mean over "
          f"{EVAL_BATCHES} batches of {batch} x {seq} bytes from the text's last tenth, never trained on)")
    print(f"    {tps:,.0f} tokens/s over steps 2-{steps}")
    return tps, after < before


def main(seconds=None, device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    try:
        import fusedformer.models as models

        models.GPT, models.Bert  # noqa: B018  (the models package must provide both)
    except (ImportError, AttributeError) as exc:
        print(f"fusedformer demo: fusedformer.models is not available ({exc})")
        return 1
    seconds = seconds if seconds is not None else (20.0 if cuda else 30.0)
    data = load_text()
    print(f"fusedformer {ff.__version__} demo on {torch.cuda.get_device_name(device) if cuda else 'cpu'}; "
          f"torch {torch.__version__}")
    print(f"training text: {data.numel():,} bytes (python/fusedformer/data/lighthouse.txt), byte-level tokens")
    if cuda:
        kernel_backends = [b for b in ff.available_backends(device) if b != "reference"]
        print(f"backends available on this GPU: {', '.join(ff.available_backends(device))}")
    else:
        kernel_backends = ["torch"]
        print("NO CUDA GPU: the fused Triton and CUDA kernels need one (`make gpu-check` runs them there).")
        print("On this CPU, auto runs torch's own kernels (the torch backend), or the reference where those cannot "
              "compute an op exactly; each 'ran:' line says which.")

    failures = 0
    print("\n1. parity of the models' forward + backward against the float64 reference")
    dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    for kind in ("gpt", "bert"):
        model = build(kind, device, small=True)
        for backend in kernel_backends:
            for dtype in dtypes:
                try:
                    ok, worst, name, seen = model_parity(kind, model, data, device, backend, dtype)
                except ff.BackendUnavailableError as exc:
                    print(f"  {kind:<4} {backend:<9} {str(dtype)[6:]:<8} cannot run: {str(exc).splitlines()[0]}")
                    continue
                failures += not ok
                print(f"  {kind:<4} {backend:<9} {str(dtype)[6:]:<8} {'ok  ' if ok else 'FAIL'} worst error "
                      f"{worst:.2f}x the reference's own in {str(dtype)[6:]} ({name}); ran: {_describe(seen)}")
        if not cuda:
            print(f"  ({kind}: on a CPU this checks torch's kernels through the torch backend, not fusedformer's)")

    print(f"\n2. training a small GPT (next byte) for {seconds:.0f} s")
    batch, seq = (32, 128) if cuda else (16, 64)
    runs = [("fused (auto)", None), ("reference", "reference")] if cuda else [("auto", None)]
    train_text, held = split(data)
    base = build("gpt", device, small=not cuda)
    print(f"   {sum(p.numel() for p in base.parameters()):,} parameters, batch {batch} x {seq} bytes")
    speeds = {}
    for label, backend in runs:
        print(f"  [{label}]")
        model = copy.deepcopy(base)
        speeds[label], better = train_and_report("gpt", model, train_text, held, device, seconds, backend, batch,
                                                 seq, max(seconds / 8, 1))
        failures += not better
        prompt = torch.tensor([list(b"The keeper ")], device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        with ff.use_backend(backend) if backend else contextlib.nullcontext():
            sample = model.generate(prompt, 60, generator=gen, **SAMPLE)[0].tolist()
        print(f"    sample (60 bytes drawn at temperature {SAMPLE['temperature']} from the {SAMPLE['top_k']} "
              f"likeliest): {decode(sample)!r}")
    if cuda and len(speeds) == 2:
        fused, ref = speeds["fused (auto)"], speeds["reference"]
        print(f"  fused kernels: {fused:,.0f} tokens/s vs reference {ref:,.0f} tokens/s ({fused / ref:.2f}x)")

    bert_seconds = max(seconds / 3, 2)
    print(f"\n3. training a small BERT (masked bytes) for {bert_seconds:.0f} s")
    model = build("bert", device, small=not cuda)
    label, backend = runs[0]
    print(f"  [{label}]")
    _, better = train_and_report("bert", model, train_text, held, device, bert_seconds, backend, batch, seq,
                                 max(bert_seconds / 4, 1))
    failures += not better

    where = "the fused kernels and the reference backend" if cuda else "torch's kernels and the reference on a CPU"
    print(f"\ndemo {'passed' if not failures else f'FAILED ({failures} check(s))'}: {where}")
    return 0 if not failures else 1
