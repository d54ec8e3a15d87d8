"""Corral's own CPU kernels for 4-bit and 8-bit block weights (``q4q8.c``) and GGUF's K-quants
(``kquant.c``), built at first use.

The C files are compiled into one library with the system compiler (``$CORRAL_CC``, else ``gcc``, else ``cc``) into
``$CORRAL_HOME/kernels`` (default ``~/.cache/corral/kernels``), named by a hash of the source, the
compiler, its flags and the CPU's SIMD flags, and loaded with ctypes. Two processes building at once
each compile to a private temporary file and rename it into place, so neither sees a half-written file.
Without a compiler, or if the build fails, ``available()`` is False, ``unavailable_reason()`` says why,
and callers keep torch's kernels (``corral.kernels.linear.gguf_linear`` does that choice).

Threads: the kernels' own pool (``pool.c``), not OpenMP: libgomp keeps a pool per calling thread and,
once its threads outnumber the CPUs (a server's worker thread next to the main thread), stops spinning
and sleeps between regions, which cost 60% of decode speed off the main thread. The pool's workers
serve whichever thread calls. The thread count follows ``torch.get_num_threads()`` at each call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(n) for n in ("q4q8.c", "kquant.c", "pool.c"))
KIND_Q4, KIND_Q8, KIND_KQ = 0, 1, 2
QK = 32  # elements per block
TILE_ROWS = 8  # weight rows per tile in the repacked layout
# Products smaller than this many multiply-adds per thread run on one thread: a second thread's wake-up
# and the join cost more than they save below it (measured with bench/kernels.py on 2 cores).
MIN_WORK_PER_THREAD = 1 << 18
BASE_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fno-math-errno")
SIMD_FLAGS = ("-mavx2", "-mfma", "-mf16c")

_lock = threading.Lock()
_state: dict = {}  # "lib" or "reason", once loaded
_force_scalar = os.environ.get("CORRAL_KERNELS_SCALAR", "") not in ("", "0")


def cache_dir() -> Path:
    home = os.environ.get("CORRAL_HOME")
    return Path(home) / "kernels" if home else Path.home() / ".cache" / "corral" / "kernels"


def cpu_simd_flags() -> tuple[str, ...]:
    """The compiler flags for the SIMD this CPU has: AVX2 + FMA + F16C together, or none."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return SIMD_FLAGS if {"avx2", "fma", "f16c"} <= set(line.split()) else ()


def _compiler() -> str | None:
    name = os.environ.get("CORRAL_CC")
    if name:
        return shutil.which(name)  # an explicit choice that is missing means no compiler, not another one
    return shutil.which("gcc") or shutil.which("cc")


def _build(cc: str, flags: list[str]) -> Path:
    """Compile into the cache unless a library for this exact source + compiler + flags is there already."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), cc, version, *flags]).encode()).hexdigest()[:16]
    out = cache_dir() / f"q4q8-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".q4q8-{key}.", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed: {proc.stderr.strip()[-400:]}")
        os.replace(tmp, out)  # atomic: a concurrent builder's identical file may be replaced, never torn
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.corral_matmul.argtypes = [i32, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i32, i32, i64]
    lib.corral_matmul.restype = i32
    lib.corral_linear.argtypes = [ptr, ptr, i64, ptr, i32, i32]
    lib.corral_linear.restype = i32
    lib.corral_quantize_rows.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i32]
    lib.corral_quantize_rows.restype = None
    lib.corral_exp_inplace.argtypes = [ptr, i64]
    lib.corral_exp_inplace.restype = ctypes.c_float
    lib.corral_attn_decode.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i32, i32, i32, ptr, i64, ptr, i32, i32]
    lib.corral_attn_decode.restype = i32
    f32 = ctypes.c_float
    lib.corral_block_step.argtypes = [ptr, i64, i32, ptr, ptr, f32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64,
                                      i32, i32, i32, ptr, i32, i32, i32, i32]
    lib.corral_block_step.restype = i32
    lib.corral_kq_linear.argtypes = [ptr, ptr, i64, ptr, i32, i32]
    lib.corral_kq_linear.restype = i32
    lib.corral_kq_quantize_rows.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i32]
    lib.corral_kq_quantize_rows.restype = None
    lib.corral_kq_dequant_rows.argtypes = [i32, ptr, i64, ptr, i64, ptr]
    lib.corral_kq_dequant_rows.restype = None
    lib.corral_kq_block_bytes.argtypes = [i32]
    lib.corral_kq_block_bytes.restype = i64
    lib.corral_kernels_simd.restype = i32
    lib.corral_kernels_openmp.restype = i32
    lib.corral_pool_workers.restype = i32
    return lib


def _load() -> dict:
    cc = _compiler()
    if cc is None:
        return {"reason": f"no C compiler found ({os.environ.get('CORRAL_CC') or 'gcc/cc'})"}
    flags = [*BASE_FLAGS, *cpu_simd_flags(), "-pthread"]  # threads: pool.c (POSIX threads and Linux futexes)
    try:
        return {"lib": _declare(ctypes.CDLL(str(_build(cc, flags)))), "flags": flags}
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return {"reason": f"kernel build failed: {exc}"}


def _get() -> dict:
    if not _state:
        with _lock:
            if not _state:
                _state.update(_load())
    return _state


def available() -> bool:
    """Whether the kernels built and loaded (builds on the first call, a second or two)."""
    return "lib" in _get()


def unavailable_reason() -> str | None:
    return _get().get("reason")


def library() -> ctypes.CDLL:
    state = _get()
    if "lib" not in state:
        raise RuntimeError(f"corral kernels unavailable: {state['reason']}")
    return state["lib"]


def has_simd() -> bool:
    """Whether the loaded library has the AVX2 path (else every call runs the scalar path)."""
    return bool(library().corral_kernels_simd())


def set_force_scalar(flag: bool) -> bool:
    """Run the scalar path even where AVX2 is compiled in (tests compare both); returns the old setting."""
    global _force_scalar
    old, _force_scalar = _force_scalar, bool(flag)
    return old


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) float32 -> xq (M, K) int8, xd (M, K/32) scales, xs (M, K/32) sums of xq: what the matmul uses."""
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8)
    xd, xs = torch.empty(M, K // QK), torch.empty(M, K // QK)
    library().corral_quantize_rows(x.data_ptr(), M, K, q.data_ptr(), xd.data_ptr(), xs.data_ptr(),
                                   int(not _force_scalar))
    return q, xd, xs


def simd_flag() -> int:
    """The `simd` argument of the C entry points: 0 while set_force_scalar(True) is in effect."""
    return int(not _force_scalar)


def weight_descriptor(kind: int, in_features: int, out_features: int, qs: torch.Tensor, scales: torch.Tensor,
                      mins: torch.Tensor | None):
    """The int64[7] block `corral_linear` reads a module's weights from; it holds raw pointers, so the
    caller keeps the tensors alive and rebuilds it when they change."""
    ptrs = (qs.data_ptr(), scales.data_ptr(), 0 if mins is None else mins.data_ptr())
    return (ctypes.c_int64 * 7)(kind, in_features, out_features, *ptrs, MIN_WORK_PER_THREAD)


def block_matmul(x: torch.Tensor, kind: int, qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 out_features: int) -> torch.Tensor:
    """x (M, K) float32 contiguous @ repacked block weights.T -> (M, out_features) float32.

    qs, scales, mins are the buffers of corral.kernels.linear's modules (scales/mins fp16 bits as uint8);
    mins None is Q4_0 (or Q8). Kept thin: it runs 200+ times per decoded token.
    """
    M, K = x.shape
    y = torch.empty(M, out_features)
    lib = _state.get("lib") or library()
    rc = lib.corral_matmul(kind, x.data_ptr(), M, K, out_features, qs.data_ptr(), scales.data_ptr(),
                                     None if mins is None else mins.data_ptr(), y.data_ptr(),
                                     torch.get_num_threads(), int(not _force_scalar), MIN_WORK_PER_THREAD)
    if rc != 0:
        raise MemoryError("corral kernels: out of memory for the activation buffer")
    return y
