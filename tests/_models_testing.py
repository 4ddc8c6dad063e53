"""What the fusedformer.models tests share: tolerances against Hugging Face, a float model in eval
mode, gradient comparison, random token ids and a group of processes for DDP / FSDP."""

import os
import socket

import torch

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
DTYPES = [torch.float64, torch.float32]


def close(a, b, dtype):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


def hf_eval(model, dtype):
    torch.manual_seed(0)
    return model.to(dtype).eval()


def grad_check(ours_out, hf_out, pairs, dtype):
    """Backprop the same random cotangent through both; compare the listed parameter gradients."""
    g = torch.randn_like(ours_out)
    (ours_out * g).sum().backward()
    (hf_out * g).sum().backward()
    for ours, theirs, transform in pairs:
        assert ours.grad is not None and theirs.grad is not None
        close(ours.grad, transform(theirs.grad), dtype)


def random_ids(B, L, vocab, seed=1):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


def run_in_processes(worker, world, *args):
    """worker(rank, world, *args) in ``world`` spawned processes joined in one gloo process group
    (on a free local port); returns when every one has finished."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_gloo_process, args=(world, port, worker, args), nprocs=world, join=True)


def _gloo_process(rank, world, port, worker, args):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    worker(rank, world, *args)  # its models are freed on return, before the group goes
    # Tear down in order, then leave without interpreter teardown: a DDP reducer still holding the
    # gloo group when Python finalizes destroys its threads unjoined, and the process aborts
    # ("terminate called without an active exception") now and then.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)
