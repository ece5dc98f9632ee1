import pickle

import pytest
import torch
import torch.nn.functional as F

from mixprec.data.augment import crop_flip, random_crop_flip


def reference(x, offsets, flips, padding):
    """The obvious per-sample loop: pad, slice, maybe flip."""
    h, w = x.shape[-2:]
    out = []
    for xi, (dy, dx), flip in zip(x, offsets.tolist(), flips.tolist()):
        crop = F.pad(xi, (padding,) * 4)[:, dy:dy + h, dx:dx + w]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


def batch(n=16, c=3, h=8, w=6, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_crop_only_matches_the_per_sample_loop():
    x, g = batch(), torch.Generator().manual_seed(1)
    offsets = torch.randint(0, 9, (16, 2), generator=g)
    flips = torch.zeros(16, dtype=torch.bool)
    assert torch.equal(crop_flip(x, offsets, flips, 4), reference(x, offsets, flips, 4))


def test_flip_only_matches_the_per_sample_loop():
    x = batch()
    flips = torch.arange(16) % 3 == 0
    centred = torch.full((16, 2), 4)
    out = crop_flip(x, centred, flips, 4)
    assert torch.equal(out, reference(x, centred, flips, 4))
    assert torch.equal(out[flips], x[flips].flip(-1)) and torch.equal(out[~flips], x[~flips])


def test_crop_and_flip_match_the_per_sample_loop():
    x, g = batch(n=64, h=5, w=7), torch.Generator().manual_seed(2)
    offsets = torch.randint(0, 5, (64, 2), generator=g)
    flips = torch.randint(0, 2, (64,), generator=g).bool()
    assert torch.equal(crop_flip(x, offsets, flips, 2), reference(x, offsets, flips, 2))


def test_random_crop_flip_shapes_determinism_and_variety():
    x, aug = batch(n=256, h=32, w=32), random_crop_flip(4)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    c = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype and a.is_contiguous()
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Some samples shifted (zero borders appear), some flipped, some untouched.
    assert (a == 0).any() and not torch.equal(a, x)
    # Each output is one of the 81 x 2 possible crops/flips of its input.
    g = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 9, (256, 2), generator=g)
    flips = torch.randint(0, 2, (256,), generator=g).bool()
    assert torch.equal(a, reference(x, offsets, flips, 4))


def test_padding_zero_flips_only_and_input_is_untouched():
    x = batch(n=200)
    before = x.clone()
    out = random_crop_flip(0)(x, torch.Generator().manual_seed(3))
    assert torch.equal(x, before)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 50 < int(mirrored.sum()) < 150


def test_augment_pickles_and_rejects_bad_input():
    aug = pickle.loads(pickle.dumps(random_crop_flip(4)))
    assert aug.padding == 4
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(-1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        aug(torch.zeros(4, 10), torch.Generator())
