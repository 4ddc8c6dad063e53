"""FSDP2 (``torch.distributed.fsdp.fully_shard``, two gloo processes on CPU) of a model patched by
``ff.patch`` (a Hugging Face GPT-2) and of an ``ff.models`` GPT: each rank trains on half the
batch, and the losses and gradients equal the single-process run on the whole batch (FSDP2
averages the gradients over ranks; the halves are the same size, so that is the gradient of
the mean loss)."""

import os

import fusedformer as ff
import pytest
import torch
import torch.distributed.fsdp
import torch.nn.functional as F
from _models_testing import random_ids, run_in_processes
from fusedformer.models import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

VOCAB, BATCH, LENGTH, STEPS = 40, 4, 9, 2


def _patched_hf_gpt2():
    torch.manual_seed(7)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    ids = random_ids(1, LENGTH, VOCAB)
    return ff.patch(model, verify=True, example_inputs={"input_ids": ids})


def _ff_gpt():
    torch.manual_seed(7)
    return GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16, n_positions=16, dropout=0.0))


def _hf_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _gpt_loss(model, ids):
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


MODELS = {"patched_hf_gpt2": (_patched_hf_gpt2, _hf_loss), "ff_gpt": (_ff_gpt, _gpt_loss)}


def _train(model, loss_fn, ids, after_backward=lambda loss: loss):
    """STEPS of SGD; returns the losses and the last step's gradients by parameter name."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(model, ids)
        loss.backward()
        losses.append(after_backward(loss.detach()))
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        opt.step()
    return losses, grads


def _fsdp_worker(rank, world, out_dir):
    from torch.distributed.fsdp import fully_shard

    def mean_over_ranks(loss):
        torch.distributed.all_reduce(loss)
        return loss / world

    half = BATCH // world
    ids = random_ids(BATCH, LENGTH, VOCAB)[rank * half:(rank + 1) * half]
    results = {}
    for name, (build, loss_fn) in MODELS.items():
        model = build()
        for blocks in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
            for block in blocks:
                fully_shard(block)
        fully_shard(model)
        losses, grads = _train(model, loss_fn, ids, mean_over_ranks)
        results[name] = (losses, {n: g.full_tensor() for n, g in grads.items()})
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "fsdp.pt"))


@pytest.mark.skipif(not hasattr(torch.distributed.fsdp, "fully_shard"),
                    reason=f"torch {torch.__version__}'s FSDP2 is not public yet and needs CUDA streams")
def test_fsdp2_two_processes_match_single_process(tmp_path):
    run_in_processes(_fsdp_worker, 2, str(tmp_path))
    sharded = torch.load(tmp_path / "fsdp.pt")
    ids = random_ids(BATCH, LENGTH, VOCAB)
    for name, (build, loss_fn) in MODELS.items():
        losses, grads = _train(build(), loss_fn, ids)
        fsdp_losses, fsdp_grads = sharded[name]
        torch.testing.assert_close(torch.stack(fsdp_losses), torch.stack(losses), atol=1e-6, rtol=1e-5, msg=name)
        assert fsdp_grads.keys() == grads.keys(), name
        for param, grad in grads.items():
            torch.testing.assert_close(fsdp_grads[param], grad, atol=1e-6, rtol=1e-5, msg=f"{name}: {param}")
