"""Streaming compression of sharded checkpoints (lowrank.streaming, lowrank.sharded) against in-memory compression."""

import copy
import json
from pathlib import Path

import pytest
import torch
from test_blockwise import MODELS, model_output, token_batches

import lowrank
import lowrank.streaming
from lowrank.cli import main
from lowrank.sharded import INDEX_NAME, CheckpointReader, empty_model

SETTINGS = {
    "plain": {},
    "calibrated": {"calibration": token_batches()},  # the default: energy allocation, sequential, no refit
    "calibrated-refit": {"calibration": token_batches(), "refit": True},
    "uniform-asvd": {"calibration": token_batches(), "allocation": "uniform", "whiten": "asvd"},
}


def sharded_checkpoint(kind, directory, layers=3):
    """A model of ``kind`` with seeded random weights, saved by Hugging Face in shards of at most 20 KB."""
    torch.manual_seed(0)
    model = MODELS[kind][0](layers).eval()
    model.save_pretrained(directory, max_shard_size="20KB")
    assert len(set(json.loads((directory / INDEX_NAME).read_text())["weight_map"].values())) >= 4
    return model


def rows_by_name(report):
    return {row.name: (row.rank, row.params_before, row.params_after, row.output_error, row.skip_reason)
            for row in report.layers}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("kind", MODELS)
def test_streaming_equals_in_memory_compression(kind, setting, tmp_path):
    dense = sharded_checkpoint(kind, tmp_path / "src")
    settings = SETTINGS[setting]
    in_memory = copy.deepcopy(dense)
    memory_settings = {"allocation": "energy", **settings} if "calibration" in settings else settings
    expected = lowrank.compress(in_memory, 0.6, progress=False, **memory_settings)
    report = lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, progress=False, **settings)
    assert rows_by_name(report) == rows_by_name(expected)
    assert sum(row.rank is not None for row in report.layers) >= 6
    assert report.settings["streamed"]["blocks"] == MODELS[kind][1]
    written = json.loads((tmp_path / "out" / INDEX_NAME).read_text())["weight_map"]
    assert len(set(written.values())) == 4  # one shard per block, then the rest
    loaded = lowrank.load(tmp_path / "out")
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    for batch in token_batches(seed=5):
        torch.testing.assert_close(model_output(loaded, batch), model_output(in_memory, batch), rtol=1e-5, atol=1e-6)
    assert lowrank.io.read_plan(tmp_path / "out")["report"]["settings"]["streamed"]["count"] == 3


def test_one_block_is_loaded_at_a_time(tmp_path, monkeypatch):
    sharded_checkpoint("llama", tmp_path / "src", layers=4)
    seen = []
    original = lowrank.streaming.materialize

    def watching(model, name, reader, **options):
        loaded = [index for index, block in enumerate(model.model.layers)
                  if any(p.device.type != "meta" for p in block.parameters())]
        seen.append((name, loaded))
        original(model, name, reader, **options)

    monkeypatch.setattr(lowrank.streaming, "materialize", watching)
    lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, calibration=token_batches(), progress=False)
    block_loads = [(name, loaded) for name, loaded in seen if name.startswith("model.layers.")]
    assert [name for name, _ in block_loads] == [f"model.layers.{i}" for i in range(4)] * 2  # dense pass, then compress
    assert all(loaded == [] for _, loaded in block_loads)  # every other block freed before the next one loads


def test_an_interrupted_run_leaves_no_output(tmp_path, monkeypatch):
    sharded_checkpoint("gpt2", tmp_path / "src")
    blocks_done = []
    original = lowrank.streaming.release

    def failing(module):
        blocks_done.append(module)
        if len(blocks_done) == 3:
            raise KeyboardInterrupt
        original(module)

    monkeypatch.setattr(lowrank.streaming, "release", failing)
    with pytest.raises(KeyboardInterrupt):
        lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]


def test_a_missing_or_truncated_shard_is_named_with_a_tensor(tmp_path):
    sharded_checkpoint("bert", tmp_path / "src")
    weight_map = json.loads((tmp_path / "src" / INDEX_NAME).read_text())["weight_map"]
    tensor = "encoder.layer.1.intermediate.dense.weight"
    shard = tmp_path / "src" / weight_map[tensor]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated|{tensor}.*{shard.name}"):
        lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, progress=False)
    assert not (tmp_path / "out").exists()
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard .*{shard.name} is missing \\(it holds tensor '"):
        lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, progress=False)


def test_a_tensor_missing_from_the_checkpoint_is_named(tmp_path):
    sharded_checkpoint("bert", tmp_path / "src")
    with pytest.raises(KeyError, match="tensor 'nothing' is not in the checkpoint"):
        CheckpointReader(tmp_path / "src").read(["nothing"])
    index_path = tmp_path / "src" / INDEX_NAME
    index = json.loads(index_path.read_text())
    del index["weight_map"]["encoder.layer.2.output.dense.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks tensor 'encoder.layer.2.output.dense.weight'"):
        lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, progress=False)
    assert not (tmp_path / "out").exists()


def test_whole_model_allocations_and_models_without_blocks_are_refused(tmp_path):
    sharded_checkpoint("llama", tmp_path / "src")
    for allocation in ("fisher", "sensitivity"):
        with pytest.raises(ValueError, match=f"allocation='{allocation}' backpropagates through the whole model"):
            lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, calibration=token_batches(),
                                        allocation=allocation, loss_fn=lambda model, batch: 0, progress=False)
    with pytest.raises(ValueError, match="healing trains the whole model"):
        lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, calibration=token_batches(),
                                    heal_steps=3, progress=False)
    with pytest.raises(ValueError, match="no repeated blocks holding the targeted layers"):
        lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, include=["lm_head"], progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, progress=False)


def test_empty_model_allocates_no_weight(tmp_path):
    dense = sharded_checkpoint("llama", tmp_path / "src")
    model = empty_model(tmp_path / "src")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight.shape == dense.lm_head.weight.shape
    rotary = dict(model.named_buffers())
    assert all(buffer.device.type == "cpu" for buffer in rotary.values())
    for name, buffer in dense.named_buffers():
        torch.testing.assert_close(rotary[name], buffer)


def test_cli_streams_a_sharded_checkpoint(tmp_path, capsys):
    dense = sharded_checkpoint("bert", tmp_path / "src")
    texts = tmp_path / "calibration.txt"
    texts.write_text("\n".join(" ".join(f"w{(7 * i + j) % 50}" for j in range(12)) for i in range(24)))
    # the random BERT has no tokenizer of its own: borrow a word-level one built for the test
    tokenizer = _word_tokenizer(tmp_path / "src")
    assert main(["compress", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--ratio", "0.6", "--calibration",
                 str(texts), "--quiet"]) == 0
    assert "streamed one block at a time" in capsys.readouterr().out
    plan = lowrank.io.read_plan(tmp_path / "out")
    assert plan["report"]["settings"]["calibration"]["allocation"] == "energy"
    loaded = lowrank.load(tmp_path / "out")
    batch = dict(tokenizer(["w1 w2 w3 w4"], return_tensors="pt"))
    assert model_output(loaded, batch).shape == model_output(dense, batch).shape
    assert main(["info", str(tmp_path / "out")]) == 0
    assert main(["compress", str(tmp_path / "src"), "-o", str(tmp_path / "out2"), "--no-stream", "--quiet"]) == 0
    assert (tmp_path / "out2" / "model.safetensors").is_file() and not (tmp_path / "out2" / INDEX_NAME).exists()


def _word_tokenizer(directory: Path):
    """A word-level fast tokenizer over w0..w49 (ids within the test models' vocabulary), saved into ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(50)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.save_pretrained(directory)
    return tokenizer


def test_blocks_fed_different_masks_are_refused(tmp_path):
    """Gemma 2 alternates sliding-window and global attention: its blocks get different masks."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, intermediate_size=64, sliding_window=4)
    transformers.Gemma2ForCausalLM(config).eval().save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="receive different inputs besides the hidden states"):
        lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, calibration=token_batches(),
                                    progress=False)
    assert not (tmp_path / "out").exists()


def test_a_per_token_layer_after_the_blocks_sees_its_own_batches(tmp_path, monkeypatch):
    """BertForMaskedLM's transform.dense runs per token after the blocks, on batches of different lengths."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64)
    dense = transformers.BertForMaskedLM(config).eval()
    dense.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    gen = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 96, (3, length), generator=gen),
                "attention_mask": torch.ones(3, length, dtype=torch.long)} for length in (10, 6, 8)]
    for batch in batches:
        batch["attention_mask"][0, -3:] = 0  # padding, which the statistics must leave out
    counted = []
    collect = lowrank.streaming.collect_input_statistics

    def counting(model, layers, calibration, **options):
        found = collect(model, layers, calibration, **options)
        counted.extend(s.count for name, s in found.items() if name == "cls.predictions.transform.dense")
        return found

    monkeypatch.setattr(lowrank.streaming, "collect_input_statistics", counting)
    in_memory = copy.deepcopy(dense)
    # ranks from each layer's whitened spectrum, so a spectrum taken on the wrong batches changes a rank
    expected = lowrank.compress(in_memory, energy=0.8, calibration=batches, progress=False)
    report = lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", energy=0.8, calibration=batches,
                                         progress=False)
    assert rows_by_name(report) == rows_by_name(expected)
    assert rows_by_name(report)["cls.predictions.transform.dense"][0] is not None  # compressed, after the blocks
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    assert counted == [real_tokens]  # each batch's cached outputs under its own mask, padding left out


def test_release_keeps_parameters_tied_and_checkpoints_keep_their_dtype(tmp_path):
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    block[1].weight = block[0].weight
    lowrank.sharded.release(block)
    assert block[0].weight.device.type == "meta" and block[1].weight is block[0].weight
    torch.manual_seed(0)
    model = MODELS["llama"][0]().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    lowrank.compress_checkpoint(tmp_path / "src", tmp_path / "out", 0.6, progress=False)
    reader = CheckpointReader(tmp_path / "out")
    tensors = reader.read(["model.layers.1.mlp.down_proj.first", "model.embed_tokens.weight"])
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
