"""The loaders unlearning methods get (farm.train.loops.BatchLoader): whole batches gathered at once, the same
batches in the same order as torch's DataLoader with the same generator, epoch after epoch."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from farm.train.loops import BatchLoader, make_loader


def _pair(n: int, bs: int, shuffle: bool):
    x, y = torch.randn(n, 2, 3, 3), torch.randint(0, 10, (n,))
    g1, g2 = torch.Generator(), torch.Generator()
    g1.manual_seed(5)
    g2.manual_seed(5)
    return (DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=shuffle, generator=g1),
            BatchLoader(TensorDataset(x, y), batch_size=bs, shuffle=shuffle, generator=g2), g1, g2)


@pytest.mark.parametrize("n", [103, 96, 5])
@pytest.mark.parametrize("shuffle", [True, False])
def test_the_same_batches_as_a_dataloader_epoch_after_epoch(n, shuffle):
    torch_loader, ours, g1, g2 = _pair(n, 16, shuffle)
    assert len(ours) == len(torch_loader) and ours.batch_size == 16 and ours.dataset is not None
    for _ in range(3):
        a, b = list(torch_loader), list(ours)
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(g1.get_state(), g2.get_state())


def test_a_pass_left_early_leaves_the_generator_as_a_dataloader_does():
    torch_loader, ours, g1, g2 = _pair(103, 16, True)
    for loader in (torch_loader, ours):
        for i, _ in enumerate(loader):
            if i == 2:
                break
    assert torch.equal(g1.get_state(), g2.get_state())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(torch_loader, ours))


def test_make_loader_gathers_its_subset():
    images, labels = torch.arange(40.0).view(10, 1, 2, 2), torch.arange(10)
    loader = make_loader(images, labels, torch.tensor([7, 2, 5]).numpy(), 2, False, 0)
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[7, 2], [5]] and isinstance(loader, DataLoader)


def test_augmenting_loaders_keep_the_order_and_augment_where_the_images_live():
    """augment=True: the same labels in the same order as without, each batch the plain batch through
    augment_batch with the loader's own augmentation generator (fresh draws every pass)."""
    from farm.train.loops import AUGMENT_SEED_OFFSET, augment_batch

    images, labels = torch.randn(30, 1, 6, 6), torch.arange(30)
    plain = make_loader(images, labels, torch.arange(30).numpy(), 8, True, 3)
    augmented = make_loader(images, labels, torch.arange(30).numpy(), 8, True, 3, augment=True)
    gen = torch.Generator().manual_seed(3 + AUGMENT_SEED_OFFSET)
    passes = []
    for _ in range(2):
        batches = list(zip(plain, augmented))
        for (x, y), (xa, ya) in batches:
            assert torch.equal(ya, y) and x.device == xa.device
            assert torch.equal(xa, augment_batch(x, gen))
        passes.append(torch.cat([xa for _, (xa, _) in batches]))
    assert not torch.equal(passes[0], passes[1])  # new shifts and flips every pass
    assert not torch.equal(torch.cat([x for x, _ in plain]), torch.cat([x for x, _ in augmented]))
