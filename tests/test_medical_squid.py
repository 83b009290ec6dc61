"""squid: the space-aware FIFO memory queue and Gumbel shrinkage exactly, the in-painting's use of
the neighbours (not the patch itself), the training step's queue update, that per-position memory
makes a patch moved to a wrong place anomalous, the score recomputed from the fitted parts, and
clear errors for bad hyperparameters."""
from __future__ import annotations

import pytest
import torch

import anomaly_zoo as az
from anomaly_zoo.models.medical.blocks import from_patches, to_patches
from anomaly_zoo.models.medical.squid import InpaintBlock, MemoryQueue, gumbel_shrink, neighbours, position_code
from anomaly_zoo.ops import gaussian_blur
from anomaly_zoo.training import Context
from anomaly_zoo.utils import AnomalyZooError

TINY = dict(image_size=None, grid=2, levels=2, width=4, heads=2, memory_size=20, combine=1, epochs=12, batch_size=4,
            lr=3e-3, d_lr=3e-3, sigma_map=0.0)


def anatomy(n: int, seed: int, side: int = 32) -> torch.Tensor:
    """Aligned toy "scans": each quadrant always holds its own smooth structure (a ramp to the right, a
    ramp downwards, a disk, a bar) with random contrast and noise, so what is normal depends on where."""
    g = torch.Generator().manual_seed(seed)
    h = side // 2
    yy, xx = torch.meshgrid(torch.arange(h) / (h - 1), torch.arange(h) / (h - 1), indexing="ij")
    parts = [xx, yy, (((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.1).float(), ((xx - 0.5).abs() < 0.15).float()]
    out = torch.empty(n, 3, side, side)
    for i in range(n):
        q = [0.2 + 0.6 * p * (0.8 + 0.2 * torch.rand(1, generator=g)) for p in parts]
        img = torch.cat([torch.cat(q[:2], 1), torch.cat(q[2:], 1)], 0) + 0.02 * torch.randn(side, side, generator=g)
        out[i] = img.clamp(0, 1)
    return out


@pytest.fixture(scope="module")
def fitted():
    return az.create("squid", **TINY).fit(anatomy(20, 0))


def test_squid_patches_round_trip_row_major():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    p = to_patches(x, 2)
    assert p.shape == (8, 3, 4, 4)
    assert torch.equal(p[1], x[0, :, :4, 4:]) and torch.equal(p[2], x[0, :, 4:, :4]) and torch.equal(p[7], x[1, :, 4:, 4:])
    assert torch.equal(from_patches(p, 2), x)


def test_squid_memory_queue_is_per_position_fifo():
    q = MemoryQueue(positions=2, size=3, dim=1, top_k=1)
    q.items.zero_()

    def batch(*v):  # [B, P=2, 1]: the value at position 1 is ten times the one at position 0
        return torch.tensor([[[a], [10 * a]] for a in v], dtype=torch.float32)

    q.push(batch(1, 2))
    assert q.items[:, :, 0].tolist() == [[1, 2, 0], [10, 20, 0]] and q.ptr.tolist() == [2, 2]
    q.push(batch(3, 4))  # wraps around: 4 overwrites the oldest entry (1) of each position's queue
    assert q.items[:, :, 0].tolist() == [[4, 2, 3], [40, 20, 30]] and q.ptr.tolist() == [1, 1]
    q.push(batch(5, 6, 7, 8))  # more than the queue holds: written one by one from slot 1, 8 overwrites 5
    assert q.items[:, :, 0].tolist() == [[7, 8, 6], [70, 80, 60]] and q.ptr.tolist() == [2, 2]


def test_squid_memory_read_is_gumbel_shrinkage_over_its_own_position_only():
    g = torch.Generator().manual_seed(0)
    mem = MemoryQueue(positions=3, size=6, dim=4, top_k=2)
    mem.items.copy_(torch.randn(3, 6, 4, generator=g))
    query = torch.randn(5, 3, 4, generator=g)
    out, w = mem.read(query)
    for p in range(3):
        soft = torch.softmax(query[:, p] @ mem.items[p].T, -1)
        top = soft.topk(2, -1)
        hard = torch.zeros_like(soft).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        torch.testing.assert_close(w[:, p], hard)
        torch.testing.assert_close(out[:, p], hard @ mem.items[p])
    mem.items[2] += 5.0  # another position's memory leaves positions 0 and 1 untouched
    torch.testing.assert_close(mem.read(query)[0][:, :2], out[:, :2])
    # backward is the softmax's (straight-through), forward the shrunk weights
    logits = torch.randn(4, 6, generator=g, requires_grad=True)
    coef = torch.randn(4, 6, generator=g)
    (gumbel_shrink(logits, 2) * coef).sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    (torch.softmax(ref, -1) * coef).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_squid_neighbours_are_the_8_surrounding_patches_zero_padded():
    r = (torch.arange(9, dtype=torch.float32) + 1).view(1, 9, 1)  # value = position + 1 on a 3 x 3 grid
    nb = neighbours(r, 3)[:, :, 0]
    assert nb[4].tolist() == [1, 2, 3, 4, 6, 7, 8, 9]  # the centre: everything but itself
    assert nb[0].tolist() == [0, 0, 0, 0, 2, 0, 4, 5]  # a corner: three neighbours, zeros outside the grid
    assert position_code(4).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]


def test_squid_inpainting_uses_neighbours_not_the_patch_itself():
    """One memory item per position and keys blind to the query: what the block outputs for a patch
    cannot depend on that patch's own feature, only on its neighbours' memory."""
    torch.manual_seed(0)
    block = InpaintBlock(16, (2, 2), grid=3, heads=2, mask_ratio=0.95, memory_size=1, top_k=1).eval()
    with torch.no_grad():
        block.attention.in_proj_weight[16:32].zero_()  # key projection: uniform attention over neighbours
        block.attention.in_proj_bias.zero_()
    feat = torch.randn(9, 16, 2, 2)  # one image, 3 x 3 patches
    base, _ = block(feat)
    moved = feat.clone()
    moved[0] = 10 * torch.randn(16, 2, 2)  # patch 0 changes completely
    out, _ = block(moved)
    torch.testing.assert_close(out[0], base[0])  # ... its in-painted feature does not
    with torch.no_grad():
        block.memory.items[8] += 1.0  # position 8 is not a neighbour of patch 0
        torch.testing.assert_close(block(feat)[0][0], base[0])
        block.memory.items[1] += 1.0  # position 1 is
        assert not torch.allclose(block(feat)[0][0], base[0])
    # the masked shortcut in training: delta ~ Bernoulli(rho) picks the in-painted feature, else the real one
    block.train()
    block.mask_ratio = 0.0
    torch.testing.assert_close(block(feat, torch.Generator().manual_seed(0))[0], feat)


def test_squid_training_step_enqueues_its_real_features():
    det = az.create("squid", **TINY).fit(anatomy(6, 3))
    x = anatomy(4, 4)
    det.train()
    det.net_.inpaint.memory.ptr.zero_()
    det._g_step(x, Context(0, 0, torch.Generator().manual_seed(0), torch.device("cpu")))
    q = det.memory_queries(x)  # in train mode (BatchNorm on batch statistics), as the step computed them
    torch.testing.assert_close(det.net_.inpaint.memory.items[:, :4], q.transpose(0, 1))
    assert det.net_.inpaint.memory.ptr.tolist() == [4] * 4


def test_squid_patch_moved_to_a_wrong_position_scores_higher(fitted):
    """Every quadrant still holds a normal structure, only at the wrong place (top-left <-> bottom-right):
    each position's memory holds what belongs there, so the student puts the original structures back.
    The reconstruction's behaviour held in every training run tried (5 of 5); the discriminator's score
    rose for the moved patches in 4 of 5 (seed 0, used here, among them)."""
    test = anatomy(8, 1)
    quads = to_patches(test, 2).view(8, 4, 3, 16, 16)
    swapped = from_patches(quads[:, [3, 1, 2, 0]].reshape(32, 3, 16, 16), 2)
    in_place, moved = fitted.predict(test), fitted.predict(swapped)
    with torch.no_grad():
        rec = to_patches(fitted.reconstruct(swapped), 2).view(8, 4, 3, 16, 16)[:, [0, 3]]
    to_original = (rec - quads[:, [0, 3]]).abs().flatten(1).mean(1)
    to_input = (rec - quads[:, [3, 0]]).abs().flatten(1).mean(1)
    assert (to_original < to_input).all()
    assert (moved.maps.flatten(1).mean(1) > 1.2 * in_place.maps.flatten(1).mean(1)).all()
    assert moved.scores.mean() > in_place.scores.mean() + 0.2


def test_squid_score_is_the_discriminator_recomputed_from_parts(fitted):
    train, test = anatomy(20, 0), anatomy(5, 2)
    pred = fitted.predict(test)
    with torch.no_grad():
        rec_train = fitted.net_(train, teacher=False)["student"]
        logits = fitted.disc_(rec_train)
        assert torch.allclose(fitted.d_mean_, logits.mean()) and torch.allclose(fitted.d_std_, logits.std())
        rec = fitted.net_(test, teacher=False)["student"]
        want = 1 - torch.sigmoid((fitted.disc_(rec) - logits.mean()) / logits.std())
    torch.testing.assert_close(pred.scores, want, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(pred.maps, gaussian_blur((test - rec).abs().mean(1), 0.0))
    assert not fitted.net_.training and fitted.history_["generator"][-1] < fitted.history_["generator"][0]


@pytest.mark.parametrize("kw, key", [
    (dict(image_size=60), "image_size"),  # 60 is not divisible by grid * 2^levels = 2 * 16
    (dict(grid=1), "grid"),
    (dict(combine=5), "combine"),
    (dict(memory_size=4, top_k=5), "top_k"),
    (dict(heads=7), "heads"),
    (dict(mask_ratio=1.5), "mask_ratio"),
    (dict(w_disc=0.0), "w_disc"),
])
def test_squid_bad_hyperparameters_raise_one_clear_error(kw, key):
    x = torch.rand(4, 3, 64, 64)
    with pytest.raises(AnomalyZooError, match=rf"squid: {key}=.* is out of range; allowed"):
        az.create("squid", **kw).fit(x)


def test_squid_images_not_divisible_by_the_grid_are_refused():
    with pytest.raises(AnomalyZooError, match=r"divisible by grid \* 2\^levels = 2 \* 2\^2 = 8"):
        az.create("squid", **TINY).fit(torch.rand(4, 3, 36, 36))
