"""Position logic in isolation: layouts, contiguous re-positioning, M-RoPE against Qwen2-VL's own rope index."""

import torch

from infercache.stream.positions import layout, next_position, reposition, run_ids


def test_text_layout_1d_and_3d():
    assert torch.equal(layout(5, 1), torch.arange(5))
    assert torch.equal(layout(4, 3), torch.arange(4)[None].expand(3, 4))


def test_grid_layout_is_qwen2vl_order():
    pos = layout(6, 3, (1, 2, 3))
    assert pos.tolist() == [[0] * 6, [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2]]


def test_reposition_1d_is_index_within_cache():
    index = torch.tensor([0, 1, 2, 3, 50, 51, 52, 90, 91])
    pos = index.clone()
    assert reposition(index, pos).tolist() == list(range(9))
    assert run_ids(index).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]


def test_reposition_keeps_a_frame_layout_and_shrinks_gaps():
    # sinks (text 0..3), then a frame (t=0, 2x3 grid) that came after an eviction gap, then text after it
    frame = layout(6, 3, (1, 2, 3)) + 100
    text = torch.arange(103, 105)[None].expand(3, 2)  # Qwen2-VL: text after a frame starts at its max + 1
    pos = torch.cat([torch.arange(4)[None].expand(3, 4), frame, text], dim=1)
    index = torch.cat([torch.arange(4), torch.arange(200, 208)])
    new = reposition(index, pos)
    assert new[:, :4].tolist() == [[0, 1, 2, 3]] * 3
    assert torch.equal(new[:, 4:10], layout(6, 3, (1, 2, 3)) + 4)  # frame keeps its layout, starts after the sinks
    assert new[:, 10:].tolist() == [[7, 8]] * 3  # text right after the frame's largest position (as Qwen2-VL)
    assert next_position(new) == 9 and int(new.max()) < new.shape[1]


def test_layout_matches_qwen2vl_get_rope_index(qwen2vl, make_ids):
    model, _ = qwen2vl
    ids = torch.cat([make_ids(5), torch.full((24,), 290), make_ids(3, 1)])[None]
    types = torch.cat([torch.zeros(5), torch.ones(24), torch.zeros(3)]).long()[None]
    expected, _ = model.model.get_rope_index(ids, types, image_grid_thw=torch.tensor([[1, 4, 6]]))
    ours = [layout(5, 3)]
    ours.append(layout(24, 3, (1, 4, 6)) + next_position(torch.cat(ours, 1)))
    ours.append(layout(3, 3) + next_position(torch.cat(ours, 1)))
    assert torch.equal(torch.cat(ours, 1), expected[:, 0])
