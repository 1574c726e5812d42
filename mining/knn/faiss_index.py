"""Building, saving and loading FAISS indexes over L2-normalised vectors.

Inner product on unit vectors is cosine similarity, so every index here is
built with METRIC_INNER_PRODUCT.

The `auto` ladder, by the number n of vectors of a language and their dim:

    n <= exact_limit          Flat                      exact
    dim <= 256, n <= 2e7      IVF{L},SQfp16             exact codes, approximate lists
    otherwise                 OPQ{m}_{r},IVF{L},PQ{m}   reduced to r <= 256 dims, m-byte codes

with L, the number of inverted lists, a power of two near 4 sqrt(n) (FAISS's
rule of thumb is 4 to 16 sqrt(n)) and an HNSW coarse quantizer once L passes
2^14, where a flat one would cost more per query than the lists it picks.
SQfp16 codes are the float16 vectors themselves (stored without residual), so
for our inputs they are exact; PQ codes are not, which is why search re-scores
candidates exactly (`mining.knn.exact`).
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from mining.store import atomic_path

# Up to this many vectors a flat (exact) index is the default: one query block
# against 10^6 vectors is a single large matrix product (seconds on a GPU).
EXACT_LIMIT = 1_000_000
# Past this, even 2-byte-per-dimension codes are too large to keep per language.
SQ_LIMIT = 20_000_000
HNSW_QUANTIZER_LISTS = 1 << 14


# FAISS's k-means wants at least this many training points per centroid.
MIN_POINTS_PER_LIST = 39


def ivf_lists(n: int) -> int:
    """A power of two near 4 sqrt(n) (FAISS's rule of thumb is 4 to 16 sqrt(n)),
    and no more than n can train.

    Measured at 10^6 vectors (bench/README.md): 4096 lists probed 16 at a time
    find more true neighbours than 2048 probed 8 at the same search time; the
    fewer lists only train and fill faster.
    """
    lists = 1 << round(math.log2(4 * math.sqrt(max(n, 1))))
    trainable = 1 << int(math.log2(max(n // MIN_POINTS_PER_LIST, 1)))
    return int(min(max(lists, 64), trainable, 1 << 20))


def resolve_factory(kind: str, n: int, dim: int, exact_limit: int = EXACT_LIMIT) -> str:
    """The FAISS factory string for `index.type` (which may be "auto")."""
    if kind != "auto":
        return kind
    if n <= exact_limit:
        return "Flat"
    lists = ivf_lists(n)
    ivf = f"IVF{lists}_HNSW32" if lists > HNSW_QUANTIZER_LISTS else f"IVF{lists}"
    if dim <= 256 and n <= SQ_LIMIT:
        return f"{ivf},SQfp16"
    # PQ sub-vectors of 4 dims (8-bit codes) after a rotation (OPQ) that also
    # reduces large vectors (4096-dim m-ST5) to 256: PQ on the raw dimension
    # would need codebooks far too large to train well.
    reduced = min(dim, 256)
    m = max(1, reduced // 4)
    while reduced % m:
        m -= 1
    return f"OPQ{m}_{reduced},{ivf},PQ{m}"


def lossless_codes(index: faiss.Index) -> bool:
    """Whether the stored codes reproduce our float16 vectors exactly."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        return False
    if isinstance(inner, faiss.IndexIVF):
        if isinstance(inner, faiss.IndexIVFFlat):
            return True
        if isinstance(inner, faiss.IndexIVFScalarQuantizer):
            return inner.sq.qtype in (faiss.ScalarQuantizer.QT_fp16,) and not inner.by_residual
        return False
    if isinstance(inner, faiss.IndexFlat):
        return True
    if isinstance(inner, faiss.IndexScalarQuantizer):
        return inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    return False


def new_index(factory: str, dim: int) -> faiss.Index:
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(
            f"index.type: FAISS cannot build {factory!r} for dim {dim}: {err}"
        ) from None
    ivf = ivf_of(index)
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer) and (
        ivf.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    ):
        # float16 codes of the vectors themselves are exact for our
        # (float16) inputs; of residuals they would not be.
        ivf.by_residual = False
    for part in (ivf, split_transforms(index)[1]):
        if hasattr(part, "do_polysemous_training"):
            # Polysemous training reorders PQ codes for Hamming-distance
            # filtering, which search never uses; it is slow to train.
            part.do_polysemous_training = False
    return index


def split_transforms(index: faiss.Index) -> tuple[list[faiss.VectorTransform], faiss.Index]:
    """(the vector transforms in front of an index, in order; the index they feed)."""
    index = faiss.downcast_index(index)
    chain: list[faiss.VectorTransform] = []
    while isinstance(index, faiss.IndexPreTransform):
        chain += [
            faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())
        ]
        index = faiss.downcast_index(index.index)
    return chain, index


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else faiss.downcast_index(ivf)


def default_nprobe(lists: int) -> int:
    """Lists probed per query: 1/256 of them, at least 16 and at most 256.

    The fraction probed shrinks as the lists grow in number, which is what
    keeps search sub-quadratic; bench/knn_scale.py records the recall it gives.
    """
    return int(min(max(lists // 256, 16), 256, lists))


def set_nprobe(index: faiss.Index, nprobe: int) -> int:
    """Set the lists probed per query (0 = `default_nprobe`); returns what was set."""
    ivf = ivf_of(index)
    if ivf is None:
        return 0
    value = nprobe or default_nprobe(ivf.nlist)
    value = min(value, ivf.nlist)
    ivf.nprobe = value
    return value


def code_bytes(factory: str, dim: int) -> int:
    """Bytes one vector takes in an index of this type (code + id), for sizing shards."""
    index = new_index(factory, dim)
    try:
        size = int(index.sa_code_size())
    except RuntimeError:
        size = 4 * dim  # a type without standalone codes: assume float32 storage
    if ivf_of(index) is not None:
        size += 8  # the id stored beside each code in its inverted list
    return max(size, 1)


def save_index(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: Path, mmap: bool = True) -> faiss.Index:
    """Read an index; memory-mapped where the index type allows it.

    Mapped pages are file cache, not process memory the kernel must keep:
    under pressure it drops them and reads them again, so a search's memory
    is bounded by what it touches, not by the index size.
    """
    if mmap:
        # IO_FLAG_MMAP_IFC maps flat codes and inverted lists alike (recent FAISS);
        # IO_FLAG_MMAP maps inverted lists only. Combined, FAISS refuses IVF files.
        for flag in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP"):
            if hasattr(faiss, flag):
                try:
                    return faiss.read_index(
                        str(path), getattr(faiss, flag) | faiss.IO_FLAG_READ_ONLY
                    )
                except RuntimeError:
                    continue  # this index type cannot be mapped this way
    return faiss.read_index(str(path))


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


_GPU_RESOURCES: list = []


def to_gpu(index: faiss.Index, nprobe: int = 0, device: int = 0) -> faiss.Index:
    """Copy an index to a GPU (faiss-gpu builds only); float16 storage for flat codes."""
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    options = faiss.GpuClonerOptions()
    # Our vectors are float16 already: storing them so on the GPU is exact
    # and halves its memory.
    options.useFloat16 = True
    gpu_index = faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], device, index, options)
    if nprobe:
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", nprobe)
    return gpu_index


def as_float32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)
