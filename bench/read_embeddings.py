"""How fast does a shard of embeddings read back into one numpy array, per storage layout?

Writes the same (n, dim) float16 unit vectors in several Parquet layouts, then reads each
back into one (n, dim) float16 array the way a downstream stage would, best of a few
warm-cache reads. Prints one line per layout and a last summary line. Also checks that
pandas and DuckDB can read each file, where they are installed.

    python bench/read_embeddings.py [--rows 20000] [--dim 4096] [--repeats 3] [--smoke]

Layouts (fsb-plain is the contract now: mining.contracts.embeddings_schema, read by
mining.contracts.read_embeddings, written uncompressed and without dictionary as the
embed stage's WRITE_OPTIONS do; those also drop the vector column's statistics):
  fsl-default   fixed_size_list<float16>, pq.write_table defaults (snappy, dictionary on):
                what the embed stage wrote before this bench existed
  fsl-plain     fixed_size_list<float16>, no compression, no dictionary
  fsl-zstd      fixed_size_list<float16>, zstd, no dictionary
  fsb-plain     fixed_size_binary(2*dim), no compression, no dictionary
  fsb-snappy    fixed_size_binary(2*dim), snappy, no dictionary
  fsb-zstd      fixed_size_binary(2*dim), zstd, no dictionary
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mining.contracts import (
    embeddings_table,
    fixed_list_to_numpy,
    numpy_to_fixed_list,
    read_embeddings,
)


def unit_vectors(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def fsl_table(ids: np.ndarray, vectors: np.ndarray) -> pa.Table:
    """The earlier layout: one fixed_size_list<float16> cell per vector."""
    return pa.table({"id": ids, "vector": numpy_to_fixed_list(vectors, pa.float16())})


def read_fsl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """fixed_size_list column -> (n, dim) float16 through its child values."""
    table = pq.read_table(path)
    column = table.column("vector")
    vectors = fixed_list_to_numpy(column, column.type.list_size, np.float16)
    return table.column("id").to_numpy(), vectors


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def other_readers(path: Path, rows: int) -> str:
    """Which of pandas / DuckDB read the file (and get the row count right)."""
    out = []
    try:
        import pandas as pd

        ok = len(pd.read_parquet(path, columns=["id", "vector"])) == rows
        out.append(f"pandas={'ok' if ok else 'WRONG'}")
    except ImportError:
        out.append("pandas=n/a")
    except Exception as err:  # a reader's failure is the figure we want to see
        out.append(f"pandas=FAIL({type(err).__name__})")
    try:
        import duckdb

        con = duckdb.connect()
        kind = con.execute(f"SELECT typeof(vector) FROM read_parquet('{path}') LIMIT 1").fetchone()
        # A list reads as FLOAT[dim] (DuckDB widens float16); fixed_size_binary as BLOB.
        size = "octet_length(vector)" if kind and kind[0] == "BLOB" else "len(vector)"
        n, width = con.execute(
            f"SELECT count(*), max({size}) FROM read_parquet('{path}')"
        ).fetchone()
        out.append(f"duckdb={'ok' if n == rows else 'WRONG'}({kind[0] if kind else '?'}:{width})")
    except ImportError:
        out.append("duckdb=n/a")
    except Exception as err:
        out.append(f"duckdb=FAIL({type(err).__name__})")
    return " ".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row-group", type=int, default=8192, help="rows per row group")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.dim, args.repeats, args.row_group = 500, 64, 1, 128

    ids = np.arange(args.rows, dtype=np.int64)
    vectors = unit_vectors(args.rows, args.dim)
    gbytes = vectors.nbytes / 1e9
    fsl = fsl_table(ids, vectors)
    fsb = embeddings_table(ids, vectors)
    plain = {"compression": "none", "use_dictionary": False}
    layouts: list[tuple[str, pa.Table, dict, Callable[[Path], tuple]]] = [
        ("fsl-default", fsl, {}, read_fsl),
        ("fsl-plain", fsl, plain, read_fsl),
        ("fsl-zstd", fsl, {"compression": "zstd", "use_dictionary": False}, read_fsl),
        ("fsb-plain", fsb, plain, read_embeddings),
        ("fsb-snappy", fsb, {"compression": "snappy", "use_dictionary": False}, read_embeddings),
        ("fsb-zstd", fsb, {"compression": "zstd", "use_dictionary": False}, read_embeddings),
    ]
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, table, options, reader in layouts:
            path = Path(tmp) / f"{name}.parquet"
            start = time.perf_counter()
            pq.write_table(table, path, row_group_size=args.row_group, **options)
            write_s = time.perf_counter() - start
            got_ids, got = reader(path)
            if not (np.array_equal(got_ids, ids) and np.array_equal(got, vectors)):
                raise SystemExit(f"{name}: read back different data")
            read_s = best_seconds(lambda p=path, r=reader: r(p), args.repeats)
            size_mb = path.stat().st_size / 1e6
            figures.append((name, gbytes / read_s))
            print(
                f"{name:12s} read {gbytes / read_s:6.2f} GB/s  write {gbytes / write_s:6.2f} GB/s"
                f"  file {size_mb:8.1f} MB  {other_readers(path, args.rows)}"
            )
    summary = "  ".join(f"{name} {rate:.2f}" for name, rate in figures)
    print(f"read_embeddings rows={args.rows} dim={args.dim} GB/s: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
