"""Inference kernels for the sampling path: base linear weights laid out once for the CPU GEMM that serves
decode passes best, and an adapter's merged weights for passes whose rows all sample from it.

A decode step multiplies a handful of rows by every weight of the model once, and at a few rows the weight's
layout decides the speed. ``F.linear`` multiplies by the ``[out, in]`` weight transposed, which the default
CPU BLAS often handles badly at 2-64 rows. Two layouts serve those products better: a contiguous ``[in, out]``
copy for the default BLAS (``x @ W.T`` with ``W.T`` laid out once) and oneDNN's packed weights. Which one is
faster depends on the machine, and on a shared VM on the day: on the same 2-core AVX-512 instance type, one
thread, the 56 linears of builtin://small at 8 rows took 10.4 ms with ``F.linear``, 6.6 ms packed and 6.1 ms
transposed in session 9, and 14.9 / 11.6 / 14.8 ms in session 10 (the 100 MB of weights no longer
cache-resident). So a float32 model times both layouts on its own weights once, at 8 and 32 rows, when it
first samples (:func:`faster_layout`; ~0.1 s on builtin://small) and keeps the faster one only. bfloat16
weights always use oneDNN's packed layout, which wins there by far. The copy doubles the memory of the base
linear weights, so it is made lazily (first sampling call), only on CPU, and only under ``max_bytes``;
training and every gradient path keep the plain ``nn.Linear``. Either product differs from ``F.linear`` by
float32 rounding only, and no BLAS promises a row the same bits at every batch size, so a seeded request
samples the same tokens alone or batched unless a draw lands within rounding of a boundary
(``tests/sampler/test_decode_kernels.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 << 30  # pack at most 2 GiB of base weights (the copy costs as much memory)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether inference layouts of ``dtype`` can serve this device (float32: the transposed copy; bfloat16:
    oneDNN)."""
    if device.type != "cpu":
        return False
    if dtype == torch.float32:
        return True
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor, dtype: torch.dtype | None = None, *, dnn: bool = False) -> torch.Tensor:
    """``weight`` ([out, in]) laid out for :func:`linear`, in ``dtype`` (default: its own): packed for oneDNN
    (bfloat16 always, float32 when ``dnn``), else a contiguous ``[in, out]`` copy."""
    w = weight.detach()
    if dtype is not None and w.dtype != dtype:
        w = w.to(dtype)
    if w.dtype == torch.float32 and not dnn:
        return w.t().contiguous()
    return torch.ops.mkldnn._reorder_linear_weight(w, 8)


ONE_ROW_PLAIN = 2  # rows up to which a float32 oneDNN layout hands the product to F.linear on ``weight``


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
           weight: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the weight laid out by :func:`pack` (no-grad passes only). A float32
    ``x`` times bfloat16 packed weights (``sample_dtype``) multiplies in bfloat16 and returns float32. Given the
    plain float32 ``weight``, one or two rows multiply by it instead of oneDNN's float32 layout (a matrix-vector
    product reads the ``[out, in]`` rows in order, where oneDNN's packed kernel is ~30 % slower)."""
    if weight is not None and packed.is_mkldnn and packed.dtype == weight.dtype == torch.float32 \
            and x.numel() <= ONE_ROW_PLAIN * x.shape[-1]:
        return F.linear(x, weight, bias)
    if not packed.is_mkldnn:
        out = torch.matmul(x, packed)
        return out if bias is None else out.add_(bias)
    if x.dtype != packed.dtype:
        out = torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, None, "none", [], "").to(x.dtype)
        return out if bias is None else out.add_(bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_all(layers: Iterable[Any], *, device: torch.device, dtype: torch.dtype,
             max_bytes: int = DEFAULT_MAX_BYTES, weights: torch.dtype | None = None) -> bool:
    """Give every ``MultiLoraLinear`` of ``layers`` (a ``dtype`` model) a ``packed`` weight (:func:`pack`, in
    ``weights``, default ``dtype``); False (nothing packed) when not available or the copies would be larger
    than ``max_bytes``."""
    layers = list(layers)
    weights = weights or dtype
    if not layers or not available(device, weights):
        return False
    size = sum(m.base.weight.numel() * weights.itemsize for m in layers)
    if size > max_bytes:
        log.info("decode kernels: %d MiB of linear weights is above the %d MiB limit; not packed",
                 size >> 20, max_bytes >> 20)
        return False
    try:
        dnn, packed = faster_layout(layers) if weights == torch.float32 else (False, [])
        packed += [pack(m.base.weight, weights, dnn=dnn) for m in layers[len(packed):]]
        x = torch.zeros((1, layers[0].base.in_features), dtype=dtype, device=device)
        linear(x, packed[0], layers[0].base.bias)  # the kernel runs here, or we keep the default path
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - torch built without the oneDNN ops
        log.info("decode kernels unavailable (%s); using the default GEMM", e)
        return False
    for m, p in zip(layers, packed, strict=True):
        m.packed = p
    return True


PROBE_ROWS = (8, 32)
PROBE_BYTES = 256 << 20  # time the layouts on at most this much of the weights (whole layers, in order)


def faster_layout(layers: list[Any], rounds: int = 2) -> tuple[bool, list[torch.Tensor]]:
    """Whether oneDNN's packed float32 layout multiplies ``layers``' weights faster than the transposed copy on
    this machine (both timed on the same passes: ``PROBE_ROWS`` rows through every probed layer, alternating
    which goes first, ``rounds`` times; the sums compared), and the winner's weights of the probed layers.

    While it runs, both layouts of the probed layers exist at once: up to 2 × ``PROBE_BYTES`` (plus one layer)
    beyond the model, held until the loser's copies are dropped on return."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False, []
    probe, size = [], 0
    for m in layers:
        probe.append(m)
        size += m.base.weight.numel() * 4
        if size >= PROBE_BYTES:
            break
    kinds = {k: [pack(m.base.weight, torch.float32, dnn=k) for m in probe] for k in (False, True)}
    xs = {(r, m.in_features): torch.zeros((r, m.in_features)) for r in PROBE_ROWS for m in probe}
    spent = {False: 0.0, True: 0.0}
    with torch.no_grad():
        for i in range(rounds + 1):
            for k in ((False, True) if i % 2 else (True, False)):
                t0 = time.perf_counter()
                for r in PROBE_ROWS:
                    for m, w in zip(probe, kinds[k], strict=True):
                        linear(xs[(r, m.in_features)], w, None)
                if i:  # the first round warms both up
                    spent[k] += time.perf_counter() - t0
    log.info("decode kernels: float32 layouts over %d MiB of weights at %s rows: transposed %.1f ms, oneDNN "
             "%.1f ms", size >> 20, PROBE_ROWS, spent[False] * 1e3 / rounds, spent[True] * 1e3 / rounds)
    dnn = spent[True] < spent[False]
    return dnn, kinds[dnn]


MERGE_AFTER_TOKENS = 512  # tokens of single-adapter sampling passes before that adapter's merge is built
MAX_MERGED = 2  # adapters merged at once (least recently used goes first; each a copy of its layers)


@dataclass
class _Merge:
    key: tuple[Any, ...]
    layers: list[Any]
    nbytes: int


class Merged:
    """Adapters' merged weights (``W + scale * B @ A``, laid out by :func:`pack`) for sampling passes whose rows
    all use one.

    Such a forward runs one product per adapted layer instead of the base product plus the two LoRA ones (on
    builtin://small with a rank-8 adapter the LoRA products are ~12 % of a decode step). A merge costs a copy of
    the adapted layers' weights and, to build, about as much as the LoRA products of ~500 decoded tokens, so
    it is built only once ``MERGE_AFTER_TOKENS`` tokens went through single-adapter passes of the same weights
    (rent, then buy: never more than ~2x the better choice), for float32 models only (merging into bf16/fp16
    weights would round the LoRA update away), for at most ``MAX_MERGED`` adapters and ``max_bytes`` of weights.
    A merge is keyed on the adapter's parameter objects *and their version counters* (every in-place change
    bumps them), and the backend drops it whenever it changes the adapter (``optim_step``, ``load``,
    ``remove_adapter``), so a sample never sees stale weights. A layer without the routed adapter's merge (not
    adapted, or being rebuilt) takes the base product plus LoRA: the same numbers up to rounding.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._merges: OrderedDict[str, _Merge] = OrderedDict()
        self._seen: dict[str, tuple[tuple[Any, ...], int]] = {}  # adapter -> (key, tokens since that key)
        self.builds = 0
        self._lock = threading.Lock()  # the training thread drops while the sampling thread may build

    @staticmethod
    def _key(name: str, state: Any) -> tuple[Any, ...]:
        return (id(state), tuple((id(p), p._version) for p in state.parameters()))

    def adapters(self) -> list[str]:
        """The adapters merged now (least recently used first)."""
        return list(self._merges)

    def drop(self, adapter: str | None = None) -> None:
        """Forget ``adapter``'s merge and count (every adapter's when None)."""
        with self._lock:
            for name in list(self._merges) if adapter is None else [adapter]:
                self._remove(name)
            if adapter is None:
                self._seen.clear()
            else:
                self._seen.pop(adapter, None)

    def _remove(self, name: str) -> None:
        m = self._merges.pop(name, None)
        if m is not None:
            for layer in m.layers:
                layer.merged.pop(name, None)

    def use(self, name: str, state: Any, layers: dict[str, Any], tokens: int) -> bool:
        """Whether ``name``'s merged weights serve this forward of ``tokens`` tokens (built when due)."""
        with self._lock:
            key = self._key(name, state)
            m = self._merges.get(name)
            if m is not None:
                if m.key == key:
                    self._merges.move_to_end(name)
                    return True
                self._remove(name)  # stale (changed in place without a drop)
            seen_key, seen = self._seen.get(name, (None, 0))
            seen = seen + tokens if seen_key == key else tokens
            self._seen[name] = (key, seen)
            if seen < MERGE_AFTER_TOKENS:
                return False
            return self._build(name, key, state, layers)

    def _build(self, name: str, key: tuple[Any, ...], state: Any, layers: dict[str, Any]) -> bool:
        mods = [layers[m] for m in state.modules if layers[m].packed is not None]
        nbytes = sum(la.base.weight.numel() * la.base.weight.element_size() for la in mods)
        if not mods or nbytes > self.max_bytes:
            return False
        while self._merges and (len(self._merges) >= MAX_MERGED
                                or nbytes + sum(m.nbytes for m in self._merges.values()) > self.max_bytes):
            self._remove(next(iter(self._merges)))
        with torch.no_grad():
            for mod, layer in zip((m for m in state.modules if layers[m].packed is not None), mods, strict=True):
                pair, w = state.pairs[mod], layer.base.weight
                merged = torch.addmm(w.float(), pair.lora_B.float(), pair.lora_A.float(), alpha=pair.scale)
                layer.merged[name] = pack(merged.to(w.dtype), dnn=layer.packed.is_mkldnn)
        self._merges[name] = _Merge(key, mods, nbytes)
        self._seen.pop(name, None)
        self.builds += 1
        return True
