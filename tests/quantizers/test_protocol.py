"""The quantizer protocol (``mixprec.quantizers.base.Quantizer``): every kind implements every
capability, learned kinds refuse ``set_bits``, and ``freeze`` keeps the grid."""
import inspect

import pytest
import torch
from torch import nn

from mixprec import quantizers
from mixprec.quantizers import (ActQuantizer, DNASActQuantizer, DNASWeightQuantizer, DQActQuantizer, DQWeightQuantizer,
                                FixedWeightQuantizer, Frozen, HGQActQuantizer, HGQWeightQuantizer, LearnedQuantizer,
                                Quantizer, freeze_observers)

RANGE_RULES = {"max", "mse", "observed", "learned"}
W_SHAPE = (4, 3, 2)


def _weight() -> torch.Tensor:
    # on a 1/64 grid, every channel with a different largest magnitude
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-40, 41, W_SHAPE, generator=g).float() / 64
    w[:, 0, 0] = torch.tensor([0.75, -0.5, 0.625, -0.3125])
    return w


def _acts() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(-24, 97, (16,) + W_SHAPE, generator=g).float() / 16


def _observed(q, x):
    q.train()
    q(x)
    return q


def make(kind: str, numerics: str):
    """An instance of each kind, ready to quantize (observed, calibrated, weights seen), and the
    weight it quantizes (``None`` for activations)."""
    w, x = _weight(), _acts()
    if kind == "FixedWeightQuantizer":
        return FixedWeightQuantizer(W_SHAPE, torch.tensor([2.0, 3, 4, 8]).reshape(4, 1, 1), numerics, "mse"), w
    if kind == "ActQuantizer":
        return _observed(ActQuantizer(W_SHAPE, 6, numerics), x), None
    if kind == "HGQWeightQuantizer":
        q = HGQWeightQuantizer(W_SHAPE, "per-channel", init_bits=3, weight=w)
        q.qparams(w)
        return q, w
    if kind == "HGQActQuantizer":
        q = HGQActQuantizer(W_SHAPE, "per-channel" if numerics == "fixed" else "per-tensor", init_f=3.0)
        q.calibrate([x])
        return q, None
    if kind == "DQWeightQuantizer":
        return DQWeightQuantizer(W_SHAPE, "per-channel", init_bits=4, weight=w, numerics=numerics), w
    if kind == "DQActQuantizer":
        q = DQActQuantizer(W_SHAPE, "per-channel" if numerics == "fixed" else "per-tensor", init_bits=5,
                           numerics=numerics)
        q.calibrate([x])
        return q, None
    if kind == "DNASWeightQuantizer":
        q = DNASWeightQuantizer(W_SHAPE, (0, 2, 4, 8), "per-channel", numerics)
        with torch.no_grad():
            # one-hot after the softmax: the training forward is the argmax model's
            q.alpha.copy_(torch.tensor([[0.0, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]) * 1e4)
        return q, w
    if kind == "DNASActQuantizer":
        q = _observed(DNASActQuantizer(W_SHAPE, (2, 4, 8), numerics), x)  # the first forward calibrates
        with torch.no_grad():
            q.alpha.copy_(torch.tensor([[0.0, 1e4, 0.0]]))  # 4 bits
        return q, None
    raise KeyError(kind)


KINDS = ["FixedWeightQuantizer", "ActQuantizer", "HGQWeightQuantizer", "HGQActQuantizer", "DQWeightQuantizer",
         "DQActQuantizer", "DNASWeightQuantizer", "DNASActQuantizer"]
LEARNED = {"HGQWeightQuantizer", "HGQActQuantizer", "DQWeightQuantizer", "DQActQuantizer", "DNASWeightQuantizer",
           "DNASActQuantizer"}
LEARNED_GRIDS = LEARNED - {"DNASWeightQuantizer"}  # DNAS learns the width; its grid comes from the weights
OBSERVERS = {"ActQuantizer", "HGQActQuantizer"}


def _concrete_kinds(cls=Quantizer) -> set[str]:
    out = set()
    for sub in cls.__subclasses__():
        if not inspect.isabstract(sub) and not sub.__name__.startswith("_") and sub.__module__.startswith("mixprec."):
            out.add(sub.__name__)
        out |= _concrete_kinds(sub)
    return out


def test_every_kind_is_checked():
    """A new quantizer kind joins ``KINDS`` (and ``make``) to be checked here."""
    assert _concrete_kinds() == set(KINDS)
    assert {k for k in KINDS if issubclass(getattr(quantizers, k), LearnedQuantizer)} == LEARNED


def test_the_protocol_is_abstract():
    with pytest.raises(TypeError):
        Quantizer()

    class NoFreeze(Quantizer):
        range_rule = "max"

        def bits(self):
            return torch.ones(1)

        def qparams(self, x=None):
            raise NotImplementedError

        def set_bits(self, bits):
            pass

    with pytest.raises(TypeError, match="freeze"):
        NoFreeze()


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_implements_every_capability(kind, numerics):
    q, w = make(kind, numerics)
    assert isinstance(q, Quantizer) and isinstance(q, nn.Module)
    bits = q.bits()
    assert isinstance(bits, torch.Tensor) and bits.dim() == len(W_SHAPE)
    qp = q.qparams(w)
    assert torch.equal(qp.bits.detach().round(), bits.detach().round())
    assert q.range_rule in RANGE_RULES
    assert (q.output_gate() is None) == (kind != "DNASWeightQuantizer")  # only a pruning kind gates the bias
    assert (q.range_rule == "learned") == (kind in LEARNED_GRIDS)
    # observing: switched where there is an observer, ignored where there is none
    q.set_observing(True)
    assert q.observing is (kind in OBSERVERS)
    q.set_observing(False)
    assert q.observing is False
    # freeze: a fixed quantizer, on the CPU and not observing, plus the weight to keep
    frozen = q.freeze(w, numerics=numerics)
    assert isinstance(frozen, Frozen)
    fixed, kept = frozen
    assert type(fixed) is (ActQuantizer if w is None else FixedWeightQuantizer)
    assert fixed is not q and fixed.numerics == numerics and not fixed.observing
    assert (kept is None) == (w is None)
    assert fixed.range_rule in RANGE_RULES - {"learned"}
    # set_bits: fixed kinds take them, learned ones say to freeze first
    if kind in LEARNED:
        with pytest.raises(TypeError, match="freeze it into a fixed-bit quantizer first"):
            q.set_bits(bits.detach())
    else:
        q.set_bits(torch.full_like(bits, 4.0))
        assert bool((q.bits() == 4.0).all())
    fixed.set_bits(torch.full_like(fixed.bits(), 5.0))
    assert bool((fixed.bits() == 5.0).all())


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
@pytest.mark.parametrize("kind", KINDS)
def test_freeze_round_trip_keeps_qparams(kind, numerics):
    q, w = make(kind, numerics)
    before = q.qparams(w)
    fixed, kept = q.freeze(w, numerics=numerics)
    after = fixed.qparams(kept)
    shape = W_SHAPE
    assert after.signed == before.signed and after.narrow == before.narrow
    assert torch.equal(after.full(shape).bits, before.full(shape).bits.detach().round())
    a, b = after.full(shape).scale, before.full(shape).scale.detach()
    if kind == "HGQWeightQuantizer" and numerics == "scaled":
        # one real scale per channel from the weights' own range: the learned power of two or finer
        assert bool((a <= b).all()) and bool((a > b / 2).all())
    elif kind in LEARNED_GRIDS - {"DNASActQuantizer"} and numerics == "scaled":  # step * largest code, divided again
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    else:  # powers of two, or the same quantizer copied
        assert torch.equal(a, b)
    if kept is not None and torch.equal(a, b):  # the kept weight quantizes as the learned grid did
        assert torch.equal(fixed(kept), q(w).detach())
    # a frozen copy of a frozen quantizer is the same again
    again, kept2 = fixed.freeze(kept)
    assert torch.equal(again.qparams(kept2).scale, after.scale) and torch.equal(again.bits(), fixed.bits())


@pytest.mark.parametrize("kind", ["ActQuantizer", "HGQActQuantizer", "DQActQuantizer", "DNASActQuantizer"])
def test_activation_freeze_takes_no_weight(kind):
    q, _ = make(kind, "fixed")
    with pytest.raises(TypeError, match="set_observing"):
        q.freeze(False)  # what stopping an HGQ observer was once called


@pytest.mark.parametrize("kind", ["FixedWeightQuantizer", "HGQWeightQuantizer", "DQWeightQuantizer",
                                  "DNASWeightQuantizer"])
def test_weight_freeze_needs_the_weight(kind):
    q, _ = make(kind, "scaled")
    with pytest.raises(TypeError, match="weight tensor"):
        q.freeze()


def test_per_group_activation_bits_freeze_only_under_fixed_numerics():
    q, _ = make("HGQActQuantizer", "fixed")  # per channel
    with pytest.raises(ValueError, match="fixed-point numerics"):
        q.freeze(numerics="scaled")


def test_a_pruned_activation_group_stays_pruned_when_frozen():
    """A feature learned at 0 bits (a pruned input pixel) freezes at 0 bits: at 1 bit it would come
    back and cost what the search saved (an MNIST MLP's EBOPs went from 7.6k to 38k). A whole tensor
    keeps at least a bit."""
    from mixprec.quantizers.hgq import HGQActQuantizer

    q = HGQActQuantizer((4,), "per-element", init_f=3.0)
    q.train()
    q(torch.tensor([[0.5, 3.0, 1.0, -0.7]]))
    with torch.no_grad():
        q.f[0] = -20.0
    fixed = q.freeze(numerics="fixed").quantizer
    assert torch.equal(fixed.bits(), q.bits().detach()) and float(fixed.bits()[0]) == 0.0
    fixed.eval()
    assert torch.all(fixed(torch.tensor([[0.4, 2.9, 1.1, -0.6]]))[:, 0] == 0.0)
    whole = HGQActQuantizer((4,), "per-tensor", init_f=-20.0)
    whole.train()
    whole(torch.tensor([[0.5, 3.0, 1.0, -0.7]]))
    assert float(whole.freeze(numerics="fixed").quantizer.bits().min()) == 1.0


def test_frozen_activation_takes_the_given_clip():
    q, _ = make("DQActQuantizer", "scaled")
    assert q.freeze().quantizer.clip == q.clip
    assert q.freeze(clip=(0.0, 6.0)).quantizer.clip == (0.0, 6.0)
    a, _ = make("ActQuantizer", "scaled")
    assert a.freeze(clip=(0.0, 6.0)).quantizer.clip == (0.0, 6.0)


def test_not_observing_keeps_the_range():
    x = _acts()
    for kind in sorted(OBSERVERS):
        q, _ = make(kind, "fixed")
        q.set_observing(False)
        lo, hi = q.running_min.clone(), q.running_max.clone()
        q.train()
        q(x * 10)
        assert torch.equal(q.running_min, lo) and torch.equal(q.running_max, hi), kind
        q.set_observing(True)
        q(x * 10)
        assert not torch.equal(q.running_max, hi), kind


def test_freeze_observers_uses_the_protocol():
    model = nn.ModuleList([make(k, "fixed")[0] for k in KINDS])
    freeze_observers(model)
    assert not any(q.observing for q in model)
    freeze_observers(model, False)
    assert {type(q).__name__ for q in model if q.observing} == OBSERVERS
