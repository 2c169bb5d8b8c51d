"""lowrank.Targets: one selection of layers for every job, and a clear error when it selects nothing."""

import copy

import pytest
import torch
from torch import nn

import lowrank
from lowrank.cli import main
from lowrank.targets import Targets, output_heads


class Net(nn.Module):
    """An embedding, a block of linears, a k×k conv, a 1×1 conv, and a head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.mix = nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        h = self.block(self.embed(idx))
        h = h + self.mix(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h)


def names(targets, model=None):
    return [target.name for target in targets.select(model or Net())]


def test_kinds_globs_and_filters_select_layers_in_model_order():
    assert names(Targets()) == ["block.0", "block.2", "conv", "head"]
    assert names(Targets(kinds=("pointwise", "embedding"))) == ["embed", "mix"]
    assert names(Targets(include="block.*")) == ["block.0", "block.2"]  # one string is one pattern
    assert names(Targets(include=["block.*", "conv"], exclude=["*.2"])) == ["block.0", "conv"]
    assert names(Targets(filter_fn=lambda name, m: getattr(m, "bias", None) is not None)) == ["block.0", "block.2",
                                                                                             "conv"]
    # the same selection in every job: compress reports exactly the selected layers
    model = Net()
    report = lowrank.compress(model, 0.5, targets=Targets(include=["block.*", "conv"]), progress=False)
    assert [row.name for row in report.layers] == ["block.0", "block.2", "conv"]


def test_output_heads_are_selected_but_flagged():
    model = Net()
    heads = [target.name for target in Targets().select(model) if target.head]
    assert heads == ["head"] and output_heads(model) == {id(model.head)}


def test_factorized_modules_are_never_targeted_again():
    model = Net()
    lowrank.compress(model, 0.5, include=["block.*"], progress=False)
    assert names(Targets(), model) == ["conv", "head"]


def test_a_selection_of_nothing_is_an_error_that_lists_the_candidates():
    model = Net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"no layer of the Net matches the targets \(kinds=\['linear', 'conv'\], "
                                         r"include=\['nothing\*'\]\); its layers of those kinds are block.0, "
                                         r"block.2, conv, head"):
        lowrank.compress(model, 0.5, include=["nothing*"], progress=False)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert all(type(m) in (Net, nn.Sequential, nn.Linear, nn.ReLU, nn.Conv1d, nn.Embedding) for m in model.modules())
    with pytest.raises(ValueError, match="it has no layer of those kinds"):
        Targets(kinds=("conv",)).select(nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": "linear"}, "Targets.kinds must be a sequence of layer kinds"),
        ({"kinds": ("linear", "attention")}, "Targets.kinds must be a sequence of layer kinds"),
        ({"kinds": ()}, "Targets.kinds must be a sequence of layer kinds"),
        ({"include": [3]}, "Targets.include must be a glob pattern or a sequence of them, got \\[3\\]"),
        ({"filter_fn": "yes"}, "Targets.filter_fn must be a callable"),
    ],
)
def test_bad_selections_are_refused_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Targets(**kwargs)


def test_to_dict_is_json_data():
    def linears_only(name, module):
        return isinstance(module, nn.Linear)

    assert Targets(include="a.*", filter_fn=linears_only).to_dict() == {
        "include": ["a.*"], "exclude": [], "kinds": ["linear", "conv"], "filter_fn": "linears_only"
    }


def test_cli_selection_of_nothing_exits_2_and_writes_nothing(minilm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", minilm_dir, "-o", str(out), "--targets", "nothing*", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no layer of the BertModel matches the targets" in err and "encoder.layer.0" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
