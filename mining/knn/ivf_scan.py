"""List-major search of an IVF index for large query batches, on the CPU.

FAISS's IVF search walks the index query by query: each query scans its
probed lists with vector code that does a few GFLOP/s per core. Mining
searches a whole corpus against another, so the queries come in large
batches, and the work can be turned around (as faiss.contrib.big_batch_search
does): assign the batch to lists, then for each inverted list score every
query that probes it in one matrix product, and keep each query's best in a
heap. The products run in torch, in bfloat16 on CPUs with AMX or AVX-512 BF16
(several times faster than float32 on two cores), which is why the caller
re-scores the candidates exactly.

Supported: IVF-Flat, IVF-ScalarQuantizer and IVF-PQ lists, with or without a
vector transform in front (OPQ, PCA), with any coarse quantizer. Results
equal a FAISS search with the same nprobe up to the precision of the product
and ties.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import torch

from mining.knn import CPU_THREADS
from mining.knn.faiss_index import split_transforms
from mining.knn.torch_knn import to_device

# Score matrix elements per product; larger lists are scored in row chunks.
MAX_SCORES = 1 << 24
# Lists up to this long pass all their scores to the heap; longer ones a top-k.
HEAP_DIRECT = 512


def supports(index: faiss.Index) -> bool:
    _, inner = split_transforms(index)
    return isinstance(
        inner, (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQ)
    ) and not isinstance(inner, faiss.IndexIVFPQR)


class ListMajorSearcher:
    def __init__(self, index: faiss.Index, dtype: torch.dtype) -> None:
        if not supports(index):
            raise ValueError(f"list-major search does not support {type(index).__name__}")
        self.chain, self.ivf = split_transforms(index)
        if self.ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("list-major search is written for inner-product indexes")
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.invlists = faiss.downcast_InvertedLists(self.ivf.invlists)
        self.decode = self._decoder()
        self.by_residual = bool(getattr(self.ivf, "by_residual", False))
        quantizer = faiss.downcast_index(self.ivf.quantizer)
        # A flat quantizer is a matrix product too; any other (HNSW) searches itself.
        self.centroids = (
            to_device(quantizer.reconstruct_n(0, self.ivf.nlist), self.device, dtype)
            if isinstance(quantizer, faiss.IndexFlat)
            else None
        )
        self.quantizer = quantizer

    def _decoder(self) -> Callable[[np.ndarray], np.ndarray]:
        ivf = self.ivf
        if isinstance(ivf, faiss.IndexIVFFlat):
            return lambda codes: codes.view(np.float32)
        if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
            if ivf.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
                return lambda codes: codes.view(np.float16)
            return ivf.sq.decode
        return ivf.pq.decode

    def _assign(
        self, x: np.ndarray, xt: torch.Tensor, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = np.empty((len(xt), nprobe), dtype=np.float32)
        lists = np.empty((len(xt), nprobe), dtype=np.int64)
        rows = max(1, MAX_SCORES // self.ivf.nlist)  # bounds the score matrix
        for lo in range(0, len(xt), rows):
            if self.centroids is None:
                part = np.ascontiguousarray(x[lo : lo + rows], dtype=np.float32)
                scores[lo : lo + rows], lists[lo : lo + rows] = self.quantizer.search(part, nprobe)
                continue
            top = torch.topk(xt[lo : lo + rows] @ self.centroids.T, nprobe, dim=1)
            scores[lo : lo + rows] = top.values.float().numpy()
            lists[lo : lo + rows] = top.indices.numpy()
        return scores, lists

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (scores float32 (m, k), positions int64 (m, k)); -1 where fewer were found.

        The queries are cut into one contiguous part per thread, each searched
        whole (assignment, every list it probes, its own heap) by one thread:
        the products are small, so threads over parts beat each product spread
        over cores (whose barriers cost more than the product on a loaded
        machine), and no partial results need merging. A query's result does
        not depend on the part it is in.
        """
        x = queries  # float16 goes to torch as it is; transforms need float32
        if self.chain:
            x = np.ascontiguousarray(x, dtype=np.float32)
            for vt in self.chain:
                x = vt.apply(x)
        nprobe = min(nprobe, self.ivf.nlist)
        parts = [p for p in np.array_split(np.arange(len(x)), CPU_THREADS) if len(p)]
        if not parts:
            return self._search_part(x, k, nprobe)
        # Each product is small: torch's intra-op pool would spread it over the
        # cores with barriers that cost more than the product (and more still on
        # a loaded machine). Single-threaded products, one thread per part, keep
        # the cores busy instead. This process runs nothing else in torch
        # meanwhile, so the pool size is set for the scan and put back after.
        pool_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(len(parts)) as pool:
                results = list(pool.map(lambda rows: self._search_part(x[rows], k, nprobe), parts))
        finally:
            torch.set_num_threads(pool_threads)
        return (
            np.concatenate([r[0] for r in results]),
            np.concatenate([r[1] for r in results]),
        )

    @torch.inference_mode()
    def _search_part(self, x: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        # The heap's own OpenMP loop would contend with the other threads; the
        # setting is this thread's only.
        faiss.omp_set_num_threads(1)
        m = len(x)
        xt = to_device(x, self.device, self.dtype)
        coarse, lists = self._assign(x, xt, nprobe)
        flat = lists.reshape(-1)
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(self.ivf.nlist + 1))
        coarse_flat = coarse.reshape(-1)
        heap = faiss.ResultHeap(m, k, keep_max=True)
        for list_no in np.flatnonzero(np.diff(bounds)):
            size = self.invlists.list_size(int(list_no))
            if size == 0:
                continue
            ids, codes = _get_list(self.invlists, int(list_no), size)
            decoded = self.decode(codes)
            padded = np.zeros((bucket(size), decoded.shape[1]), dtype=decoded.dtype)
            padded[:size] = decoded
            vectors = to_device(padded, self.device, self.dtype)
            picked = order[bounds[list_no] : bounds[list_no + 1]]
            rows = max(1, MAX_SCORES // size)
            for lo in range(0, len(picked), rows):
                chunk = picked[lo : lo + rows]
                who = chunk // nprobe
                gather = np.resize(who, bucket(len(who)))  # pads by repeating rows
                scores = (xt[torch.from_numpy(gather)] @ vectors.T)[: len(who), :size]
                if size > HEAP_DIRECT:
                    top = torch.topk(scores, min(k, size), dim=1)
                    values = top.values.float().numpy()
                    labels = ids[top.indices.numpy()]
                else:
                    # Short lists go to the heap whole: cheaper than a top-k first.
                    values = scores.float().numpy()
                    labels = ids  # one id row shared by all (the heap's id stride 0)
                if self.by_residual:
                    # <q, c + r> = <q, c> + <q, r>: the coarse score is the centroid term.
                    values = values + coarse_flat[chunk, None]
                heap.add_result_subset(
                    who.astype(np.int64),
                    np.ascontiguousarray(values, dtype=np.float32),
                    np.ascontiguousarray(labels),
                )
        heap.finalize()
        return heap.D, heap.I


def bucket(n: int) -> int:
    """n rounded up to a quarter-octave step (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, ...).

    oneDNN compiles a kernel per matrix shape and keeps it; lists and their
    query sets come in every size, so products are padded to these sizes
    (at most 25% more work) to keep the kernels few and memory flat.
    """
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return -(-n // step) * step


def _get_list(
    invlists: faiss.InvertedLists, list_no: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, codes) of one inverted list, copied out (the lists may be memory-mapped)."""
    ids = np.empty(size, dtype=np.int64)
    codes = np.empty((size, invlists.code_size), dtype=np.uint8)
    ids_ptr = invlists.get_ids(list_no)
    codes_ptr = invlists.get_codes(list_no)
    try:
        faiss.memcpy(faiss.swig_ptr(ids), ids_ptr, ids.nbytes)
        faiss.memcpy(faiss.swig_ptr(codes), codes_ptr, codes.nbytes)
    finally:
        invlists.release_ids(list_no, ids_ptr)
        invlists.release_codes(list_no, codes_ptr)
    return ids, codes
