"""Reading DeepSpeed's checkpoint files without ever running code from them.

DeepSpeed's own loaders call `torch.load` with `weights_only=False`; here every load is `weights_only=True`, with
the few plain classes its files hold allowed by name.
"""
from __future__ import annotations

import contextlib

import torch


def deepspeed_safe_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoint files hold: an enum, and the loss scaler (its attributes
    are restored as data). Nothing else may be unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def safe_checkpoint_engine(config):
    """DeepSpeed's checkpoint engine, loading with `weights_only=True` (its own unpickles freely)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(config)


@contextlib.contextmanager
def weights_only_loads():
    """Within the block every `torch.load` is `weights_only=True` (for DeepSpeed utilities such as zero_to_fp32,
    which ask for weights_only=False): reading a checkpoint never runs code."""
    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real
