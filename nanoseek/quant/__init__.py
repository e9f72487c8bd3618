"""Weight-only quantization: int8 / int4 in memory and on disk, FP8 block-scaled checkpoints both ways.

    from nanoseek.quant import quantize_model, FORMATS
    quantize_model(model, "int8")                                  # in memory, modules swapped
    from nanoseek.quant.convert import convert_checkpoint
    convert_checkpoint("runs/sft", "runs/sft-int8", "int8")        # offline, shard by shard
    model = load_pretrained("runs/sft-int8")                       # nanoseek.hf: stays int8

    nanoseek quantize --model runs/sft --to int8 --out runs/sft-int8

modules.py   quantized linears and experts on torch's CPU kernels (and the int4 code layout they need)
formats.py   one WeightFormat per format (int8, int4, fp8) in FORMATS: quantize, dequantize, stored
             shapes, companions, the modules it computes with; error bounds; the module swap
convert.py   the offline conversion and the `nanoseek quantize` command (on top of nanoseek.hf)

convert_checkpoint is imported from quant.convert, not from here: convert uses nanoseek.hf, which
uses formats.py, so importing it here would make the two packages import each other.
"""

from .formats import FORMATS, WeightFormat, quantize_model, weight_format

__all__ = ["FORMATS", "WeightFormat", "quantize_model", "weight_format"]
