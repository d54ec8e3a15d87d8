"""Record llama.cpp's quantized blocks for a fixed set of float32 weights, one entry per ggml type.

tests/checkpoint/test_kquants.py checks that Corral's quantizers give these bytes exactly, so CI
needs no llama.cpp. The blocks come from ``ggml_quantize_chunk`` (what ``llama_model_quantize``
calls per tensor, no importance matrix) in the libggml-base that llama-cpp-python ships:

    python -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python==0.3.36 numpy
    /tmp/llamacpp/bin/python scripts/record_llamacpp_kquants.py

The inputs are stored in the golden file too, so a change in numpy's random streams cannot move them.
"""

import base64
import ctypes
import hashlib
import json
from pathlib import Path

import llama_cpp
import numpy as np

# ggml type ids (ggml.h) and bytes per block of 32 (legacy) or 256 (K) weights.
TYPES = {"Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
         "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210)}


def weights() -> np.ndarray:
    """(16, 256) float32: ordinary rows and the corners of the block search (zeros, constants, spikes)."""
    rng = np.random.default_rng(19)
    rows = [
        rng.standard_normal(256) * 0.02,                      # a trained layer's scale
        rng.standard_normal(256),
        rng.uniform(-1, 1, 256),
        rng.standard_t(2, 256) * 0.05,                        # heavy tails
        np.abs(rng.standard_normal(256)),                     # all positive: min clamps to 0
        -np.abs(rng.standard_normal(256)),                    # all negative
        np.round(rng.standard_normal(256) * 3),               # exact levels, many ties
        np.zeros(256),                                        # all zero
        np.full(256, 0.75),                                   # constant positive
        np.full(256, -2.5),                                   # constant negative
        np.where(np.arange(256) < 128, 0.0, rng.standard_normal(256)),  # zero sub-blocks
        rng.standard_normal(256) * 1e-20,                     # below GROUP_MAX_EPS in places
        np.where(np.arange(256) == 77, 1e4, rng.standard_normal(256) * 0.01),  # one outlier
        np.where(np.arange(256) % 2 == 0, 0.0, rng.standard_normal(256)),
        rng.standard_normal(256) * np.repeat(np.exp(rng.standard_normal(16) * 2), 16),  # sub-block scales apart
        rng.standard_normal(256) * 1e3,
    ]
    return np.stack(rows).astype(np.float32)


def main() -> None:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = weights()
    blocks = {}
    for name, (type_id, _, block_bytes) in TYPES.items():
        out = np.zeros(x.size // TYPES[name][1] * block_bytes, np.uint8)
        n = ggml.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        assert n == out.size, (name, n, out.size)
        blocks[name] = base64.b64encode(out.tobytes()).decode()
    golden = {
        "source": f"ggml_quantize_chunk, libggml-base of llama-cpp-python {llama_cpp.__version__}, no imatrix",
        "shape": list(x.shape),
        "weights_f32": base64.b64encode(x.tobytes()).decode(),
        "weights_sha256": hashlib.sha256(x.tobytes()).hexdigest(),
        "blocks": blocks,
    }
    dest = Path(__file__).resolve().parents[1] / "tests" / "golden" / "llamacpp_quant_blocks.json"
    dest.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {dest} ({len(blocks)} types, {x.shape[0]} rows of {x.shape[1]})")


if __name__ == "__main__":
    main()
