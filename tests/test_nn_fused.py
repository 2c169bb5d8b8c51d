"""FusedLowRankLinear: sibling low-rank layers reading one input run their first factors as one GEMM.

The reference is the same model with plain LowRankLinear layers (each its own two GEMMs): outputs and
gradients must agree, the groups must be the ones the model's code feeds one tensor, and a save/load
round trip must give back linked fused layers.
"""

import copy

import pytest
import torch
import transformers
from torch import nn

import lowrank
from lowrank.nn import FusedLowRankLinear, LowRankLinear, fuse_shared_inputs

transformers.logging.set_verbosity_error()
VOCAB = 96


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    return transformers.BertModel(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    return transformers.LlamaForCausalLM(config)


# The groups the models' code feeds one tensor: Q/K/V everywhere, and the gated MLP's gate and up in Llama.
GROUPS = {
    "bert": [[f"encoder.layer.{i}.attention.self.{leaf}" for leaf in ("query", "key", "value")] for i in range(2)],
    "llama": [group for i in range(2) for group in (
        [f"model.layers.{i}.self_attn.{leaf}" for leaf in ("q_proj", "k_proj", "v_proj")],
        [f"model.layers.{i}.mlp.{leaf}" for leaf in ("gate_proj", "up_proj")])],
}


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (3, 9), generator=gen), "attention_mask": mask}


def output(model, inputs):
    result = model(**inputs)
    return result.last_hidden_state if hasattr(result, "last_hidden_state") else result.logits


def compressed(make):
    torch.manual_seed(0)
    model = make().eval()
    lowrank.compress(model, ratio=0.5, progress=False)
    return model


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_fused_groups_are_the_shared_inputs_and_outputs_do_not_change(kind):
    reference = compressed({"bert": bert, "llama": llama}[kind])
    fused = copy.deepcopy(reference)
    groups = fuse_shared_inputs(fused, **batch(0))
    assert groups == GROUPS[kind]
    for group in groups:
        layers = [fused.get_submodule(name) for name in group]
        assert all(type(layer) is FusedLowRankLinear and layer.shared_input is layers[0].shared_input
                   for layer in layers)
    fused_names = {name for group in groups for name in group}
    assert all(type(m) is LowRankLinear for n, m in fused.named_modules()
               if isinstance(m, LowRankLinear) and n not in fused_names)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    assert not any(m.training for m in fused.modules())  # the eval mode of the layers replaced is kept
    with torch.no_grad():
        torch.testing.assert_close(output(fused, batch(1)), output(reference, batch(1)), rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(output(fused, batch(2)), output(reference, batch(2)), rtol=1e-5, atol=1e-6)
    for group in groups:  # the groups really shared their GEMM, and hold nothing once every member took its part
        shared = fused.get_submodule(group[0]).shared_input
        assert shared.shared and shared._input is None


def test_gradients_through_the_shared_gemm_equal_the_separate_ones():
    reference = compressed(llama)
    fused = copy.deepcopy(reference)
    fuse_shared_inputs(fused, **batch(0))
    for model in (reference, fused):
        output(model, batch(1)).square().mean().backward()
    for (name, p), q in zip(reference.named_parameters(), fused.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(isinstance(m, FusedLowRankLinear) for m in fused.modules())


def test_save_and_load_give_back_linked_fused_layers(tmp_path):
    model = compressed(bert)
    groups = fuse_shared_inputs(model, **batch(0))
    lowrank.save(model, tmp_path / "out")
    loaded = lowrank.load(tmp_path / "out")
    for group in groups:
        layers = [loaded.get_submodule(name) for name in group]
        assert all(isinstance(layer, FusedLowRankLinear) for layer in layers)
        assert layers[0].shared_input is not None and all(lay.shared_input is layers[0].shared_input for lay in layers)
        assert [layer.position for layer in layers] == [0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, batch(2)), output(model, batch(2)), rtol=1e-5, atol=1e-6)


class TwoInputs(nn.Module):
    """Query on one tensor, key on another (cross-attention); then the query called twice on one input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k = (LowRankLinear.from_dense(nn.Linear(16, 8), 4) for _ in range(2))

    def forward(self, x, y=None):
        return self.q(x) + self.k(x if y is None else y) + self.q(x)


def reference_forward(model, x, y=None):
    """The same arithmetic as TwoInputs, each layer its own two GEMMs."""
    def plain(layer, t):
        return t @ layer.first.T @ layer.second.T + layer.bias
    return plain(model.q, x) + plain(model.k, x if y is None else y) + plain(model.q, x)


def test_layers_called_on_different_inputs_stop_sharing_and_stay_right():
    model = TwoInputs()
    x, y = torch.randn(5, 16), torch.randn(5, 16)
    expected_same, expected_cross = reference_forward(model, x), reference_forward(model, x, y)
    assert fuse_shared_inputs(model, x) == [["q", "k"]]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected_same)   # q called again on x once the group is used up
        assert model.q.shared_input.shared
        torch.testing.assert_close(model(x, y), expected_cross)
        assert not model.q.shared_input.shared                 # the key read another tensor: no more sharing
        torch.testing.assert_close(model(x, y), expected_cross)


def test_a_half_used_group_recomputes_after_a_factor_changed_in_place():
    model = TwoInputs()
    fuse_shared_inputs(model, torch.randn(2, 16))
    x = torch.randn(3, 16)
    with torch.no_grad():
        model.q(x)                         # the group now holds k's bottleneck of x, made with the old k.first
        model.k.first.mul_(2.0)
        plain = x @ model.k.first.T @ model.k.second.T + model.k.bias
        torch.testing.assert_close(model.k(x), plain)


def test_a_layer_outside_its_group_computes_on_its_own():
    """A replica made by nn.DataParallel shares the group object but is not its member: it must not take a part."""
    model = TwoInputs()
    fuse_shared_inputs(model, torch.randn(2, 16))
    replica = model.k._replicate_for_data_parallel()  # what DataParallel does on every device
    assert replica.shared_input is model.k.shared_input
    # DataParallel then gives the replica its own copies of the parameters (here: a different first factor)
    replica.first, replica.second, replica.bias = model.k.first.detach() * 3, model.k.second, model.k.bias
    x = torch.randn(3, 16)
    with torch.no_grad():
        model.q(x)                         # the group holds the original k's bottleneck of x
        expected = x @ replica.first.T @ replica.second.T + replica.bias
        torch.testing.assert_close(replica(x), expected)
        assert model.q.shared_input.shared


def test_copies_keep_the_link_and_drop_held_activations():
    model = TwoInputs()
    fuse_shared_inputs(model, torch.randn(2, 16))
    x = torch.randn(3, 16, requires_grad=True)
    model.q(x)                                                 # a half-used group holds the bottlenecks of x
    clone = copy.deepcopy(model)
    assert clone.q.shared_input is clone.k.shared_input is not model.q.shared_input
    assert clone.q.shared_input._input is None
    with torch.no_grad():
        torch.testing.assert_close(clone(x), reference_forward(model, x))


def test_a_position_outside_the_siblings_is_refused():
    with pytest.raises(ValueError, match="position 2 is not a place in siblings"):
        FusedLowRankLinear(8, 8, 2, siblings=["q", "k"], position=2)
