"""Weight-only quantization: int8 / int4 in memory and on disk, FP8 block-scaled checkpoints both ways.

    from nanoseek.quant import quantize_model, convert_checkpoint, load_quantized
    quantize_model(model, "int8")                                  # in memory, modules swapped
    convert_checkpoint("runs/sft", "runs/sft-int8", "int8")        # offline, shard by shard
    model = load_pretrained("runs/sft-int8")                       # stays int8 (calls load_quantized)

    nanoseek quantize --model runs/sft --to int8 --out runs/sft-int8

formats.py   how one weight is stored (int8, int4, fp8) and the round-trip error bounds
modules.py   quantized linears and experts on torch's CPU kernels, the module swap
convert.py   the offline conversion, the `nanoseek quantize` command and load_quantized
"""

from .convert import convert_checkpoint, load_quantized
from .modules import quantize_, quantize_model

__all__ = ["convert_checkpoint", "load_quantized", "quantize_", "quantize_model"]
