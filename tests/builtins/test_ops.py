import torch

from detkit_builtins.ops import group_and_cap


def test_group_and_cap_orders_by_group_keeps_rank_and_caps():
    groups = torch.tensor([1, 0, 1, 2, 0, 1])
    keep = torch.tensor([2, 1, 0, 5, 4])  # best first, as batched_nms returns; index 3 was suppressed
    out, kept_groups, counts = group_and_cap(keep, groups, 3, cap=2)
    assert out.tolist() == [1, 4, 2, 0]  # group 0: 1, 4; group 1: 2, 0 (5 is its third); group 2: none left
    assert kept_groups.tolist() == [0, 0, 1, 1]
    assert counts.tolist() == [2, 2, 0]
    out, _, counts = group_and_cap(keep, groups, 3, cap=None)
    assert out.tolist() == [1, 4, 2, 0, 5] and counts.tolist() == [2, 3, 0]
