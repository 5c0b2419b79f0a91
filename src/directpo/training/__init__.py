"""Training: settings, the run machinery (run directory, checkpoints, step driver), the DPO/SFT
loop, optimizer and warm-up, LoRA, several processes. `train` is imported on first use, so reading
`TrainConfig` (e.g. to build `directpo train --help`) loads no model code."""
from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name):
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(name)
