"""Hugging Face DeepSeek checkpoints: config.json + safetensors in and out, in any stored format.

    from nanoseek.hf import load_pretrained, save_pretrained
    model = load_pretrained("DeepSeek-V2-Lite", dtype=torch.bfloat16)   # or FP8, int8, int4 checkpoints
    save_pretrained(model, "out/my-model")

keys.py     nanoseek module names <-> checkpoint keys, both ways (experts, MTP, companions)
io.py       load_pretrained / save_pretrained: every format, sharded, atomic; CheckpointError
fsutil.py   crash-safe file and folder writes
"""

from .io import CheckpointError, checkpoint_files, load_pretrained, save_pretrained
from .keys import hf_keys, hf_state_dict

__all__ = ["CheckpointError", "checkpoint_files", "hf_keys", "hf_state_dict", "load_pretrained", "save_pretrained"]
