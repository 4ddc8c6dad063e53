"""What the launchers ask of a CUDA device on every call (compute capability, SM count, L2 and
shared memory sizes), read once per device: torch.cuda.get_device_properties costs microseconds
of host time per call (the lazy-init check, the device index's normalization), as much as a
decode-shape kernel takes, and a GPU's answers never change."""

import torch

_properties = {}  # device index -> torch.cuda's properties of that device


def properties(device):
    """``torch.cuda.get_device_properties`` of a CUDA ``device`` (a torch.device or an index),
    read once per device."""
    index = device if isinstance(device, int) else device.index
    if index is None:
        index = torch.cuda.current_device()
    props = _properties.get(index)
    if props is None:
        props = _properties[index] = torch.cuda.get_device_properties(index)
    return props
