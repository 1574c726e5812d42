"""m-ST5 embedding throughput on one GPU, against the card's recipe, no download.

Builds an encoder with google/mt5-xxl's exact shapes from a config (random weights) and
a LoRA adapter shaped like pkshatech/m-ST5's (r=8, alpha=32, q and v), then:

1. measures a large bf16 matmul: the peak MFU is counted against, in the same run;
2. runs the card's recipe (fp32, unmerged adapter, gradient checkpointing and input
   grads on, no inference mode, `padding=True` batches in input order) on a subset;
3. merges the adapter, casts to bf16 (what `mining model export` writes) and runs the
   embed path (HFEncoder: length-sorted batches filled to a token budget, inference
   mode, fp16 vectors back once per chunk) on all sentences, chunk by chunk as the
   embed stage does;
4. optionally the embed path again with fp8 matmuls (--fp8) and/or torch.compile
   (--compile), on the first 20,000 sentences.

Sentences are token ids of a realistic length distribution (log-normal, median 24
tokens, clipped at max_tokens), since mT5's tokenizer is not here; tokenisation runs
ahead of the GPU in the embed stage and is measured by bench/embed_cpu.py.

FLOP per token counts the matmuls of the 24 blocks (2 x 4.63 G weights = 9.26 GFLOP for
mT5-XXL); attention scores and the embedding lookup are left out, so MFU is a lower
bound. Prints one line. `--smoke` runs a reduced version on the CPU (for the test suite).

    bash bench/embed_gpu.sh [--sentences 50000] [--fp8] [--compile] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mining.encoders import hf

# google/mt5-xxl's config.json (the architecture only; weights are random here).
MT5_XXL = {
    "vocab_size": 250112,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
SMOKE = {**MT5_XXL, "vocab_size": 1000, "d_model": 64, "d_kv": 16, "d_ff": 160}
SMOKE.update(num_layers=2, num_heads=4)


def flop_per_token(config: dict) -> float:
    inner = config["num_heads"] * config["d_kv"]
    attention = 4 * config["d_model"] * inner  # q, k, v, o
    gated_ff = 3 * config["d_model"] * config["d_ff"]  # wi_0, wi_1, wo
    return 2.0 * config["num_layers"] * (attention + gated_ff)


def synthetic_ids(n: int, vocab: int, max_tokens: int, seed: int = 0) -> list[np.ndarray]:
    """Token ids with sentence-like lengths; each ends with EOS (1), as the tokenizer's."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(24), 0.65, n)), 4, max_tokens).astype(int)
    flat = rng.integers(3, vocab, size=int(lengths.sum()))
    out = np.split(flat, np.cumsum(lengths)[:-1])
    for ids in out:
        ids[-1] = 1
    return out


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: Any, n: int, repeats: int) -> float:
    """FLOP/s of an n x n x n bf16 matmul, best of `repeats` after a warm-up."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2.0 * n**3 / best


def card_recipe(net: Any, ids: list[np.ndarray], batch: int, device: Any) -> tuple:
    """(vectors, seconds, padded tokens): the card's loop, on token ids."""
    import torch

    parts, padded = [], 0
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(ids), batch):
        rows = ids[i : i + batch]
        width = max(len(r) for r in rows)  # padding=True: to the batch's longest
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, seq in enumerate(rows):
            input_ids[r, : len(seq)] = torch.from_numpy(seq)
            mask[r, : len(seq)] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
        parts.append(hf.card_recipe_batch(net, inputs))
        padded += len(rows) * width
    sync(device)
    return np.concatenate(parts), time.perf_counter() - start, padded


def run_embed(encoder: hf.HFEncoder, ids: list[np.ndarray], chunk_rows: int, device: Any) -> tuple:
    """(fp16 vectors, seconds) through prepare_ids + encode_prepared, chunk by chunk."""
    parts = []
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(ids), chunk_rows):
        prepared = encoder.prepare_ids(ids[i : i + chunk_rows])
        parts.append(encoder.encode_prepared(prepared))
    sync(device)
    return np.concatenate(parts), time.perf_counter() - start


def rowwise_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=50000)
    parser.add_argument("--card-sentences", type=int, default=1000)
    parser.add_argument("--card-batch", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--chunk-rows", type=int, default=16384)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--attention", default="auto", choices=("auto", "sdpa", "eager"))
    parser.add_argument("--fp8", action="store_true", help="also measure fp8 matmuls")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, seconds")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MT5Config, MT5EncoderModel

    if args.smoke:
        shapes, device = SMOKE, torch.device("cpu")
        args.sentences, args.card_sentences = min(args.sentences, 400), 64
        args.chunk_rows, args.batch_tokens = 128, 2048
        peak_n, peak_repeats = 256, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("embed_gpu: no CUDA device (use --smoke for the CPU check)")
        shapes, device = MT5_XXL, torch.device("cuda")
        peak_n, peak_repeats = 8192, 5
    torch.manual_seed(0)
    t0 = time.perf_counter()
    peak = matmul_peak(device, peak_n, peak_repeats)
    config = MT5Config(**shapes)
    ids = synthetic_ids(args.sentences, shapes["vocab_size"], args.max_tokens)
    card_ids = ids[: args.card_sentences]

    # fp32 on the device: the card's model (transformers 5 would load the hub's fp32
    # checkpoint as fp32; the recipe also runs in fp32).
    with torch.device(device):
        base = MT5EncoderModel(config)
    hf.card_recipe_setup(base)
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["q", "v"], lora_dropout=0.1)
    net = get_peft_model(base, lora)
    gen = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a no-op adapter
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    net.eval()
    card, card_s, card_padded = card_recipe(net, card_ids, args.card_batch, device)
    card_tokens = sum(len(r) for r in card_ids)

    # What `mining model export` does: merge in fp32, one cast to bf16.
    merged = net.merge_and_unload()
    merged.disable_input_require_grads()
    merged.gradient_checkpointing_disable()
    del net
    merged = hf._cast(merged, torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    encoder = hf.HFEncoder.from_model(
        merged,
        pad_token_id=0,
        max_tokens=args.max_tokens,
        batch_tokens=args.batch_tokens,
        attention=args.attention,
    )
    run_embed(encoder, ids[:512], args.chunk_rows, device)  # warm-up
    before = encoder.stats()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    vectors, seconds = run_embed(encoder, ids, args.chunk_rows, device)
    after = encoder.stats()
    tokens = after["tokens"] - before["tokens"]
    padded = after["padded_tokens"] - before["padded_tokens"]
    rate = tokens / seconds
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    cos = rowwise_cos(vectors[: len(card)], card)
    ratio = (len(ids) / seconds) / (len(card_ids) / card_s)

    extra = ""
    n_variant = min(len(ids), 20000)
    variant_tokens = sum(len(r) for r in ids[:n_variant])
    if args.compile:
        compiled = hf.HFEncoder.from_model(
            merged, pad_token_id=0, max_tokens=args.max_tokens,
            batch_tokens=args.batch_tokens, attention=args.attention, compile=True,
        )  # fmt: skip
        start = time.perf_counter()
        run_embed(compiled, ids[:2048], args.chunk_rows, device)  # compiles
        compile_s = time.perf_counter() - start
        got, s = run_embed(compiled, ids[:n_variant], args.chunk_rows, device)
        c = rowwise_cos(got, vectors[:n_variant]).min()
        extra += (
            f" compile_tokens/s={variant_tokens / s:.0f} compile_s={compile_s:.0f}"
            f" compile_cos={c:.5f}"
        )
    if args.fp8:
        replaced = hf.to_fp8(merged)
        got, s = run_embed(encoder, ids[:n_variant], args.chunk_rows, device)
        c = rowwise_cos(got, vectors[:n_variant])
        extra += (
            f" fp8_tokens/s={variant_tokens / s:.0f} fp8_layers={replaced}"
            f" fp8_cos_min={c.min():.5f} fp8_cos_mean={c.mean():.5f}"
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fpt = flop_per_token(shapes)
    print(
        f"embed_gpu device={name.replace(' ', '_')} layers={shapes['num_layers']} "
        f"d_model={shapes['d_model']} sentences={len(ids)} tokens={tokens} "
        f"tokens/s={rate:.0f} sent/s={len(ids) / seconds:.0f} "
        f"MFU={100 * rate * fpt / peak:.1f}% peak_bf16={peak / 1e12:.1f}TFLOP/s "
        f"GFLOP/token={fpt / 1e9:.2f} padding={1 - tokens / padded:.3f} "
        f"peak_mem={peak_mem:.1f}GiB batch_tokens={args.batch_tokens} "
        f"card_sentences={len(card_ids)} card_tokens/s={card_tokens / card_s:.0f} "
        f"card_padding={1 - card_tokens / card_padded:.3f} speedup={ratio:.1f}x "
        f"cos_vs_card_min={cos.min():.5f}{extra} wall={time.perf_counter() - t0:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
