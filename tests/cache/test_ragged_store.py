import pytest
import torch

from infercache.cache.ragged import RaggedStore


def _dense(b=2, h=3, n=21, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def _keep(b, h, n, counts, seed=1):
    g = torch.Generator().manual_seed(seed)
    kmax = int(counts.max())
    keep = torch.zeros(b, h, kmax, dtype=torch.long)
    for i in range(b):
        for j in range(h):
            c = int(counts[i, j])
            keep[i, j, :c] = torch.sort(torch.randperm(n, generator=g)[:c]).values
    return keep


@pytest.mark.parametrize("page", [1, 4, 16])
def test_from_dense_gather_roundtrip_and_compact_layout(page):
    k, v = _dense()
    counts = torch.tensor([[10, 5, 0], [3, 21, 1]])
    keep = _keep(2, 3, 21, counts)
    store = RaggedStore.from_dense({"k": k, "v": v}, keep, counts, page)
    store.check()
    out, valid = store.gather()
    assert torch.equal(valid.sum(-1), counts)
    for i in range(2):
        for j in range(3):
            c = int(counts[i, j])
            assert torch.equal(out["k"][i, j, :c], k[i, j, keep[i, j, :c]])
            assert torch.equal(out["v"][i, j, :c], v[i, j, keep[i, j, :c]])
    # Bytes held = pages actually owned; slack below one page per head.
    pages = ((counts + page - 1) // page).sum()
    assert store.nbytes() == int(pages) * page * 4 * 4 * 2
    assert store.nbytes() < (int(counts.sum()) + 6 * page) * 4 * 4 * 2


def test_append_then_keep_preserves_order_and_values():
    k, v = _dense()
    counts = torch.tensor([[7, 2, 9], [16, 1, 4]])
    keep = _keep(2, 3, 21, counts)
    store = RaggedStore.from_dense({"k": k, "v": v}, keep, counts, 4)
    steps = [torch.randn(2, 3, q, 4) for q in (1, 3, 1)]
    for s in steps:
        store.append({"k": s, "v": -s})
        store.check()
    out, _ = store.gather()
    for i in range(2):
        for j in range(3):
            c = int(counts[i, j])
            tail = torch.cat([s[i, j] for s in steps])
            assert torch.equal(out["k"][i, j, c : c + 5], tail)
            assert torch.equal(out["v"][i, j, c : c + 5], -tail)
    # keep the first and the last entry of every head
    lengths = store.lengths.clone()
    sel = torch.stack([torch.zeros_like(lengths), lengths - 1], -1)
    before, _ = store.gather()
    store.keep(sel, torch.full_like(lengths, 2))
    store.check()
    after, _ = store.gather()
    for i in range(2):
        for j in range(3):
            assert torch.equal(after["k"][i, j, 0], before["k"][i, j, 0])
            assert torch.equal(after["k"][i, j, 1], before["k"][i, j, int(lengths[i, j]) - 1])
    assert store.nbytes() == 6 * 4 * 4 * 4 * 2  # one page of 4 slots per head


def test_rejects_bad_page_size():
    with pytest.raises(ValueError, match="page_size"):
        RaggedStore(1, 1, 0)
