"""The Parquet schemas at each stage boundary, and the sentence-id layout.

A stage reads only what the stage before it wrote, so these schemas are the
whole interface between stages. Readers check them, so that a file written by
another version or another tool fails loudly with its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# A sentence id is (shard number, line number) packed into one int64: stable
# across reruns and task orders, and traceable to a file and a line.
LINE_BITS = 40
MAX_LINE = (1 << LINE_BITS) - 1
MAX_SHARDS = 1 << (63 - LINE_BITS)


def sentence_id(shard_index: int, line: int) -> int:
    return (shard_index << LINE_BITS) | line


def sentence_ids(shard_index: int, lines: np.ndarray) -> np.ndarray:
    return (np.int64(shard_index) << np.int64(LINE_BITS)) | lines.astype(np.int64)


def split_id(sid: int) -> tuple[int, int]:
    return sid >> LINE_BITS, sid & MAX_LINE


SENTENCES = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        # "path:line" of the source text, 1-based line.
        pa.field("origin", pa.string(), nullable=False),
    ]
)


def embeddings_schema(dim: int) -> pa.Schema:
    # Each vector is dim float16 values stored as one fixed_size_binary(2 * dim)
    # cell, little-endian. Measured (bench/read_embeddings.py): Parquet keeps a
    # fixed-size list as a repeated field with levels per element and decodes
    # 4096-dim vectors at 0.1-0.5 GB/s on 2 cores; the binary column reads
    # through its one value buffer at 1.3-2.4 GB/s. The field metadata says
    # how to read the bytes, for pandas, DuckDB or a person.
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field(
                "vector",
                pa.binary(2 * dim),
                nullable=False,
                metadata={"mining.dtype": "float16", "mining.dim": str(dim)},
            ),
        ]
    )


def vector_dim(vector_type: pa.DataType) -> int:
    """The dimension of an embeddings file's `vector` column type."""
    if isinstance(vector_type, pa.FixedSizeBinaryType) and vector_type.byte_width % 2 == 0:
        return vector_type.byte_width // 2
    raise ContractError(f"column 'vector' is {vector_type}, expected fixed_size_binary(2 * dim)")


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(n, dim) array -> the `vector` column (cast to little-endian float16)."""
    matrix = np.ascontiguousarray(vectors, dtype="<f2")
    n, dim = matrix.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * dim), n, [None, pa.py_buffer(matrix)])


def vectors_to_numpy(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """The `vector` column -> (n, dim) float16, zero-copy for a single chunk."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    views = []
    for chunk in chunks:
        if chunk.null_count:
            raise ContractError("null rows in the vector column")
        data = chunk.buffers()[1]
        flat = np.frombuffer(data, dtype="<f2", count=(chunk.offset + len(chunk)) * dim)
        views.append(flat[chunk.offset * dim :].reshape(len(chunk), dim))
    if len(views) == 1:
        return views[0]
    # Several row groups: one copy into one array (np.concatenate's list of
    # temporaries measured slower).
    out = np.empty((sum(len(v) for v in views), dim), dtype=np.float16)
    row = 0
    for v in views:
        out[row : row + len(v)] = v
        row += len(v)
    return out


def embeddings_table(ids: np.ndarray, vectors: np.ndarray) -> pa.Table:
    return pa.table(
        {"id": np.asarray(ids, dtype=np.int64), "vector": vectors_to_arrow(vectors)},
        schema=embeddings_schema(vectors.shape[1]),
    )


def neighbours_schema(k: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("neighbour_ids", pa.list_(pa.int64(), k), nullable=False),
            pa.field("similarities", pa.list_(pa.float32(), k), nullable=False),
        ]
    )


PAIRS = pa.schema(
    [
        pa.field("score", pa.float64(), nullable=False),
        pa.field("cosine", pa.float32(), nullable=False),
        pa.field("src_id", pa.int64(), nullable=False),
        pa.field("tgt_id", pa.int64(), nullable=False),
        pa.field("src_text", pa.string(), nullable=False),
        pa.field("tgt_text", pa.string(), nullable=False),
        pa.field("direction", pa.string(), nullable=False),
    ]
)


class ContractError(ValueError):
    """A stage file whose schema is not the one its boundary declares."""


def check_schema(path: Path, actual: pa.Schema, expected: pa.Schema) -> None:
    got = {f.name: f.type for f in actual}
    for f in expected:
        if f.name not in got:
            raise ContractError(f"{path}: missing column {f.name!r} ({f.type})")
        if got[f.name] != f.type:
            raise ContractError(f"{path}: column {f.name!r} is {got[f.name]}, expected {f.type}")


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, width: int, dtype: type) -> np.ndarray:
    """(n,) fixed_size_list column -> (n, width) array, zero-copy per chunk."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        if chunk.null_count:
            raise ContractError("null rows in a fixed-size list column")
        values = chunk.values.to_numpy(zero_copy_only=False)
        # The value buffer may be longer than the slice the chunk covers.
        start = chunk.offset * width
        parts.append(values[start : start + len(chunk) * width].reshape(len(chunk), width))
    if not parts:
        return np.empty((0, width), dtype=dtype)
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out.astype(dtype, copy=False)


def numpy_to_fixed_list(matrix: np.ndarray, pa_type: pa.DataType) -> pa.FixedSizeListArray:
    width = matrix.shape[1]
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def embeddings_dim(path: Path) -> int:
    schema = pq.read_schema(path)
    if "vector" not in schema.names:
        raise ContractError(f"{path}: no column 'vector'")
    try:
        return vector_dim(schema.field("vector").type)
    except ContractError as err:
        raise ContractError(f"{path}: {err}") from None


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int64 (n,), vectors float16 (n, dim))."""
    dim = embeddings_dim(path)
    table = pq.read_table(path)
    check_schema(path, table.schema, embeddings_schema(dim))
    return table.column("id").to_numpy(), vectors_to_numpy(table.column("vector"), dim)


def iter_embedding_blocks(path: Path, block_rows: int):
    """Yield (ids, float16 vectors) row group by row group, at most block_rows at a time."""
    dim = embeddings_dim(path)
    pf = pq.ParquetFile(path)
    check_schema(path, pf.schema_arrow, embeddings_schema(dim))
    for batch in pf.iter_batches(batch_size=block_rows, columns=["id", "vector"]):
        yield batch.column(0).to_numpy(), vectors_to_numpy(batch.column(1), dim)


def read_neighbours(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (ids (n,), neighbour_ids (n, k), similarities (n, k))."""
    table = pq.read_table(path)
    k = table.schema.field("neighbour_ids").type.list_size
    check_schema(path, table.schema, neighbours_schema(k))
    return (
        table.column("id").to_numpy(),
        fixed_list_to_numpy(table.column("neighbour_ids"), k, np.int64),
        fixed_list_to_numpy(table.column("similarities"), k, np.float32),
    )


def iter_neighbour_blocks(path: Path, block_rows: int):
    """Yield (ids, neighbour_ids, similarities) at most block_rows rows at a time."""
    pf = pq.ParquetFile(path)
    k = pf.schema_arrow.field("neighbour_ids").type.list_size
    check_schema(path, pf.schema_arrow, neighbours_schema(k))
    columns = ["id", "neighbour_ids", "similarities"]
    for batch in pf.iter_batches(batch_size=block_rows, columns=columns):
        yield (
            batch.column(0).to_numpy(),
            fixed_list_to_numpy(batch.column(1), k, np.int64),
            fixed_list_to_numpy(batch.column(2), k, np.float32),
        )
