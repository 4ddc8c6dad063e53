"""Drop-in fidelity: where the ops once differed from torch in silence (issue 16), each case
against torch itself: values, gradients, and the errors torch raises."""

import threading

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from fusedformer import backends

# --------------------------------------------------------------------------------------------
# use_backend: per thread / task, and contexts exited out of order leave the right one
# --------------------------------------------------------------------------------------------


def test_use_backend_does_not_leak_into_other_threads(monkeypatch):
    monkeypatch.delenv("FUSEDFORMER_BACKEND", raising=False)
    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def other():
        entered.wait()
        seen["other"] = backends.requested_backend()
        checked.set()

    thread = threading.Thread(target=other)
    thread.start()
    with ff.use_backend("reference"):
        entered.set()
        checked.wait()
        seen["main"] = backends.requested_backend()
    thread.join()
    assert seen == {"main": "reference", "other": "auto"}


def test_use_backend_exited_out_of_order_keeps_the_one_still_open(monkeypatch):
    monkeypatch.delenv("FUSEDFORMER_BACKEND", raising=False)
    outer, inner = ff.use_backend("reference"), ff.use_backend("torch")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert backends.requested_backend() == "torch"
    inner.__exit__(None, None, None)
    assert backends.requested_backend() == "auto"
