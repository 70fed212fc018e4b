"""The fused CPU kernel of the equivariant transformer's per-edge part (``csrc/et_edges.cpp``).

The kernel computes a layer's attention-weighted scalar messages and vector messages and sums them into
their atoms in one pass over the edges, without materialising any ``[E, F]`` or ``[E, 3, F]`` message
tensor; its backward recomputes the per-edge terms from the inputs. Each atom's row is summed by one thread
in CSR order, so the results do not depend on the thread count and a run is deterministic.

It is built by ``make install`` (``scd build-kernel``) or on first use, with torch's C++ extension loader (a C++
compiler and ``ninja`` are needed; the build takes about a minute and is cached under ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``, one folder per Python and torch version), with the vector instructions of the CPU
it runs on (the extension's name carries them, so a cache shared by different CPUs keeps one build per kind;
``SCD_VERBOSE_BUILD=1`` prints the compiler's output). :func:`kernel` returns ``None``, with one warning, when the
build fails; the model then uses its plain PyTorch path.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "et_edges.cpp"
# ATen's vector types (the kernel's silu uses their exp) built for AVX2 where the CPU has it; else scalar code
_AVX2 = ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
_ISA_FLAGS = {"AVX2": ("avx2", _AVX2), "AVX512": ("avx2", _AVX2)}


STALE_LOCK_S = 600.0  # a build takes about a minute: a lock this old was left by a killed build


@functools.lru_cache(maxsize=1)
def kernel() -> Any | None:
    """The compiled extension module, built (or loaded from the cache) once per process; None if it fails."""
    from torch.utils.cpp_extension import load

    tag, isa_flags = _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ("default", []))
    name = f"scd_et_edges_{tag}"
    try:
        build_dir = build_directory(name)
        build_dir.mkdir(parents=True, exist_ok=True)
        drop_stale_lock(build_dir / "lock")
        if not (build_dir / f"{name}.so").exists():
            print(f"building the fused ET edge kernel in {build_dir} (once, about a minute)", file=sys.stderr,
                  flush=True)
        return load(name=name, sources=[str(SOURCE)], build_directory=str(build_dir),
                    extra_cflags=["-O3", "-fopenmp", *isa_flags], extra_ldflags=["-fopenmp"],
                    verbose=bool(os.environ.get("SCD_VERBOSE_BUILD")))
    except Exception as exc:  # any build or load failure: keep training on the plain path
        log.warning("the fused ET edge kernel could not be built (%s: %s); using the PyTorch path",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def build_directory(name: str) -> Path:
    """Where extension ``name`` is built and cached: under ``$TORCH_EXTENSIONS_DIR`` (else torch's default root),
    one folder per Python and torch version (a build is not loadable by another torch)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    version = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}".replace("+", "_")
    return Path(root) / version / name


def drop_stale_lock(lock: Path) -> None:
    """Remove the build lock of a build that was killed (torch's loader would wait for it forever)."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("removing the stale build lock %s (%.0f s old: its build was killed)", lock, age)
        lock.unlink(missing_ok=True)


def usable(inputs: tuple[Tensor | None, ...], geometry: tuple[Tensor, ...]) -> bool:
    """Whether the fused path applies: float32/64 CPU tensors, eager mode, no gradient needed through the
    ``geometry`` tensors (cutoff, unit vectors: forces need it), and the kernel built."""
    if torch.compiler.is_compiling() or any(t.requires_grad for t in geometry):
        return False
    present = [t for t in (*inputs, *geometry) if t is not None]
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in present) \
        and kernel() is not None


class ETEdges(torch.autograd.Function):
    """``(x [N, F], vec [N, 3, F])`` sums of one ET layer's edge messages; see the kernel's header comment.

    Inputs: ``qkv [N, 5F]`` (queries, keys, three value parts), ``vec [N, 3, F]`` or None (zero vectors),
    ``pre_k [E, F]``, ``pre_v [E, 3F]`` and ``bias [4F]`` (the distance filters are ``silu([pre_k | pre_v] + bias)``),
    ``cut [E]``, ``unit [E, 3]`` and ``graph`` (:meth:`EdgeOps.kernel_graph`). Gradients flow to ``qkv``, ``vec``,
    ``pre_k``, ``pre_v`` and ``bias``;
    ``cut`` and ``unit`` must not need them (the model falls back to the PyTorch path when positions need
    gradients, e.g. for forces). First-order only.
    """

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, vec: Tensor | None, pre_k: Tensor, pre_v: Tensor, bias: Tensor, cut: Tensor,
                unit: Tensor, graph: tuple[Tensor, ...], heads: int, vector_cutoff: bool) -> tuple[Tensor, Tensor]:
        mod = kernel()
        assert mod is not None, "ETEdges needs the compiled kernel"
        has_vec = vec is not None
        vec_t = vec.contiguous() if vec is not None else qkv.new_zeros(0)
        args = tuple(t.contiguous() for t in (qkv, vec_t, pre_k, pre_v, bias, cut, unit))
        ctx.save_for_backward(*args, *graph)
        ctx.heads, ctx.has_vec, ctx.vector_cutoff = heads, has_vec, vector_cutoff
        out_x, out_v = mod.forward(*args, *graph, heads, has_vec, vector_cutoff)
        return out_x, out_v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, gx: Tensor, gv: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        args, graph = saved[:7], saved[7:]
        mod = kernel()
        assert mod is not None, "ETEdges needs the compiled kernel"
        g_qkv, g_vec, g_k, g_v = mod.backward(gx.contiguous(), gv.contiguous(), *args, *graph, ctx.heads,
                                              ctx.has_vec, ctx.vector_cutoff)
        g_bias = torch.cat([g_k.sum(0), g_v.sum(0)])
        return g_qkv, (g_vec if ctx.has_vec else None), g_k, g_v, g_bias, None, None, None, None, None
