"""Exact kNN as block-wise matrix products in torch, on a GPU or the CPU.

Queries sit on the device; target vectors arrive block by block (from the
embeddings files, or a device cache when they fit); each block is one matrix
product and one top-k, merged into a running top-k on the device. Scores come
out in the compute dtype (float16 or bfloat16 products are fast on tensor
cores and on CPUs with AMX/AVX-512 BF16), which is why the caller takes more
candidates than it keeps and re-scores them exactly (`mining.knn.exact`).

On the CPU every step is deterministic: the same inputs give the same bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"search.device = {device!r}, but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on a GPU; bfloat16 on the CPU, where oneDNN runs it on
    AMX/AVX-512 BF16 several times faster than float16 or float32."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return DTYPES[dtype]


def to_device(vectors: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    array = np.ascontiguousarray(vectors)
    if not array.flags.writeable:
        # Arrays read zero-copy from Parquet are read-only; torch wants to own them.
        array = array.copy()
    # One rounding, in torch (float16 -> bfloat16 goes through float32 exactly).
    return torch.from_numpy(array).to(device=device, dtype=dtype)


@torch.inference_mode()
def block_topk(
    queries: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of queries @ targets.T per row -> (scores, positions into targets)."""
    scores = queries @ targets.T
    return torch.topk(scores, min(k, targets.shape[0]), dim=1, sorted=False)


@torch.inference_mode()
def knn(
    queries: np.ndarray,
    target_blocks: Iterable[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    k: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    query_rows: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best targets of every query over all target blocks.

    target_blocks yields (ids, vectors): numpy arrays (moved to the device
    here) or tensors already there. Returns (scores float32, ids int64), each
    (m, k), rows unsorted; ids are -1 where fewer than k targets exist.
    Memory on the device: the queries, one target block and
    query_rows x block score matrices.
    """
    m = len(queries)
    q = to_device(queries, device, dtype)
    best_scores = torch.full((m, k), float("-inf"), dtype=dtype, device=device)
    best_ids = torch.full((m, k), -1, dtype=torch.int64, device=device)
    for ids, vectors in target_blocks:
        if len(ids) == 0:
            continue
        t = vectors if isinstance(vectors, torch.Tensor) else to_device(vectors, device, dtype)
        t_ids = ids if isinstance(ids, torch.Tensor) else torch.from_numpy(ids).to(device)
        for lo in range(0, m, query_rows):
            hi = min(m, lo + query_rows)
            scores, positions = block_topk(q[lo:hi], t, k)
            merged_scores = torch.cat([best_scores[lo:hi], scores], dim=1)
            merged_ids = torch.cat([best_ids[lo:hi], t_ids[positions]], dim=1)
            top_scores, top = torch.topk(merged_scores, k, dim=1, sorted=False)
            best_scores[lo:hi] = top_scores
            best_ids[lo:hi] = torch.gather(merged_ids, 1, top)
    return best_scores.float().cpu().numpy(), best_ids.cpu().numpy()


class DeviceCache:
    """Target blocks kept on the device between query groups, when they fit.

    A GPU search of many query groups against one language would otherwise
    read and upload the same vectors once per group. The cache holds at most
    `budget_bytes`; past that, blocks stream from disk every time.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.blocks: list[tuple[torch.Tensor, torch.Tensor]] = []

    def blocks_for(
        self,
        key: tuple,
        source: Iterable[tuple[np.ndarray, np.ndarray]],
        device: torch.device,
        dtype: torch.dtype,
        budget_bytes: int,
    ) -> Iterator[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]]:
        if self.key == key:
            yield from self.blocks
            return
        self.key, self.blocks = None, []
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        used = 0
        complete = True
        for ids, vectors in source:
            t = to_device(vectors, device, dtype)
            t_ids = torch.from_numpy(ids).to(device)
            if complete and used + t.numel() * t.element_size() <= budget_bytes:
                kept.append((t_ids, t))
                used += t.numel() * t.element_size()
            else:
                complete = False
                kept.clear()
            yield t_ids, t
        if complete:
            self.key, self.blocks = key, kept

    def clear(self) -> None:
        self.key, self.blocks = None, []
