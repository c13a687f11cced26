"""Per-GPU memory, throughput and data-loading cost of LLaMA-1B and 7B on 8, 32 and 128 H100s, on paper.

    python scripts/scaling.py            # prints the figures as JSON and rewrites docs/scaling.md
    python scripts/scaling.py --measure  # first re-measures the tokenizer and data-stream rates here

Nothing here runs on a GPU: memory comes from the model shapes (configs/model/*.yaml) and the
activation formula below, which tests/test_scaling.py checks against the tensors autograd actually
saves for a tiny model; throughput comes from shared/reference/performance-anchors.md (1B measured,
7B estimated from an assumed MFU). Every assumption is a named constant so the doc can say it.
"""
from __future__ import annotations

import argparse
import math
import gzip
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import ModelConfig, matmul_flops_per_token  # noqa: E402

DOC = ROOT / "docs" / "scaling.md"
MODELS = ("llama_1b", "llama_7b")
GPU_COUNTS = (8, 32, 128)
GLOBAL_SEQS, SEQ_LEN = 512, 256  # the papers' batch: 131,072 token slots per optimizer step
C4_LANES, C4_LANE_ROWS = 16, 32  # configs/data/c4.yaml: data.lanes, data.lane_rows
TRAIN_STEPS = 20_000  # the papers' 4-bit recipe
GIB = 2**30
GPU_MEMORY = 80 * GIB  # H100 SXM 80 GB (HBM3, 80 GiB)
USABLE = 0.9  # CUDA context, NCCL buffers and allocator fragmentation take the rest
PEAK_BF16 = 989e12  # dense bf16 tensor-core peak of an H100 SXM, as in performance-anchors.md
ASSUMED_MFU_7B = 0.40
MEASURED_TOKENS_PER_S = {"llama_1b": 65_000}  # anchors: 1B, bf16, torch.compile, 16,384 tokens per step
INT4_RATIO = {"cheap INT4 (absmax, compiled)": 0.96, "official-style INT4 (compiled)": 33 / 65}
# NCCL all-reduce bus bandwidth (estimates): NVLink 4 inside one 8-GPU node; across nodes the eight
# 400 Gb/s NICs of a node (one per GPU, rail-optimized fabric) carry the rings' traffic.
BUS_BANDWIDTH = {"one node": 450e9, "several nodes": 350e9}
# SentencePiece encode and the whole packing stream (gunzip, JSON, encode, packing), tokens per CPU
# second on one core, measured with `--measure` on a shared 2-core Xeon (AMX) with the bundled
# 8192-piece model and sample corpus: medians of 5, rounded over several runs that gave 2.6-3.5M and
# 1.5-2.0M.
MEASURED_RATES = {"sentencepiece_tokens_per_core_s": 2.9e6, "packing_stream_tokens_per_core_s": 1.8e6}
LOSS_PEAK_FACTOR = 12  # bytes per token per vocab entry at the loss's peak, see the derivation


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each piece of state, and which activation graph the forward builds."""

    name: str
    weights: int
    grads: int
    moments: float  # both Adam/Stable-SPAM moments together
    graph: str  # "bf16": bf16 weights in the forward; "autocast": fp32 weights under torch.autocast


PRECISIONS = {
    "bf16_mixed": Precision("bf16_mixed", 4, 4, 8, "autocast"),
    "pure_bf16": Precision("pure_bf16", 2, 2, 4, "bf16"),
}
EIGHT_BIT_MOMENTS = 2.03  # two 8-bit moments plus one fp32 scale per 256-element block for each


def load_model_config(name: str) -> ModelConfig:
    raw = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
    raw.pop("defaults")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


def kv_dim(cfg: ModelConfig) -> int:
    return cfg.hidden_size // cfg.num_attention_heads * (cfg.num_key_value_heads or cfg.num_attention_heads)


def layer_linear_parameters(cfg: ModelConfig) -> int:
    """q, k, v, o, gate, up, down of one decoder layer: the linears `quant` converts."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return 2 * d * d + 2 * d * kv_dim(cfg) + 3 * d * f


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    d, vocab, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    quantized = layers * layer_linear_parameters(cfg)
    head = 0 if cfg.tie_word_embeddings else vocab * d
    return {"total": vocab * d + quantized + layers * 2 * d + d + head, "quantized_linears": quantized,
            "all_linears": quantized + vocab * d, "layer": layer_linear_parameters(cfg) + 2 * d,
            "embedding": vocab * d}


def layer_activation_bytes(cfg: ModelConfig, graph: str, quantized: bool) -> int:
    """Bytes autograd saves per token in one decoder layer (eager HF LLaMA, SDPA flash kernel).

    bf16 graph: each RMSNorm saves its fp32 upcast input (4d), the bf16 normalized input (2d) and
    the fp32 rstd (4); attention saves q, k, v, its output (also o_proj's input) and the fp32
    logsumexp per head; SwiGLU saves gate, silu(gate), up and their product (down_proj's input);
    q/k/v and gate/up share their (normalized) input. Autocast graph: the residual stream is fp32,
    so the norms save 4d + 4d + 4, and every projection saves its own bf16 cast of its input.
    4-bit fake quantization saves each projection's quantized input instead of the input itself:
    separate copies where projections shared one (bf16: +4d q/k/v, +2d gate/up) and o_proj's next to
    attention's output (+2d).
    """
    d, kv, f, heads = cfg.hidden_size, kv_dim(cfg), cfg.intermediate_size, cfg.num_attention_heads
    attention = 2 * d + 2 * kv + 2 * kv + 2 * d + 4 * heads
    swiglu = 4 * 2 * f
    if graph == "bf16":
        norms = 2 * (4 * d + 2 * d + 4)
        projection_inputs = 2 * d + 2 * d
        quant_extra = 4 * d + 2 * d + 2 * d
    else:
        norms = 2 * (4 * d + 4 * d + 4)
        projection_inputs = 3 * 2 * d + 2 * 2 * d
        quant_extra = 2 * d
    return norms + projection_inputs + attention + swiglu + (quant_extra if quantized else 0)


def saved_activation_bytes(cfg: ModelConfig, graph: str, quantized: bool, seqs: int, seq_len: int) -> int:
    """Everything autograd saves for one micro-batch of `seqs` sequences, weights' copies excluded.

    Per token: the layers, the final norm and lm_head's input, the loss's fp32 log-probabilities
    (4 V), the int64 input ids (embedding) and targets (loss); once per micro-batch: RoPE's cos and
    sin, and the loss's total weight.
    """
    d = cfg.hidden_size
    final = (4 * d + (2 if graph == "bf16" else 4) * d + 4) + 2 * d
    per_token = cfg.num_hidden_layers * layer_activation_bytes(cfg, graph, quantized) + final + 4 * cfg.vocab_size + 16
    rope = 2 * seq_len * (d // cfg.num_attention_heads) * (2 if graph == "bf16" else 4)
    return seqs * seq_len * per_token + rope + 4


def peak_activation_bytes(cfg: ModelConfig, graph: str, quantized: bool, seqs: int, seq_len: int) -> int:
    """Saved activations plus the loss's transient buffers at the start of backward (12 V in all)."""
    extra = (LOSS_PEAK_FACTOR - 4) * cfg.vocab_size * seqs * seq_len
    return saved_activation_bytes(cfg, graph, quantized, seqs, seq_len) + extra


def weight_copy_bytes(cfg: ModelConfig, graph: str, quantized: bool) -> int:
    """Weights copies saved for backward: autocast's bf16 cast of every linear weight, or the bf16
    quantized weight of every quantized linear (it replaces the autocast copy there)."""
    counts = parameter_counts(cfg)
    if graph == "autocast":
        return 2 * counts["all_linears"]
    return 2 * counts["quantized_linears"] if quantized else 0


def memory_per_gpu(cfg: ModelConfig, gpus: int, strategy: str, precision: Precision, seqs: int,
                   *, quantized: bool = False, moments: float | None = None) -> dict[str, float]:
    """Bytes per GPU at a micro-batch of `seqs` sequences; see the doc's assumptions."""
    counts = parameter_counts(cfg)
    n = counts["total"]
    moments = precision.moments if moments is None else moments
    shard = gpus if strategy == "fsdp2" else 1
    # FSDP2 computes in bf16 through MixedPrecisionPolicy(param_dtype=bf16): no autocast copies, and
    # the unsharded weights it saves are freed after forward and gathered again for backward.
    graph = "bf16" if strategy == "fsdp2" else precision.graph
    unit = max(counts["layer"], counts["embedding"])
    parts = {
        "weights": precision.weights * n / shard,
        "grads": precision.grads * n / shard,
        "optimizer": moments * n / shard,
        "ddp_buckets": precision.grads * n if strategy == "ddp" else 0,
        "weight_copies": weight_copy_bytes(cfg, graph, quantized),
        "activations": peak_activation_bytes(cfg, graph, quantized, seqs, SEQ_LEN),
        "fsdp_transient": (2 * 2 * unit + precision.grads * unit) if strategy == "fsdp2" else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def fits(total: float) -> bool:
    return total <= USABLE * GPU_MEMORY


def plan(cfg: ModelConfig, gpus: int, strategy: str, precision: Precision, **options) -> dict:
    """The largest power-of-two micro-batch up to 512/N sequences that fits, with its memory; when
    none does, the memory at one sequence and micro_batch None."""
    seqs = GLOBAL_SEQS // gpus
    while True:
        parts = memory_per_gpu(cfg, gpus, strategy, precision, seqs, **options)
        if fits(parts["total"]) or seqs == 1:
            return {"micro_batch": seqs if fits(parts["total"]) else None,
                    "accumulation": GLOBAL_SEQS // gpus // seqs, "bytes": parts}
        seqs //= 2


def tokens_per_s_per_gpu(name: str, cfg: ModelConfig) -> tuple[float, str]:
    if name in MEASURED_TOKENS_PER_S:
        return MEASURED_TOKENS_PER_S[name], "measured: anchors, compiled bf16"
    return ASSUMED_MFU_7B * PEAK_BF16 / matmul_flops_per_token(cfg, SEQ_LEN), f"estimate: {ASSUMED_MFU_7B:.0%} MFU"


def gradient_sync_seconds(cfg: ModelConfig, gpus: int, strategy: str, precision: Precision, accumulation: int) -> float:
    """Per optimizer step: DDP all-reduces the gradients once (no_sync on earlier micro-steps);
    FSDP2 all-gathers bf16 weights for forward and backward and reduce-scatters the gradients on
    every micro-step (skipping that would keep unsharded gradients, which the memory figures do not
    count). Ring algorithms move (N-1)/N of the data per GPU, twice for all-reduce."""
    n = parameter_counts(cfg)["total"]
    bandwidth = BUS_BANDWIDTH["one node" if gpus <= 8 else "several nodes"]
    ring = (gpus - 1) / gpus
    if strategy == "ddp":
        return 2 * ring * precision.grads * n / bandwidth
    return ring * accumulation * (2 * 2 * n + precision.grads * n) / bandwidth


def measure_rates(repeats: int = 5) -> dict[str, float]:
    """Tokens per CPU second on one core: SentencePiece alone, and the whole packing stream."""
    import sentencepiece as spm
    from hydra import compose, initialize_config_dir

    import data
    from trainer.config import register_configs

    shard = ROOT / "data" / "sample" / "en" / "c4-train.00000-of-00001.json.gz"
    texts = [json.loads(line)["text"] for line in gzip.open(shard, "rt")]
    processor = spm.SentencePieceProcessor(model_file=str(ROOT / "data" / "sample" / "tokenizer" / "spiece.model"))
    encode_rates = []
    for _ in range(repeats):
        start = time.process_time()
        tokens = sum(len(ids) for ids in processor.encode(texts, out_type=int, num_threads=1))
        encode_rates.append(tokens / (time.process_time() - start))

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=sample"])
    tokenizer = data.build_tokenizer(cfg.data)
    stream_rates = []
    for _ in range(repeats):  # rank 0 of 8 walks the whole global stream and keeps 1/8 of the rows
        batches = iter(data.build_train_loader(cfg.data, tokenizer, rank=0, world_size=8, micro_batch_size=8))
        start, count = time.process_time(), 30
        for _ in range(count):
            next(batches)
        stream_rates.append(count * 8 * 8 * cfg.data.seq_len / (time.process_time() - start))
    return {"sentencepiece_tokens_per_core_s": statistics.median(encode_rates),
            "packing_stream_tokens_per_core_s": statistics.median(stream_rates)}


def figures(rates: dict[str, float]) -> dict:
    step_tokens = GLOBAL_SEQS * SEQ_LEN
    result = {"assumptions": {
        "global_batch": f"{GLOBAL_SEQS} x {SEQ_LEN} tokens", "gpu_memory_gib": GPU_MEMORY / GIB, "usable": USABLE,
        "bus_bandwidth_gb_s": {k: v / 1e9 for k, v in BUS_BANDWIDTH.items()}, "rates": rates,
        "eight_bit_moments_bytes_per_param": EIGHT_BIT_MOMENTS}, "models": {}}
    for name in MODELS:
        cfg = load_model_config(name)
        per_gpu, source = tokens_per_s_per_gpu(name, cfg)
        model = {
            "parameters": parameter_counts(cfg), "flops_per_token": matmul_flops_per_token(cfg, SEQ_LEN),
            "activation_bytes_per_token_per_layer": {
                f"{graph}{'+int4' if q else ''}": layer_activation_bytes(cfg, graph, q)
                for graph in ("bf16", "autocast") for q in (False, True)},
            "tokens_per_s_per_gpu": per_gpu, "throughput_source": source, "memory": [], "time": [], "data": []}
        for gpus in GPU_COUNTS:
            for strategy in ("ddp", "fsdp2"):
                for precision in PRECISIONS.values():
                    base = plan(cfg, gpus, strategy, precision)
                    model["memory"].append({
                        "gpus": gpus, "strategy": strategy, "precision": precision.name, **base,
                        "eight_bit_moments": plan(cfg, gpus, strategy, precision, moments=EIGHT_BIT_MOMENTS),
                        "int4_fake_quant": plan(cfg, gpus, strategy, precision, quantized=True),
                        "sync_s": gradient_sync_seconds(cfg, gpus, strategy, precision, base["accumulation"])})
            compute_s = step_tokens / (gpus * per_gpu)
            model["time"].append({"gpus": gpus, "compute_s_per_step": compute_s,
                                  "hours_for_20k_steps_compute_only": compute_s * TRAIN_STEPS / 3600})
            model["data"].append({
                "gpus": gpus, "cluster_tokens_per_s": gpus * per_gpu, "compute_s_per_step": compute_s,
                "streaming_lanes_read": streaming_lanes_read(gpus),
                "streaming_cpu_s_per_step": step_tokens * streaming_lanes_read(gpus) / C4_LANES
                / rates["packing_stream_tokens_per_core_s"],
                "pretokenized_bytes_per_s_per_rank": 2 * per_gpu})
        result["models"][name] = model
    tokens = step_tokens * TRAIN_STEPS
    result["preparation"] = {"tokens": tokens, "core_hours": tokens / rates["packing_stream_tokens_per_core_s"] / 3600,
                             "bytes": 2 * tokens}
    return result


def streaming_lanes_read(gpus: int) -> int:
    """Lanes a rank reads with `data=c4` (configs/data/c4.yaml): the runs its rows come from."""
    rows_per_rank = GLOBAL_SEQS // gpus
    return min(C4_LANES, math.ceil(rows_per_rank / C4_LANE_ROWS))


def gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def memory_cell(planned: dict, base_micro: int | None) -> str:
    """A total, with its micro-batch x accumulation where it differs from the row's."""
    total = planned["bytes"]["total"]
    if planned["micro_batch"] is None:
        return f"no ({gib(total)} at 1 seq)"
    if planned["micro_batch"] == base_micro:
        return gib(total)
    return f"{gib(total)} at {planned['micro_batch']} x {planned['accumulation']}"


def markdown(result: dict) -> str:
    rates = result["assumptions"]["rates"]
    configs = {name: load_model_config(name) for name in MODELS}
    largest = result["models"][MODELS[-1]]
    lines = [
        "# Scaling to 8-128 H100s: memory, throughput and data loading (on paper)",
        "",
        "> Generated by `python scripts/scaling.py` (`--measure` re-measures the data rates on the machine",
        "> that runs it); edit the script, not this file. Nothing here ran on a GPU: memory follows from the",
        "> model shapes and the activation formula below (checked against autograd's saved tensors by",
        "> `tests/test_scaling.py`), throughput from `shared/reference/performance-anchors.md`.",
        "",
        f"Batch: the papers' {GLOBAL_SEQS} sequences x {SEQ_LEN} tokens per optimizer step, so {GLOBAL_SEQS}/N "
        "sequences per GPU, as a micro-batch (the largest power of two that fits) times gradient accumulation. "
        f"GPU: H100 SXM, {GPU_MEMORY // GIB} GiB; a configuration fits when the estimate stays under "
        f"{USABLE:.0%} of that (CUDA context, NCCL buffers, allocator fragmentation). Sizes in GiB.",
        "",
        "## Models",
        "",
        "| model | d / ffn / layers / heads | parameters | in quantized linears | FLOPs/token (6N + 12LTd) |"
        " activations per token and layer: bf16, autocast, bf16 + INT4 |",
        "|---|---|---|---|---|---|",
    ]
    for name, model in result["models"].items():
        cfg, counts, act = configs[name], model["parameters"], model["activation_bytes_per_token_per_layer"]
        lines.append(
            f"| {name} | {cfg.hidden_size} / {cfg.intermediate_size} / {cfg.num_hidden_layers} / "
            f"{cfg.num_attention_heads} | {counts['total'] / 1e9:.3f}B | {counts['quantized_linears'] / 1e9:.3f}B | "
            f"{model['flops_per_token'] / 1e9:.2f} G | {act['bf16'] / 1e3:.1f} kB, {act['autocast'] / 1e3:.1f} kB, "
            f"{act['bf16+int4'] / 1e3:.1f} kB |")
    lines += ["", DERIVATION.format(loss_peak=LOSS_PEAK_FACTOR, name=MODELS[-1],
                                    unsharded=gib(2 * largest["parameters"]["quantized_linears"])),
              "", "## Memory per GPU", "", STATE_NOTES.format(eight_bit=EIGHT_BIT_MOMENTS), ""]
    for name, model in result["models"].items():
        lines += [f"### {name}", "",
                  "| GPUs | strategy | precision | micro-batch x accum. | weights | grads | optimizer | DDP buckets |"
                  " weight copies | activations | FSDP transient | **total** | with 8-bit moments |"
                  " with INT4 fake quant |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in model["memory"]:
            b, micro = row["bytes"], row["micro_batch"]
            batching = f"{micro} x {row['accumulation']}" if micro else "none fits: 1 seq"
            lines.append(
                f"| {row['gpus']} | {row['strategy']} | {row['precision']} | {batching} | "
                f"{gib(b['weights'])} | {gib(b['grads'])} | {gib(b['optimizer'])} | {gib(b['ddp_buckets'])} | "
                f"{gib(b['weight_copies'])} | {gib(b['activations'])} | {gib(b['fsdp_transient'])} | "
                f"**{gib(b['total']) if micro else 'no, ' + gib(b['total'])}** | "
                f"{memory_cell(row['eight_bit_moments'], micro)} | {memory_cell(row['int4_fake_quant'], micro)} |")
        lines.append("")
    lines += ["## Throughput and time", "", THROUGHPUT_NOTES.format(
        mfu=ASSUMED_MFU_7B, one_node=BUS_BANDWIDTH["one node"] / 1e9, nodes=BUS_BANDWIDTH["several nodes"] / 1e9,
        ratios=", ".join(f"{k} {v:.2f}x" for k, v in INT4_RATIO.items())), "",
        "| model | tokens/s per GPU | GPUs | compute s/step | 20k steps, compute only |"
        " gradient sync s/step: DDP pure_bf16, DDP bf16_mixed, FSDP2 pure_bf16 |",
        "|---|---|---|---|---|---|"]
    sync_bound = []
    for name, model in result["models"].items():
        for t in model["time"]:
            sync = {(r["strategy"], r["precision"]): r for r in model["memory"] if r["gpus"] == t["gpus"]}
            shown = [sync[("ddp", "pure_bf16")], sync[("ddp", "bf16_mixed")], sync[("fsdp2", "pure_bf16")]]
            sync_bound += [f"{name} on {t['gpus']} ({r['strategy']} {r['precision']})" for r in sync.values()
                           if r["micro_batch"] and r["sync_s"] > t["compute_s_per_step"]]
            seconds = ", ".join(f"{r['sync_s']:.3f}" for r in shown)
            lines.append(
                f"| {name} | {model['tokens_per_s_per_gpu'] / 1e3:.1f}k ({model['throughput_source']}) | {t['gpus']} | "
                f"{t['compute_s_per_step']:.3f} | {t['hours_for_20k_steps_compute_only']:.1f} h | {seconds} |")
    lines += ["", "Synchronisation takes longer than compute (of the configurations that fit): "
              + ("; ".join(sync_bound) if sync_bound else "none") + ". There the papers' 131k-token batch is too "
              "small for that many GPUs: a larger global batch, fewer GPUs per run, or faster links.",
              "", "## Data loading", "", DATA_NOTES.format(
                  lanes=C4_LANES, lane_rows=C4_LANE_ROWS, encode=rates["sentencepiece_tokens_per_core_s"] / 1e6,
                  stream=rates["packing_stream_tokens_per_core_s"] / 1e6),
              "", "| model | GPUs | cluster tokens/s at compute speed | compute s/step |"
              " streaming C4: lanes read, CPU s/step per rank | pre-tokenized: read per rank |", "|---|---|---|---|---|---|"]
    data_bound = []
    for name, model in result["models"].items():
        for d in model["data"]:
            if d["streaming_cpu_s_per_step"] > d["compute_s_per_step"]:
                data_bound.append(f"{name} on {d['gpus']}")
            lines.append(
                f"| {name} | {d['gpus']} | {d['cluster_tokens_per_s'] / 1e6:.2f}M | {d['compute_s_per_step']:.3f} | "
                f"{d['streaming_lanes_read']}, {d['streaming_cpu_s_per_step']:.4f} | "
                f"{d['pretokenized_bytes_per_s_per_rank'] / 1e3:.0f} kB/s |")
    prep = result["preparation"]
    lines += ["", f"Streaming is slower than compute for: {', '.join(data_bound) if data_bound else 'none'}: "
              f"a reader of one lane keeps up with {rates['packing_stream_tokens_per_core_s'] / 1e6:.1f}M tokens/s of it, "
              f"so streaming caps a run at about {C4_LANES * rates['packing_stream_tokens_per_core_s'] / 1e6:.0f}M "
              "tokens/s whatever the number of GPUs (more SentencePiece threads speed up only the encode).",
              "", PREPARATION_NOTES.format(tokens=prep["tokens"] / 1e9, core_hours=prep["core_hours"],
                                           gb=prep["bytes"] / 1e9), ""]
    return "\n".join(lines)


DERIVATION = """## Activation memory: derivation

Per token and decoder layer (d hidden, f intermediate, h heads, d_kv = d here), what autograd keeps
for backward in the eager HF `LlamaDecoderLayer` with SDPA's flash kernel, each tensor once even when
several ops save it, parameters excluded:

| saved tensor | bf16 weights (pure_bf16; FSDP2) | fp32 weights under autocast (bf16_mixed with DDP) |
|---|---|---|
| 2 RMSNorms: fp32 input (`pow`), normalized input (`weight *`), fp32 rstd | 2 x (4d + 2d + 4) | 2 x (4d + 4d + 4): the residual stream is fp32 |
| projection inputs | 2d (q/k/v share one) + 2d (gate/up share one) | 5 x 2d: each projection saves its own bf16 cast |
| attention: q, k, v, output (= o_proj's input), fp32 logsumexp | 2d + 2d_kv + 2d_kv + 2d + 4h | same |
| SwiGLU: gate, silu(gate), up, product (= down_proj's input) | 4 x 2f | same |
| **per layer** | **24d + 8f + 4h + 8** | **34d + 8f + 4h + 8** |

Once per token: the final norm and lm_head's input (8d + 4, or 10d + 4 under autocast), the loss's
fp32 log-probabilities (4V: `log_softmax` saves its output), the int64 input ids and targets (16).
Once per micro-batch: RoPE's cos and sin (2 T head_dim values). Measured, not assumed:
`tests/test_scaling.py` runs `trainer.step.token_loss_sum` on a 2-layer LLaMA on CPU and sums the
bytes of every distinct storage `torch.autograd.graph.saved_tensors_hooks` sees (parameters
excluded): the formula plus the weight copies below match it to the byte for bf16 and autocast, each
with and without INT4 fake quantization (the test allows 1% for other torch/transformers versions).

The loss peaks above what it saves: the bf16 logits (2V), their fp32 copy (4V) and the
log-probabilities (4V) at the end of forward; at the start of backward the saved log-probabilities,
the gradient `nll_loss` returns and the one `log_softmax` returns (3 x 4V). The tables count
{loss_peak}V per token for the loss: 384 kB per token at V = 32000, about four 1B layers.

Weight copies saved for backward, per GPU and independent of the batch: under autocast, each linear
weight's bf16 cast (2 bytes per linear parameter; autocast caches one per forward). 4-bit fake
quantization (`quant.QuantLinear`, any format) keeps a quantized copy of each quantized operand for
backward: the weight (2 bytes per quantized parameter in bf16) and each projection's input, saved
instead of the input itself, which adds 8d per token and layer on the bf16 graph (own copies for
q/k/v and for gate/up, and o_proj's beside attention's output) and 2d under autocast (only
o_proj's is new; its weight copy replaces autocast's). Under FSDP2 the quantized weights are made
from the gathered weights and saved, so they stay **unsharded** until backward: 2 bytes per quantized
parameter on every GPU whatever N ({unsharded} GiB at {name}), unless the weight is quantized again
in backward instead of saved.

This is the eager graph. `torch.compile` fuses RMSNorm and SwiGLU and typically saves less (no fp32
norm copies, no silu output), so for compiled runs these are upper bounds. Activation checkpointing
per layer would keep only each layer's input, but recomputing the forward redraws the
stochastic-rounding noise (`quant/layer.py`)."""

STATE_NOTES = """Per parameter: bf16_mixed keeps fp32 weights (4 bytes), fp32 gradients (4) and fp32 moments (8);
pure_bf16 keeps 2 + 2 + 4, as the papers did. Stable-SPAM adds only per-tensor scalars to Adam's two
moments. "8-bit moments" replaces the moments by {eight_bit} bytes per parameter (two 8-bit moments
with block scales). DDP (accelerate's default `gradient_as_bucket_view=False`) keeps a second copy of
the gradients in its all-reduce buckets. FSDP2 shards weights, gradients and moments N ways, computes
in bf16 (`MixedPrecisionPolicy(param_dtype=bf16)`, so its activations follow the bf16 graph and there
are no autocast copies; bf16_mixed then means fp32 sharded master weights and moments) and holds two
gathered bf16 units (current and prefetched layer, or the embedding or head if larger) plus one unit's
unsharded gradients. Weight copies and activations (with the loss's peak) are derived above. A total
with "no" does not fit even at one sequence; the last two columns are the same row with 8-bit
moments, or with every projection fake-quantized, at the micro-batch that then fits."""

THROUGHPUT_NOTES = """Tokens/s per GPU: 1B is the anchors' measured compiled step (bf16 weights, fused AdamW, 16,384
tokens per GPU; with 1,024 tokens per GPU on 128 GPUs kernels are less efficient, so it is
optimistic there); 7B is an estimate, {mfu:.0%} MFU with FLOPs/token = 6 N_matmul + 12 L T d. 4-bit
fake quantization costs (anchors, 1B): {ratios} of bf16 speed. Gradient synchronisation is an
estimate too, from NCCL bus
bandwidths of {one_node:.0f} GB/s in one node (NVLink 4) and {nodes:.0f} GB/s across nodes (eight 400 Gb/s NICs per
node, one per GPU; scale it down for fewer NICs). DDP overlaps it with backward and FSDP2 with
compute, so a step takes at least the larger of the two."""

DATA_NOTES = """Streaming `data=c4` deals the train shards to {lanes} lanes (configs/data/c4.yaml) and a global batch
of 512 rows takes a run of {lane_rows} rows from each lane; in packing mode a reader tokenizes every
document of the lanes its rows come from to know where rows end, so per optimizer step a rank spends
the CPU time of (lanes it reads / {lanes}) of the 131,072 tokens: 2 of 16 lanes on 8 GPUs, 1 lane from
16 GPUs on (a rank with fewer rows than a run still reads its lane's whole run). Measured here (`--measure`: one core, the bundled 8192-piece model and sample corpus, median of
5, on a shared 2-core Xeon where repeated runs varied by about 30%): SentencePiece alone encodes
{encode:.1f}M tokens/s; the whole stream (gunzip, JSON, encode, packing in Python) {stream:.1f}M tokens/s.
The table uses the stream's figure. Pre-tokenized data (`data=tokens`) reads only the
rank's own rows from a memory map, 2 bytes per token."""

PREPARATION_NOTES = """One-time preparation, `python scripts/prepare_data.py data=c4 data.path=... output=...`, of the
papers' {tokens:.2f}B token slots (20,000 steps): about {core_hours:.1f} core-hours at the stream's rate and
{gb:.1f} GB of uint16 tokens, once, instead of every reader of every run tokenizing them again."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="re-measure the tokenizer and stream rates here")
    parser.add_argument("--output", type=Path, default=DOC, help="the markdown to write (default docs/scaling.md)")
    args = parser.parse_args()
    result = figures(measure_rates() if args.measure else MEASURED_RATES)
    args.output.write_text(markdown(result))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
