"""``fusedformer demo`` (``make demo``): a small GPT and a small BERT from fusedformer.models,
their parity against the float64 reference, and a short training run on text shipped with the
package (byte-level: one token per byte), printing loss, tokens/s and which backend ran.

On a CPU everything runs on the reference backend (pure PyTorch), and the demo says so. On a GPU
the model runs on the fused kernels (``auto``: the fastest backend per op) and again, with the
same weights and batches, on the reference backend, side by side.
"""

import contextlib
import copy
import importlib.resources
import time

import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer._backends.contract import Family
from fusedformer.parity import max_error
from fusedformer.vocabulary import parity_bound

MASK_ID = 256  # BERT's [MASK]: one id past the 256 byte values
MIN_STEPS = 8  # "loss goes down" needs a few steps however slow the machine


def load_text(name="lighthouse.txt"):
    """The bundled training text (python/fusedformer/data/), as a uint8 tensor of its bytes."""
    raw = importlib.resources.files("fusedformer").joinpath("data", name).read_bytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def decode(ids):
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@contextlib.contextmanager
def record_backends():
    """Collect {family: {backend names}} of every backend table call made inside (what ran)."""
    seen = {}
    original = Family.implementation

    def implementation(family, name):
        seen.setdefault(family.name, set()).add(name)
        return original(family, name)

    Family.implementation = implementation
    try:
        yield seen
    finally:
        Family.implementation = original


def _describe(seen):
    return ", ".join(f"{fam}={'/'.join(sorted(names))}" for fam, names in sorted(seen.items())) or "none"


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
        with ff.use_backend(name), record_backends() as seen:
            if kind == "gpt":
                out = m(x)
                F.cross_entropy(out.double().reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
            else:
                out = m(x)
                (out.double() ** 2).mean().backward()
        result = {"out": out.detach()}
        result.update({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        return result, seen

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


def train(kind, model, data, device, seconds, backend, batch, seq, log_every_s):
    """Train for ``seconds`` (at least MIN_STEPS steps) under ``backend`` (None: auto). Returns
    (losses, tokens/s, what ran)."""
    gen = torch.Generator().manual_seed(2)
    # 1e-3 and clipping: at 3e-3 the small GPT collapses to the byte frequencies (loss ~3.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    ctx = ff.use_backend(backend) if backend else contextlib.nullcontext()
    losses, tokens, step = [], 0, 0
    cuda = torch.device(device).type == "cuda"
    with ctx, record_backends() as seen:
        t0 = last_log = time.perf_counter()
        while True:
            x, y = _batch(data, batch, seq, gen, device)
            loss = gpt_loss(model, x, y) if kind == "gpt" else bert_loss(model, x, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))  # a sync: the clock below measures finished steps
            tokens += x.numel()
            step += 1
            now = time.perf_counter()
            if now - last_log >= log_every_s or step == 1:
                print(f"    step {step:>5}  loss {losses[-1]:.3f}  {tokens / (now - t0):>10,.0f} tokens/s")
                last_log = now
            if now - t0 >= seconds and step >= MIN_STEPS:
                break
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    return losses, tokens / elapsed, seen


def _summary(losses):
    head = sum(losses[:3]) / len(losses[:3])
    tail = sum(losses[-5:]) / len(losses[-5:])
    return head, tail


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
        kernel_backends = []
        print("NO CUDA GPU: everything below runs on the REFERENCE backend (pure PyTorch, the CPU fallback).")
        print("The fused Triton and CUDA kernels need a GPU; `make gpu-check` runs them there.")

    failures = 0
    print("\n1. parity of the models' forward + backward against the float64 reference")
    dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    for kind in ("gpt", "bert"):
        model = build(kind, device, small=True)
        for backend in kernel_backends or ["reference"]:
            for dtype in dtypes:
                try:
                    ok, worst, name, seen = model_parity(kind, model, data, device, backend, dtype)
                except ff.BackendUnavailableError as exc:
                    print(f"  {kind:<4} {backend:<9} {str(dtype)[6:]:<8} cannot run: {str(exc).splitlines()[0]}")
                    continue
                failures += not ok
                print(f"  {kind:<4} {backend:<9} {str(dtype)[6:]:<8} {'ok  ' if ok else 'FAIL'} worst error "
                      f"{worst:.2f}x the reference's own in {str(dtype)[6:]} ({name}); ran: {_describe(seen)}")
        if not kernel_backends:
            print(f"  ({kind}: on a CPU the reference is compared with itself in float32 — this checks the "
                  "harness, not a kernel)")

    print(f"\n2. training a small GPT (next byte) for {seconds:.0f} s")
    batch, seq = (32, 128) if cuda else (16, 64)
    runs = [("fused (auto)", None)] if cuda else []
    runs.append(("reference", "reference"))
    base = build("gpt", device, small=not cuda)
    print(f"   {sum(p.numel() for p in base.parameters()):,} parameters, batch {batch} x {seq} bytes")
    results = {}
    for label, backend in runs:
        print(f"  [{label}]")
        model = copy.deepcopy(base)
        losses, tps, seen = train("gpt", model, data, device, seconds, backend, batch, seq, max(seconds / 8, 1))
        first, last = _summary(losses)
        results[label] = (tps, first, last)
        print(f"    ran: {_describe(seen)}")
        print(f"    loss {first:.3f} -> {last:.3f} over {len(losses)} steps, {tps:,.0f} tokens/s")
        failures += not last < first
        prompt = torch.tensor([list(b"The keeper ")], device=device)
        with ff.use_backend(backend) if backend else contextlib.nullcontext():
            sample = model.generate(prompt, 60)[0].tolist()
        print(f"    sample: {decode(sample)!r}")
    if cuda and len(results) == 2:
        fused, ref = results["fused (auto)"][0], results["reference"][0]
        print(f"  fused kernels: {fused:,.0f} tokens/s vs reference {ref:,.0f} tokens/s ({fused / ref:.2f}x)")

    bert_seconds = max(seconds / 3, 2)
    print(f"\n3. training a small BERT (masked bytes) for {bert_seconds:.0f} s")
    model = build("bert", device, small=not cuda)
    label, backend = runs[0]
    print(f"  [{label}]")
    losses, tps, seen = train("bert", model, data, device, bert_seconds, backend, batch, seq, max(bert_seconds / 4, 1))
    first, last = _summary(losses)
    print(f"    ran: {_describe(seen)}")
    print(f"    loss {first:.3f} -> {last:.3f} over {len(losses)} steps, {tps:,.0f} tokens/s")
    failures += not last < first

    where = "the fused kernels and the reference backend" if cuda else "the reference backend on a CPU"
    print(f"\ndemo {'passed' if not failures else f'FAILED ({failures} check(s))'}: {where}")
    return 0 if not failures else 1
