"""Global and shared memory as the emulated CUDA kernels see them: raw pointers resolved to the
CPU tensors' storages, typed as the kernel declares them, with the checks a GPU would fault on
(out-of-bounds and misaligned accesses) and the one it would silently get wrong (two stores to
one element in a launch: a race or a wrong index).

Numbers are held as float64 (exact mode) or float32 (hardware mode) arrays of values already
rounded to the declared type; Numerics says which and does the rounding.
"""

import dataclasses

import numpy as np
import torch

# the dtype code csrc/common.cuh's ff::DType lacks: the emulation's "T = double, float = double"
EXACT_CODE = 3


def _round_bf16(x):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).float().numpy()


@dataclasses.dataclass(frozen=True)
class Numerics:
    """The kernel's number types for one dtype code: T (the 16-bit element, __half or
    __nv_bfloat16) and float (registers, accumulators, lse and gradient buffers). In exact mode
    both are float64, so the emulation computes the kernel's algorithm without rounding."""

    code: int

    @property
    def acc(self):
        return np.float64 if self.code == EXACT_CODE else np.float32

    def torch_dtype(self, declared):
        if self.code == EXACT_CODE and declared in ("T", "float"):
            return torch.float64
        return {"T": {1: torch.float16, 2: torch.bfloat16}.get(self.code), "float": torch.float32,
                "uint8": torch.uint8}[declared]

    def f(self, x):
        """A C float: x as the register type (float32 literals and params round here)."""
        return np.asarray(x, dtype=self.acc)

    def round(self, declared, x):
        """x stored as the declared type (round to nearest even, as __float2half_rn and
        __float2bfloat16_rn), returned in the register type."""
        x = np.asarray(x, dtype=self.acc)
        dtype = self.torch_dtype(declared)
        if dtype == torch.float16:
            return x.astype(np.float16).astype(self.acc)
        if dtype == torch.bfloat16:
            return _round_bf16(x)
        if dtype == torch.float32:
            return x.astype(np.float32).astype(self.acc)
        return x

    def pack2(self, lo, hi):
        """pack2<T>(lo, hi) (attention.cu): two floats rounded to T into one register, (..., 2)."""
        return np.stack([self.round("T", lo), self.round("T", hi)], axis=-1)


class Buffer:
    """The memory behind one kernel pointer: the whole storage it points into, so an index
    before or after the tensor still lands somewhere checkable. Indices are in elements from
    the pointer, as the kernel's arithmetic computes them."""

    def __init__(self, raw, offset_bytes, address, dtype, acc):
        self.esize = torch.empty(0, dtype=dtype).element_size()
        assert offset_bytes % self.esize == 0, "pointer not aligned to its element type"
        usable = raw[: raw.numel() // self.esize * self.esize]
        self._typed = usable.view(dtype)
        self.values = self._typed.to(torch.float64).numpy().astype(acc)
        self.base = offset_bytes // self.esize
        self.address = address  # byte address of the pointer, for alignment checks
        self.written = np.zeros(self.values.shape, dtype=bool)
        self.dirty = False

    def _check(self, idx, mask, width, what):
        idx = idx[mask] if mask is not None else np.ravel(idx)
        if idx.size == 0:
            return idx
        pos = self.base + idx
        assert pos.min() >= 0 and pos.max() + width <= self.values.size, f"{what}: out of bounds"
        assert np.all((self.address + idx * self.esize) % (width * self.esize) == 0), f"{what}: misaligned"
        return pos

    def load(self, idx, mask=None, width=1, fill=0.0):
        """Elements [idx, idx + width) where mask: (*idx.shape, width), or idx.shape when width is 1."""
        idx, mask = np.asarray(idx), None if mask is None else np.broadcast_to(mask, np.shape(idx))
        self._check(idx, mask, width, "global load")
        pos = np.clip(self.base + idx, 0, self.values.size - width)[..., None] + np.arange(width)
        out = self.values[pos]
        if mask is not None:
            out = np.where(mask[..., None], out, fill)
        return out[..., 0] if width == 1 else out

    def store(self, idx, vals, mask=None, width=1):
        """A width-element vector store per (active) index; each element may be stored once per launch."""
        idx = np.asarray(idx)
        mask = np.ones(idx.shape, bool) if mask is None else np.broadcast_to(mask, idx.shape)
        vals = np.broadcast_to(vals, idx.shape + ((width,) if width > 1 else ()))
        pos = self._check(idx, mask, width, "global store")
        pos = (pos[..., None] + np.arange(width)).ravel()
        assert np.unique(pos).size == pos.size and not self.written[pos].any(), "global store: element stored twice"
        self.written[pos] = True
        self.values[pos] = (vals[mask] if width == 1 else vals[mask].reshape(-1, width)).ravel()
        self.dirty = True

    def atomic_add(self, idx, vals, mask):
        idx = np.asarray(idx)
        mask = np.broadcast_to(mask, idx.shape)
        pos = self._check(idx, mask, 1, "atomicAdd")
        np.add.at(self.values, pos, np.broadcast_to(vals, idx.shape)[mask])
        self.dirty = True

    def flush(self):
        if self.dirty:
            self._typed.copy_(torch.from_numpy(self.values).to(self._typed.dtype))


class DeviceMemory:
    """Every tensor a launch may touch, found by the raw pointers the host code passes."""

    def __init__(self, tensors, numerics):
        self.numerics = numerics
        self._storages = {}
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                self._storages[st.data_ptr()] = st
        self._buffers = []

    def buffer(self, ptr, declared):
        """The Buffer that `declared* p = ptr` reads and writes; None for a null pointer."""
        if ptr == 0:
            return None
        for start, st in self._storages.items():
            if start <= ptr < start + st.nbytes():
                raw = torch.empty(0, dtype=torch.uint8).set_(st)
                buf = Buffer(raw, ptr - start, ptr, self.numerics.torch_dtype(declared), self.numerics.acc)
                self._buffers.append(buf)
                return buf
        raise AssertionError(f"pointer {ptr:#x} is in no tensor the launch was given")

    def flush(self):
        """Write what the kernels stored back into the tensors (at the end of a launch)."""
        for buf in self._buffers:
            buf.flush()
        self._buffers = []


class SharedMemory:
    """One block's dynamic shared memory per (b, h) block, in elements of T: (B, H, 1, S), the 1
    broadcasting against the warp axis of ldmatrix addresses."""

    def __init__(self, lead, elements, acc):
        self.data = np.zeros(tuple(lead) + (1, elements), dtype=acc)

    def store(self, addr, vals, width):
        """Lanes (leading axes of addr) each store width elements at addr; every block stores
        the same addresses (they depend on threadIdx only), so the race check is per block."""
        addr = np.asarray(addr)
        flat = (addr.reshape(-1)[:, None] + np.arange(width)).ravel()
        assert flat.min() >= 0 and flat.max() < self.data.shape[-1], "shared store: out of bounds"
        assert np.all(addr % width == 0), "shared store: misaligned"
        assert np.unique(flat).size == flat.size, "shared store: two lanes store one element"
        lead = self.data.shape[:-2]
        vals = np.broadcast_to(vals, lead + addr.shape + (width,)).reshape(lead + (-1,))
        self.data[..., 0, flat] = vals
