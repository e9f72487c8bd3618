"""llama.cpp beside nanoseek: the same checkpoint converted to GGUF, quantized, and decoded.

    from llama_cpp_side import to_gguf, decode_steps     # bench_decode.py --llama-cpp, bench_real_scale.py
    gguf = to_gguf(checkpoint_folder, workdir, "q4_0")    # f32 / bf16 / q8_0 / q4_0, converted once
    steps, tokens = decode_steps(gguf, prompt_ids, new_tokens=16, threads=2)

llama.cpp is the `llama-cpp-python` package built from its source distribution in this environment
(`pip install llama-cpp-python`: its build compiles the vendored llama.cpp for this CPU). The
converter is llama.cpp's own `convert_hf_to_gguf.py`, read from that same source distribution
(downloaded once into ~/.cache/nanoseek/llama_cpp_src by pip); the only thing changed for it is the
tokenizer check: it refuses tokenizers whose pre-tokenizer hash it does not know, and benchmark
checkpoints carry a small byte-level BPE trained here, so it is told to treat it as GPT-2's
(byte-level BPE; only the vocabulary differs). Q8_0 and Q4_0 are made by llama.cpp's quantizer
(`llama_model_quantize`) from the f32 GGUF, as `llama-quantize` would. Decoding is timed token by
token through the Python binding (`Llama.eval` of one token; greedy choice from its logits): the
binding adds ~0.1 ms a token over llama.cpp's C loop, which the figures include.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SRC = Path.home() / ".cache" / "nanoseek" / "llama_cpp_src"
QUANT_TYPES = {"q8_0": 7, "q4_0": 2}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0

_CONVERT = """
import sys
root, folder, out, outtype = sys.argv[1:5]
sys.path[:0] = [root, root + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # a byte-level BPE trained here
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", outtype]
convert_hf_to_gguf.main()
"""


def llama_cpp_source() -> Path:
    """vendor/llama.cpp of the installed llama-cpp-python's source distribution (fetched once by pip)."""
    import llama_cpp
    root = SRC / f"llama_cpp_python-{llama_cpp.__version__}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").exists():
        return root
    SRC.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                    f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(SRC)], check=True)
    with tarfile.open(next(SRC.glob(f"llama_cpp_python-{llama_cpp.__version__}.tar.gz"))) as tar:
        tar.extractall(SRC, filter="data")
    return root


def to_gguf(folder: Path, workdir: Path, kind: str = "f32", threads: int = 2) -> Path:
    """The checkpoint at `folder` as a GGUF of `kind` (f32, bf16, q8_0, q4_0) in `workdir`, made once."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"model-{kind}.gguf"
    if out.exists():
        return out
    if kind in QUANT_TYPES:
        quantize(to_gguf(folder, workdir, "f32", threads), out, kind, threads)
        return out
    tmp = out.with_suffix(".partial")
    subprocess.run([sys.executable, "-c", _CONVERT, str(llama_cpp_source()), str(folder), str(tmp), kind],
                   check=True, capture_output=True)
    tmp.rename(out)
    return out


def quantize(src: Path, dst: Path, kind: str, threads: int = 2) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = QUANT_TYPES[kind], threads
    tmp = dst.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")
    tmp.rename(dst)


def decode_steps(gguf: Path, prompt: list[int], new_tokens: int, threads: int) -> tuple[list[float], list[int]]:
    """Greedy decoding after `prompt`: seconds of each one-token step (the prefill left out) and the tokens."""
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)
    llm.eval(prompt)
    tokens, steps = [], []
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        tok = int(np.argmax(logits))
        tokens.append(tok)
        t = time.perf_counter()
        llm.eval([tok])
        steps.append(time.perf_counter() - t)
    return steps, tokens
