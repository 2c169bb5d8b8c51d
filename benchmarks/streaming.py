"""Peak memory of compressing a sharded checkpoint through the CLI, streamed and in memory, at 4, 8 and 16 blocks.

The benchmark builds its own checkpoints: a Llama-style model (hidden 1024, gated MLP 2816, 16 query
and 4 key/value heads, vocabulary 8,000, untied head) from a ``LlamaConfig`` with seeded random
weights, saved by Hugging Face in shards of at most 100 MB, with a word-level tokenizer over the most
common words of the pydoc calibration text (the benchmark needs no download). Each run is
``lowrank compress SRC -o OUT --ratio 0.5 --calibration calib.txt --quiet`` (the defaults; a sharded
SRC streams, ``--no-stream`` forces the in-memory path) in a fresh interpreter, which records its
resident memory after importing everything (the baseline) and the kernel's high-water mark of it at
the end (``VmHWM``, reset after the imports; ``resource.getrusage``'s ``ru_maxrss`` survives fork and
exec, so it would carry this benchmark's own peak): the peak above the baseline is the cost of the
job, quoted as a fraction of the checkpoint's size on disk.

    python benchmarks/streaming.py            # print the table
    python benchmarks/streaming.py --record   # and append it to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from _timing import record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from minilm_task import calibration_texts  # noqa: E402

# Run in a fresh interpreter: argv[1:] are the lowrank command's arguments; prints the baseline and peak (KiB).
# The peak is the kernel's high-water mark of this process's resident memory (VmHWM), reset after the imports
# (writing 5 to /proc/self/clear_refs). getrusage's ru_maxrss cannot be used: it survives fork and exec, so a
# child started by this benchmark would report the benchmark's own peak (it built the checkpoint).
RUNNER = """
import json, sys, time
import torch, transformers, lowrank, lowrank.cli

def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
baseline = status_kib("VmRSS")
start = time.perf_counter()
status = lowrank.cli.main(sys.argv[1:])
seconds = time.perf_counter() - start
peak = status_kib("VmHWM")
print(json.dumps({"status": status, "baseline_kib": baseline, "peak_kib": peak, "seconds": seconds}))
"""
VOCABULARY = 8000


def word_tokenizer(texts: list[str], directory: Path) -> None:
    """A word-level fast tokenizer over the most common words of ``texts``, saved into ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = Counter(word for text in texts for word in text.split())
    words = [word for word, _ in counts.most_common(VOCABULARY - 2)]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: index + 2 for index, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(directory)


def llama_checkpoint(layers: int, directory: Path, texts: list[str]) -> int:
    """Write the synthetic checkpoint with ``layers`` blocks; its size on disk in bytes."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCABULARY, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                      tie_word_embeddings=False, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="100MB")
    word_tokenizer(texts, directory)
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def run_cli(arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", RUNNER, *arguments], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"lowrank {' '.join(arguments)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if result["status"] != 0:
        raise RuntimeError(f"lowrank {' '.join(arguments)} exited with {result['status']}: {done.stderr[-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--texts", type=int, default=64, help="calibration paragraphs")
    parser.add_argument("--in-memory", type=int, nargs="*", default=[16],
                        help="depths also compressed in memory (--no-stream), for comparison")
    args = parser.parse_args()

    texts = calibration_texts(args.texts)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        calibration = Path(root) / "calib.txt"
        calibration.write_text("\n".join(texts))
        for depth in args.depths:
            source = Path(root) / f"llama{depth}"
            size = llama_checkpoint(depth, source, calibration_texts(1000))
            shards = len(list(source.glob("*.safetensors")))
            modes = ["streamed"] + (["in memory"] if depth in args.in_memory else [])
            for mode in modes:
                output = Path(root) / f"out{depth}-{len(rows)}"
                flags = [] if mode == "streamed" else ["--no-stream"]
                result = run_cli(["compress", str(source), "-o", str(output), "--ratio", "0.5", "--calibration",
                                  str(calibration), "--quiet", *flags])
                above = (result["peak_kib"] - result["baseline_kib"]) * 1024
                goal = "" if mode != "streamed" else f"<= 30%: {'met' if above <= 0.3 * size else 'MISSED'}"
                rows.append(f"| {depth} | {size / 2**20:,.0f} MiB in {shards} shards | {mode} | "
                            f"{above / 2**20:,.0f} MiB | {above / size:.1%} | {goal} | {result['seconds']:.0f} s |")
                print(rows[-1], flush=True)
    table = "\n".join([
        "| blocks | checkpoint | path | peak RSS above the interpreter's baseline | as a share of the checkpoint | "
        "goal | time |", "|---|---|---|---|---|---|---|", *rows])
    print(table)
    if args.record:
        note = (f"Synthetic Llama-style checkpoints built by the benchmark (hidden 1024, gated MLP 2816, 16 query / "
                f"4 key-value heads, vocabulary {VOCABULARY:,}, untied head, seeded random float32 weights, shards of "
                f"at most 100 MB, a word-level tokenizer over pydoc words). Each run: `lowrank compress SRC -o OUT "
                f"--ratio 0.5 --calibration calib.txt --quiet` on {args.texts} pydoc calibration paragraphs, in a "
                f"fresh interpreter: the kernel's high-water mark of resident memory (VmHWM, reset after importing "
                f"torch, transformers and lowrank) minus the resident memory then (getrusage's ru_maxrss survives "
                f"fork and exec and would report this benchmark's own peak). Streamed: the CLI's default on a "
                f"sharded SRC (energy allocation, sequential, whitened, no refit); in memory: `--no-stream`.")
        record("streaming: peak memory of compressing a sharded checkpoint", table, note)


if __name__ == "__main__":
    main()
