"""Block-by-block calibration (lowrank.calibrate.blocks, used by data-aware compression) against the whole-model path.

The reference is the path that runs the whole model for each layer group
(today's sequential calibration, kept for models without repeated blocks):
forced here by making ``_blockwise_plan`` find no blocks.
"""

import copy

import pytest
import torch
import transformers
from torch import nn

import lowrank
from lowrank.calibrate import calibration_batches
from lowrank.calibrate.blocks import block_inputs, blocks_share_inputs, find_blocks, next_block_inputs

transformers.logging.set_verbosity_error()
VOCAB = 96


def bert(layers=3):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=64)
    return transformers.BertModel(config)


def gpt2(layers=3):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama(layers=3):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    return transformers.LlamaForCausalLM(config)


MODELS = {"bert": (bert, "encoder.layer"), "gpt2": (gpt2, "transformer.h"), "llama": (llama, "model.layers")}


def token_batches(seed=1, count=3):
    """Batches of token ids with some padding (the statistics must skip it)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[0, 7:] = 0
        mask[2, 4:] = 0
        batches.append({"input_ids": torch.randint(0, VOCAB, (4, 10), generator=gen), "attention_mask": mask})
    return batches


def model_output(model, batch):
    with torch.no_grad():
        output = model(**batch)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output.logits


def whole_model_path(monkeypatch):
    monkeypatch.setattr("lowrank.data_aware._blockwise_plan", lambda *args: None)


def compressed_both_ways(make, monkeypatch, **settings):
    """``(blockwise model, its report, whole-model model, its report)`` for the same seeded model and batches."""
    torch.manual_seed(0)
    dense = make().eval()
    blockwise, whole = copy.deepcopy(dense), copy.deepcopy(dense)
    batches = token_batches()
    blockwise_report = lowrank.compress(blockwise, 0.6, calibration=batches, progress=False, **settings)
    with monkeypatch.context() as patch:
        whole_model_path(patch)
        whole_report = lowrank.compress(whole, 0.6, calibration=batches, progress=False, **settings)
    return blockwise, blockwise_report, whole, whole_report


@pytest.mark.parametrize("settings", [{}, {"allocation": "fisher", "refit": True}, {"refit": True}, {"whiten": "asvd"}],
                         ids=["default", "fisher-refit", "refit", "asvd"])
@pytest.mark.parametrize("kind", MODELS)
def test_block_by_block_equals_the_whole_model_path(kind, settings, monkeypatch):
    make, path = MODELS[kind]
    blockwise, report, whole, whole_report = compressed_both_ways(make, monkeypatch, **settings)
    assert find_blocks(blockwise, [row.name for row in report.layers]).path == path
    assert [(row.name, row.rank) for row in report.layers] == [(row.name, row.rank) for row in whole_report.layers]
    assert sum(row.rank is not None for row in report.layers) >= 6
    errors = [(row.output_error, whole_row.output_error) for row, whole_row in zip(report.layers, whole_report.layers)
              if row.rank is not None]
    assert all(error == pytest.approx(whole_error, rel=1e-6, abs=1e-12) for error, whole_error in errors)
    for batch in token_batches(seed=7):
        torch.testing.assert_close(model_output(blockwise, batch), model_output(whole, batch), rtol=1e-5, atol=1e-6)


class CountingEmbedding(nn.Embedding):
    """An embedding that counts its forward calls: one per pass through the model."""

    calls = 0

    def forward(self, ids):
        CountingEmbedding.calls += 1
        return super().forward(ids)


@pytest.mark.parametrize("kind", MODELS)
def test_the_passes_through_the_model_do_not_grow_with_depth(kind, monkeypatch):
    """The layers before the blocks run a fixed number of times, whatever the depth (block by block)."""
    make = MODELS[kind][0]
    passes = {}
    for path in ("blockwise", "whole"):
        for layers in (2, 4):
            torch.manual_seed(0)
            model = make(layers).eval()
            embeddings = model.get_input_embeddings()
            counting = CountingEmbedding(embeddings.num_embeddings, embeddings.embedding_dim)
            counting.load_state_dict(embeddings.state_dict())
            model.set_input_embeddings(counting)
            CountingEmbedding.calls = 0
            with monkeypatch.context() as patch:
                if path == "whole":
                    whole_model_path(patch)
                lowrank.compress(model, 0.6, calibration=token_batches(), progress=False)
            passes[path, layers] = CountingEmbedding.calls
    assert passes["blockwise", 2] == passes["blockwise", 4]
    assert passes["whole", 4] > passes["whole", 2] > passes["blockwise", 2]


class TupleBlock(nn.Module):
    """A residual MLP block that returns ``(hidden,)`` and takes a scale it must receive unchanged."""

    def __init__(self, width):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, hidden, scale, *, shift=None):
        return (hidden + scale * self.down(torch.tanh(self.up(hidden))) + shift,)


class TupleModel(nn.Module):
    """Stem, three tuple-returning blocks given extra inputs, then a pooler-like head after them."""

    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Linear(8, width)
        self.blocks = nn.ModuleList([TupleBlock(width) for _ in range(3)])
        self.head = nn.Sequential(nn.Linear(width, width), nn.Tanh())

    def forward(self, x):
        hidden = self.stem(x)
        for block in self.blocks:
            hidden = block(hidden, 0.5, shift=0.1)[0]
        return self.head(hidden)


def test_tuple_blocks_extra_inputs_and_a_layer_after_the_blocks(monkeypatch):
    torch.manual_seed(0)
    dense = TupleModel().eval()
    batches = [torch.randn(32, 8) for _ in range(3)]
    blockwise, whole = copy.deepcopy(dense), copy.deepcopy(dense)
    settings = {"calibration": batches, "exclude": ["stem"], "allocation": "uniform", "progress": False}
    report = lowrank.compress(blockwise, 0.5, **settings)
    with monkeypatch.context() as patch:
        whole_model_path(patch)
        whole_report = lowrank.compress(whole, 0.5, **settings)
    assert find_blocks(dense, [row.name for row in report.layers]).path == "blocks"
    assert [(row.name, row.rank) for row in report.layers] == [(row.name, row.rank) for row in whole_report.layers]
    assert report.layers[-1].name == "head.0" and report.layers[-1].rank is not None
    x = torch.randn(16, 8)
    with torch.no_grad():
        torch.testing.assert_close(blockwise(x), whole(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(blockwise(x), dense(x), atol=1e-4)  # compressed, not left dense


def test_block_inputs_drop_key_value_caches_so_a_block_runs_again_the_same():
    torch.manual_seed(0)
    model = gpt2().eval()
    block = model.transformer.h[0]
    inputs = block_inputs(model, block, calibration_batches(token_batches()))
    assert all(value is None or not type(value).__name__.endswith("Cache")
               for batch in inputs for value in (*batch.args, *batch.kwargs.values()))
    first, _ = next_block_inputs(block, inputs)
    again, _ = next_block_inputs(block, inputs)
    for a, b in zip(first, again):
        assert torch.equal(a.args[0], b.args[0])
    hidden = []
    handle = model.transformer.h[1].register_forward_pre_hook(lambda _m, args: hidden.append(args[0]))
    with torch.no_grad():
        for batch in token_batches():
            model(**batch)
    handle.remove()
    for expected, batch in zip(hidden, first):
        torch.testing.assert_close(batch.args[0], expected)


def test_find_blocks_needs_two_blocks_with_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
    assert find_blocks(model, ["0"]) is None
    assert find_blocks(model, ["1.0"]) is None
    assert find_blocks(model, ["1.0", "1.1"]).names == ("1.0", "1.1")
    mixed = nn.Sequential(nn.ModuleList([nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))]))
    assert find_blocks(mixed, ["0.0", "0.1.0"]) is None


def test_a_failure_in_a_later_block_leaves_the_model_unchanged(monkeypatch):
    torch.manual_seed(0)
    model = bert().eval()
    before = copy.deepcopy(model.state_dict())
    original = lowrank.data_aware._plan_layer
    planned = []

    def failing(name, *args, **kwargs):
        planned.append(name)
        if name.startswith("encoder.layer.2."):
            raise RuntimeError("boom")
        return original(name, *args, **kwargs)

    monkeypatch.setattr("lowrank.data_aware._plan_layer", failing)
    with pytest.raises(RuntimeError, match="the model is unchanged: boom"):
        lowrank.compress(model, 0.6, calibration=token_batches(), progress=False)
    assert any(name.startswith("encoder.layer.1.") for name in planned)
    assert not any(isinstance(module, lowrank.nn.FactorizedModule) for module in model.modules())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


class AlternatingModel(TupleModel):
    """As :class:`TupleModel`, but the blocks get different extra inputs in turn (as sliding-window layers do)."""

    def forward(self, x):
        hidden = self.stem(x)
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, 0.5 if index % 2 else 1.0, shift=0.1)[0]
        return self.head(hidden)


def test_blocks_given_different_inputs_are_calibrated_through_the_whole_model(monkeypatch):
    torch.manual_seed(0)
    batches = calibration_batches([torch.randn(32, 8) for _ in range(3)])
    same, alternating = TupleModel().eval(), AlternatingModel().eval()
    alternating.load_state_dict(same.state_dict())
    layers = [name for name, module in same.named_modules() if isinstance(module, nn.Linear)]
    assert blocks_share_inputs(same, find_blocks(same, layers), batches[0])
    assert not blocks_share_inputs(alternating, find_blocks(alternating, layers), batches[0])
    blockwise, whole = copy.deepcopy(alternating), copy.deepcopy(alternating)
    settings = {"calibration": batches, "exclude": ["stem"], "allocation": "uniform", "progress": False}
    lowrank.compress(blockwise, 0.5, **settings)
    with monkeypatch.context() as patch:
        whole_model_path(patch)
        lowrank.compress(whole, 0.5, **settings)
    x = torch.randn(16, 8)
    with torch.no_grad():
        torch.testing.assert_close(blockwise(x), whole(x), rtol=1e-5, atol=1e-6)


def test_the_device_is_checked_and_recorded(monkeypatch):
    with pytest.raises(ValueError, match="CalibrationConfig.device: 'nowhere' is not a device"):
        lowrank.CalibrationConfig(token_batches(), device="nowhere")
    if torch.cuda.is_available():
        assert lowrank.CalibrationConfig(token_batches(), device="cuda").device == "cuda"
    else:
        with pytest.raises(ValueError, match="device='cuda', but torch finds no CUDA device here"):
            lowrank.CalibrationConfig(token_batches(), device="cuda")
    torch.manual_seed(0)
    dense = bert().eval()
    on_cpu, default = copy.deepcopy(dense), copy.deepcopy(dense)
    report = lowrank.compress(on_cpu, 0.6, calibration=token_batches(), device="cpu", progress=False)
    expected = lowrank.compress(default, 0.6, calibration=token_batches(), progress=False)
    assert report.settings["calibration"]["device"] == "cpu" and expected.settings["calibration"]["device"] is None
    assert [(row.name, row.rank) for row in report.layers] == [(row.name, row.rank) for row in expected.layers]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", MODELS)
def test_blocks_take_their_turn_on_the_gpu_and_come_back(kind, monkeypatch):
    make = MODELS[kind][0]
    torch.manual_seed(0)
    dense = make().eval()
    on_gpu, on_cpu = copy.deepcopy(dense), copy.deepcopy(dense)
    devices = []
    original = lowrank.data_aware._plan_layer

    def watching(name, layer, *args, **kwargs):
        devices.append(layer.weight.device.type)
        return original(name, layer, *args, **kwargs)

    monkeypatch.setattr("lowrank.data_aware._plan_layer", watching)
    report = lowrank.compress(on_gpu, 0.6, calibration=token_batches(), device="cuda", progress=False)
    expected = lowrank.compress(on_cpu, 0.6, calibration=token_batches(), progress=False)
    assert "cuda" in devices and all(p.device.type == "cpu" for p in on_gpu.parameters())
    assert [(row.name, row.rank) for row in report.layers] == [(row.name, row.rank) for row in expected.layers]
    for batch in token_batches(seed=3):
        torch.testing.assert_close(model_output(on_gpu, batch), model_output(on_cpu, batch), rtol=1e-4, atol=1e-5)
