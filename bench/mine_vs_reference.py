"""This project against a plain LASER-style miner, on the same vectors.

    python bench/mine_vs_reference.py [--n 1e5] [--dim 256] [--work DIR] [--set KEY=VALUE ...]

The corpus is bench/knn_scale.py's (clustered vectors, 30% true pairs). After
prepare and embed, two child processes run, each timed, each with its peak
RSS read from wait4:

- this project: `mining run --stage index --stage search --stage mine`, with
  the job's settings (`auto` index with exact_limit = 0, so the approximate
  ladder, and exact re-scoring; index.* and search.* settings other than k can
  change with --set, the rest is written into the reference and refused);
- the reference, written below as LASER's mine_bitexts.py does it: both
  sides' embeddings read whole into memory, faiss IndexFlatIP searched in both
  directions, the margin of every candidate scored in a Python loop, and max
  retrieval by a Python loop over candidates sorted by score. (One deliberate
  change: the sort is stable, as in mining.margin, so that ties order alike.)

It prints one line: whether the pairs are identical, and the ratios of time
and peak memory. Target at 10^5 per side: identical pairs, >= 3x faster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn_scale import (
    THRESHOLD,
    K,
    add_common_args,
    clear_outputs,
    header,
    prepared_job,
    run_measured,
)

# --------------------------------------------------------------------------
# The reference, in the manner of LASER's source/mine_bitexts.py


def _read_all(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from mining.contracts import read_embeddings

    parts = [read_embeddings(p) for p in sorted(folder.glob("*.parquet"))]
    ids = np.concatenate([p[0] for p in parts])
    vectors = np.concatenate([p[1] for p in parts]).astype(np.float32)
    return ids, vectors


def _knn(x: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(y.shape[1])
    index.add(y)
    return index.search(x, k)


def _score(x: np.ndarray, y: np.ndarray, fwd_mean: float, bwd_mean: float) -> float:
    return x.dot(y) / ((fwd_mean + bwd_mean) / 2)  # ratio margin


def _score_candidates(x, y, candidate_inds, fwd_mean, bwd_mean) -> np.ndarray:
    scores = np.zeros(candidate_inds.shape)
    for i in range(scores.shape[0]):
        for j in range(scores.shape[1]):
            k = candidate_inds[i, j]
            scores[i, j] = _score(x[i], y[k], fwd_mean[i], bwd_mean[k])
    return scores


def reference(work: Path, out: Path) -> None:
    src_ids, x = _read_all(work / "embeddings/src")
    tgt_ids, y = _read_all(work / "embeddings/tgt")
    k = min(K, len(x), len(y))
    x2y_sim, x2y_ind = _knn(x, y, k)
    x2y_mean = x2y_sim.mean(axis=1)
    y2x_sim, y2x_ind = _knn(y, x, k)
    y2x_mean = y2x_sim.mean(axis=1)
    fwd_scores = _score_candidates(x, y, x2y_ind, x2y_mean, y2x_mean)
    bwd_scores = _score_candidates(y, x, y2x_ind, y2x_mean, x2y_mean)
    fwd_best = x2y_ind[np.arange(x.shape[0]), fwd_scores.argmax(axis=1)]
    bwd_best = y2x_ind[np.arange(y.shape[0]), bwd_scores.argmax(axis=1)]
    indices = np.stack(
        (
            np.concatenate((np.arange(x.shape[0]), bwd_best)),
            np.concatenate((fwd_best, np.arange(y.shape[0]))),
        ),
        axis=1,
    )
    scores = np.concatenate((fwd_scores.max(axis=1), bwd_scores.max(axis=1)))
    seen_src, seen_trg = set(), set()
    pairs = []
    for i in np.argsort(-scores, kind="stable"):
        src_ind, trg_ind = indices[i]
        if src_ind not in seen_src and trg_ind not in seen_trg:
            seen_src.add(src_ind)
            seen_trg.add(trg_ind)
            if scores[i] > THRESHOLD:
                pairs.append((src_ids[src_ind], tgt_ids[trg_ind]))
    np.save(out, np.array(pairs, dtype=np.int64).reshape(-1, 2))


# --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", default="1e5")
    add_common_args(parser, "/tmp/mine_vs_reference")
    parser.add_argument("--reference-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_only:  # the child process that runs the reference
        reference(args.reference_only, args.reference_only / "reference_pairs.npy")
        return
    # The reference has k, the margin, the retrieval and the threshold written in.
    fixed = [o for o in args.overrides if o.startswith(("mine.", "search.k="))]
    if fixed:
        parser.error(
            f"--set {fixed[0]}: the reference cannot follow it; index.* and "
            "search.* settings other than k can change"
        )
    n = int(float(args.n))
    mining, work = prepared_job(args.work / f"n{n}", n, args.dim, args.overrides)
    ours, theirs_runs = [], []
    for _ in range(args.repeat):
        clear_outputs(work)
        ours.append(
            run_measured([*mining, "--stage", "index", "--stage", "search", "--stage", "mine"])
        )
        theirs_runs.append(run_measured([sys.executable, __file__, "--reference-only", str(work)]))
    # A shared machine: the fastest run of each is the least disturbed one.
    ours_s, ref_s = min(r[0] for r in ours), min(r[0] for r in theirs_runs)
    ours_rss, ref_rss = max(r[1] for r in ours), max(r[1] for r in theirs_runs)
    table = pq.read_table(work / "pairs/src-tgt.parquet", columns=["src_id", "tgt_id"])
    ours = set(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))
    theirs = {tuple(p) for p in np.load(work / "reference_pairs.npy").tolist()}
    same = ours == theirs
    print(header("mine_vs_reference", args.dim, args.overrides))
    print(
        f"mine_vs_reference N={n:.0e}/side: pairs {'identical' if same else 'DIFFER'} "
        f"({len(ours)} ours, {len(theirs)} reference, {len(ours & theirs)} shared); "
        f"time {ours_s:.1f} s vs {ref_s:.1f} s = {ref_s / ours_s:.1f}x faster (best of "
        f"{args.repeat}); "
        f"peak RSS {ours_rss:.2f} GB vs {ref_rss:.2f} GB = {ours_rss / ref_rss:.2f}x",
        flush=True,
    )


if __name__ == "__main__":
    main()
