"""llama.cpp beside nanoseek: the same checkpoint converted to GGUF, quantized, and decoded.

    from llama_cpp_side import to_gguf, decode_steps     # bench_decode.py --llama-cpp, bench_real_scale.py
    gguf = to_gguf(checkpoint_folder, workdir, "q4_0")    # f32 / bf16 / q8_0 / q4_0, converted once
    gguf = to_gguf(folder, workdir, "q4_0", via="q8_0")   # no f32 GGUF: for checkpoints the disk can't hold twice
    steps, tokens = decode_steps(gguf, prompt_ids, new_tokens=16, threads=2)

llama.cpp is the `llama-cpp-python` package built from its source distribution in this environment
(`pip install llama-cpp-python`: its build compiles the vendored llama.cpp for this CPU). The
converter is llama.cpp's own `convert_hf_to_gguf.py`, read from that same source distribution
(downloaded once into ~/.cache/nanoseek/llama_cpp_src by pip); the only thing changed for it is the
tokenizer check: it refuses tokenizers whose pre-tokenizer hash it does not know, and benchmark
checkpoints carry a small byte-level BPE trained here, so it is told to treat it as GPT-2's
(byte-level BPE; only the vocabulary differs). Q8_0 and Q4_0 are made by llama.cpp's quantizer
(`llama_model_quantize`) from the f32 GGUF, as `llama-quantize` would. With via="q8_0" (a model whose
f32 GGUF does not fit the disk: V2-Lite's would be 63 GB) the converter writes Q8_0 itself
(`--outtype q8_0`) and Q4_0 is requantized from that Q8_0 by the same quantizer (allow_requantize:
Q4_0 of weights already rounded to Q8_0's 8 bits per 32-block, which costs Q4_0 almost nothing, as its
own step is ~16x coarser). Files are written as .partial and renamed when complete; a failed step
leaves nothing behind, so an existing file is always a whole one and is reused. Decoding is timed token by
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


def to_gguf(folder: Path, workdir: Path, kind: str = "f32", threads: int = 2, via: str = "f32") -> Path:
    """The checkpoint at `folder` as a GGUF of `kind` (f32, bf16, q8_0, q4_0) in `workdir`, made once.
    via: the GGUF the quantizer starts from, "f32" (the default) or "q8_0" (converted straight to Q8_0,
    Q4_0 requantized from it; no f32 file is ever written)."""
    if via not in ("f32", "q8_0"):
        raise ValueError(f"via={via!r}: expected 'f32' or 'q8_0'")
    workdir.mkdir(parents=True, exist_ok=True)
    direct = kind not in QUANT_TYPES or kind == via
    out = workdir / (f"model-{kind}.gguf" if via == "f32" or direct else f"model-{kind}-from-{via}.gguf")
    if out.exists():
        return out
    if not direct:
        quantize(to_gguf(folder, workdir, via, threads, via), out, kind, threads, requantize=via != "f32")
        return out
    tmp = out.with_suffix(".partial")
    try:
        subprocess.run([sys.executable, "-c", _CONVERT, str(llama_cpp_source()), str(folder), str(tmp), kind],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's converter failed on {folder}:\n{e.stderr[-3000:]}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.rename(out)
    return out


def quantize(src: Path, dst: Path, kind: str, threads: int = 2, requantize: bool = False) -> None:
    """llama.cpp's quantizer, `src` GGUF -> `dst` of `kind`; requantize: `src` is already quantized."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = QUANT_TYPES[kind], threads, requantize
    tmp = dst.with_suffix(".partial")
    try:
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.rename(dst)


def load_llama(gguf: Path, n_ctx: int, threads: int, use_mmap: bool = True):
    """A llama_cpp.Llama over `gguf` with room for `n_ctx` tokens; use_mmap=False reads the weights
    into memory instead of mapping the file (no page faults mid-decode when the page cache is short)."""
    import llama_cpp
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, use_mmap=use_mmap, verbose=False)


def decode_steps(gguf: Path, prompt: list[int], new_tokens: int, threads: int, llm=None
                 ) -> tuple[list[float], list[int]]:
    """Greedy decoding after `prompt`: seconds of each one-token step (the prefill left out) and the
    tokens. llm: a ``load_llama`` model to reuse (its cache is cleared first) instead of loading `gguf`."""
    import llama_cpp
    import numpy as np
    if llm is None:
        llm = load_llama(gguf, len(prompt) + new_tokens + 8, threads)
    llm.reset()
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


def gguf_tensor_bytes(gguf: Path) -> dict[str, int]:
    """Bytes of each tensor of a GGUF file as stored (its own quantization types), read with the
    gguf-py package of the same llama.cpp source."""
    sys.path.insert(0, str(llama_cpp_source() / "gguf-py"))
    from gguf import GGUFReader
    return {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors}
