import torch

from megatron_harpe.sharding import is_glu_fc1, tp_slice


def test_glu_fc1_slices_gate_and_up_separately():
    gate = torch.arange(8).view(8, 1)
    up = 100 + torch.arange(8).view(8, 1)
    full = torch.cat([gate, up])
    rank1 = tp_slice(full, 0, 1, 2, glu=True)
    assert rank1.flatten().tolist() == [4, 5, 6, 7, 104, 105, 106, 107]
    assert tp_slice(full, 0, 1, 2).flatten().tolist() == [100 + i for i in range(8)]  # plain: rows 8..15
    assert is_glu_fc1("decoder.layers.3.mlp.linear_fc1.weight", True)
    assert not is_glu_fc1("decoder.layers.3.mlp.linear_fc1.weight", False)
    assert not is_glu_fc1("decoder.layers.3.mlp.linear_fc2.weight", True)
