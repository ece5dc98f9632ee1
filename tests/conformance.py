"""The conformance suite of bit-exact integer deployment (in the spirit of HGQ2's ``tests/base.py``).

A subclass names small float models in ``builders`` (``name -> () -> (model, input_shape)``); every
check below then runs for each builder, each granularity and both numerics. A case is: convert with
random bit-widths (2..8, random per channel / per element where the granularity allows), calibrate,
take a couple of SGD steps in training mode so the weights move, switch to eval. The checks:

* the eval path (torch integer kernels) equals the NumPy reference bit for bit, on random inputs
  and on inputs lying on the input quantizer's grid, at the output and at every intermediate tensor;
* integers lie in the ranges their bit-widths allow (weights after per-element alignment, int32
  biases, every activation), and requantization parameters are well formed;
* the eval path stays within an LSB of the fake-quantization training path layer by layer (each
  layer fed the reference integers of its inputs), and end to end within a few output LSBs at 8
  bits (this catches gross lowering bugs, not rounding details).

Export targets can subclass too and add a check comparing their artifact to ``reference``.
"""
from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from mixprec import execute
from mixprec.convert import convert
from mixprec.execute import TorchKernels, quantize_input
from mixprec.granularity import GRANULARITIES, expand, reduce_to, shape_for
from mixprec.graph.convert import trace
from mixprec.graph.ir import REQUANTIZING_OPS
from mixprec.nn.model import QuantModel
from mixprec.numerics import INT32_MAX, INT32_MIN, qrange
from mixprec.quantizers import freeze_observers
from mixprec.quantizers.base import NUMERICS

BATCH = 3
BIT_RANGE = (2, 8)
SGD_STEPS = 2
LR = 0.05
# The training path computes in float32 and rounds ties to even where the integer kernels round
# half away (TFLite) or half up (power-of-two shifts); one LSB per layer absorbs that. End to end a
# one-LSB difference grows through the layers after it, without bound when a 2-bit layer feeds an
# 8-bit one, so the whole-model comparison runs at 8 bits everywhere, within a few output LSBs.
LAYER_LSB_TOL = 1
MODEL_LSB_TOL = 3
MODEL_BITS = 8


def random_bits(shape, granularity: str, rng: np.random.Generator) -> torch.Tensor:
    """Random bit-widths in ``BIT_RANGE`` with the shape of ``granularity`` over ``shape``."""
    size = shape_for(granularity, tuple(shape))
    return torch.from_numpy(rng.integers(BIT_RANGE[0], BIT_RANGE[1] + 1, size=size)).to(torch.float32)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so folding changes the weights."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.5)
    return model


@dataclass
class Case:
    """A converted, calibrated, briefly trained model in eval mode, plus the inputs to check."""

    name: str
    granularity: str
    numerics: str
    qm: QuantModel
    weight_bits: dict
    act_bits: dict
    inputs: dict  # kind -> float32 tensor
    grid_codes: np.ndarray  # the input integers the "grid" input was built from

    @property
    def ig(self):
        return self.qm.lower()


def grid_input(ig, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Inputs on the input quantizer's grid: ``k * scale`` with random integers ``k`` in range."""
    node = ig["input"]
    g = node.grid
    shape = (BATCH,) + tuple(node.out_shape)
    lo = np.broadcast_to(g.lo, node.out_shape)
    hi = np.broadcast_to(g.hi, node.out_shape)
    k = rng.integers(lo, hi + 1, size=shape)
    x = (k * np.broadcast_to(g.elem_scale, node.out_shape)).astype(np.float32)
    return torch.from_numpy(x), k


def train_briefly(qm: QuantModel, x: torch.Tensor) -> None:
    """A couple of SGD steps through the fake-quant path. Where no gradient reaches the weights
    (every unit clipped or dead at these tiny sizes), nudge them instead: the point is that the
    lowered weights are not the ones the model was converted with."""
    params = [p for p in qm.parameters() if p.requires_grad]
    if not params:
        return
    before = [p.detach().clone() for p in params]
    qm.train()
    opt = torch.optim.SGD(params, lr=LR)
    target = torch.randn_like(qm(x))
    for _ in range(SGD_STEPS):
        opt.zero_grad()
        loss = (qm(x) - target).square().mean()
        loss.backward()
        opt.step()
    if all(torch.equal(b, p) for b, p in zip(before, params)):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=LR)


def build_case(name: str, builder, granularity: str, numerics: str, views: bool = True) -> Case:
    seed = zlib.crc32(f"{name}/{granularity}/{numerics}".encode())
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, input_shape = builder()
    randomize_bn(model)
    graph, _ = trace(model, input_shape)
    wbits = {n.name: random_bits(n.weight_shape, granularity, rng) for n in graph.weighted()}
    abits = {n.name: random_bits(n.out_shape, granularity, rng) for n in graph if n.op in REQUANTIZING_OPS}
    qm = convert(model, input_shape, numerics, wbits, abits, granularity, granularity, views=views)
    x = torch.randn((BATCH,) + tuple(input_shape))
    qm.calibrate([x])
    train_briefly(qm, x)
    qm.eval()
    x_grid, codes = grid_input(qm.lower(), rng)
    inputs = {
        "random": torch.randn((BATCH,) + tuple(input_shape)) * 1.5,  # partly beyond the calibrated range
        "grid": x_grid,
        "calibration": x,
    }
    return Case(name, granularity, numerics, qm, wbits, abits, inputs, codes)


def pruned_per_element(model, shape, seed, **act_bits):
    """``model`` converted with random per-element weight and activation bits (0 = pruned), the input's
    from 1 bit up and the output's from 4, those of ``act_bits`` (node: bits) as given; calibrated."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    graph, _ = trace(model, shape)
    bits = lambda s, lo: torch.from_numpy(rng.integers(lo, 8, size=s)).float()  # noqa: E731
    last = graph.weighted()[-1].name
    act = {n.name: bits(n.out_shape, {"input": 1, last: 4}.get(n.name, 0)) for n in graph if n.op in REQUANTIZING_OPS}
    act.update({name: torch.as_tensor(b, dtype=torch.float32).expand(graph[name].out_shape).clone()
                for name, b in act_bits.items()})
    weight = {n.name: bits(n.weight_shape, 0) for n in graph.weighted()}
    qm = convert(model, shape, "fixed", weight, act, "per-element", "per-element")
    qm.calibrate([torch.randn(64, *shape) * 1.5])
    qm.eval()
    return qm


def node_lsb(ig, graph, name: str, exact_inputs: bool = True) -> torch.Tensor:
    """One step of the grid of tensor ``name``, per element where grids differ per element (fixed
    point with per-channel/element bits). Pass-through ops keep their input's (pooling windows mix
    elements: the coarsest step), except that average pooling of exact inputs rounds onto the
    common grid."""
    node = ig[name]
    if node.grid is not None:
        return torch.from_numpy(np.broadcast_to(node.grid.elem_scale, node.out_shape).copy())
    if node.op == "avgpool" and exact_inputs:
        return torch.tensor(ig[graph.grid_source(name)].grid.scale, dtype=torch.float64)
    src = node_lsb(ig, graph, node.inputs[0], exact_inputs)
    if node.op == "flatten":
        return torch.broadcast_to(src, ig[node.inputs[0]].out_shape).reshape(-1)
    return src.max()


_CASES: dict = {}


def case_for(name: str, builder, granularity: str, numerics: str) -> Case:
    """``build_case``, once per test session: the exactness suite, the C sweep and the export tests
    read the same cases (none of them changes one)."""
    key = (name, builder, granularity, numerics)
    if key not in _CASES:
        _CASES[key] = build_case(name, builder, granularity, numerics)
    return _CASES[key]


class ExactnessSuite:
    """Bit-exactness checks, parametrized over ``builders`` x ``granularities`` x ``numerics``."""

    builders: dict = {}
    # builders whose end-to-end tolerance is wider than MODEL_LSB_TOL (each layer still within one LSB):
    # e.g. a product multiplies a one-LSB rounding difference of either input by the other's magnitude
    model_lsb_tol: dict = {}
    granularities = GRANULARITIES
    numerics = NUMERICS

    def pytest_generate_tests(self, metafunc):
        if "case" not in metafunc.fixturenames:
            return
        params = [(name, g, num) for name in self.builders for g in self.granularities for num in self.numerics]
        metafunc.parametrize("case_key", params, ids=["-".join(p) for p in params])

    @pytest.fixture
    def case(self, case_key) -> Case:
        name, granularity, numerics = case_key
        return case_for(name, self.builders[name], granularity, numerics)

    # -- bit-exactness --------------------------------------------------------------------------
    def test_eval_path_equals_reference(self, case):
        ig = case.ig
        for kind, x in case.inputs.items():
            y = case.qm(x)
            ref = execute.reference(ig, x.numpy())
            expected = torch.from_numpy(np.asarray(ref)).to(torch.float32) * ig.output_scale
            assert y.dtype == torch.float32
            assert np.array_equal(y.numpy(), expected.numpy()), f"{kind} input: eval path != reference"

    def test_every_intermediate_equal(self, case):
        ig = case.ig
        ig_torch = ig.map_arrays(torch.as_tensor)
        for kind, x in case.inputs.items():
            out_t, env_t = execute.run(ig_torch, x, TorchKernels, keep=True)
            out_r, env_r = execute.reference(ig, x.numpy(), keep=True)
            assert list(env_t) == list(env_r) == [n.name for n in ig.nodes]
            for name in env_r:
                assert env_t[name].dtype == torch.int64 and env_r[name].dtype == np.int64
                assert np.array_equal(env_t[name].numpy(), env_r[name]), f"{kind} input: node {name!r} differs"
            assert np.array_equal(out_t.numpy(), out_r)

    def test_grid_input_round_trips(self, case):
        node = case.ig["input"]
        q = quantize_input(case.inputs["grid"].numpy(), node)
        shift = 0 if node.grid.post_shift is None else node.grid.post_shift
        assert np.array_equal(q, case.grid_codes << shift)

    # -- ranges ---------------------------------------------------------------------------------
    def test_weights_fit_their_bits(self, case):
        for node in case.qm.graph.weighted():
            shape = tuple(node.weight_shape)
            w_int = case.ig[node.name].params["weight"]
            assert w_int.dtype == np.int64 and w_int.shape == shape
            w_scale = case.qm.layers[node.name].qparams().full(shape).scale.detach().double()
            channel = expand(reduce_to(w_scale, (shape[0],) + (1,) * (len(shape) - 1), "amin"), shape)
            align = np.log2((w_scale / channel).numpy())
            assert np.array_equal(align, np.round(align)) and np.all(align >= 0)
            if case.numerics == "scaled":
                assert np.all(align == 0), "scaled numerics: one scale per output channel"
            step = np.int64(1) << align.astype(np.int64)
            assert np.all(w_int % step == 0), f"{node.name}: weights not on their element's grid"
            lo, hi = qrange(expand(case.weight_bits[node.name], shape).to(torch.int64).numpy(), True, narrow=True)
            k = w_int // step
            assert np.all((k >= lo) & (k <= hi)), f"{node.name}: weights exceed their bit-widths"

    def test_biases_fit_int32(self, case):
        for node in case.qm.graph.weighted():
            b = case.ig[node.name].params["bias"]
            assert b.dtype == np.int64 and b.size == node.out_shape[0]
            assert np.all((b >= INT32_MIN) & (b <= INT32_MAX))
            # no saturation happened: the bias is the rounded real bias on the accumulator grid
            acc = case.ig[node.name].params["acc_scale"]
            real = case.qm.layers[node.name].bias.detach().double().numpy()
            assert np.array_equal(b.reshape(-1), np.round(real / acc).astype(np.int64))

    def test_activations_fit_their_bits(self, case):
        ig = case.ig
        for kind, x in case.inputs.items():
            _, env = execute.reference(ig, x.numpy(), keep=True)
            for node in ig.nodes:
                if node.grid is None:
                    continue
                g = node.grid
                bits = expand(case.act_bits[node.name], node.out_shape).to(torch.int64).numpy()
                assert np.array_equal(np.broadcast_to(g.bits, node.out_shape), bits)
                shift = 0 if g.post_shift is None else np.broadcast_to(g.post_shift, node.out_shape)
                q = env[node.name]
                assert np.all(q % (np.int64(1) << shift) == 0)
                lo, hi = qrange(bits, g.signed)
                codes = q >> shift
                assert np.all((codes >= lo) & (codes <= hi)), f"{kind} input: {node.name} exceeds its bits"
                assert np.all((codes >= g.lo) & (codes <= g.hi))

    def test_requantization_parameters(self, case):
        for node in case.ig.nodes:
            for key, rq in node.params.items():
                if not key.startswith("requant"):
                    continue
                m, s = np.asarray(rq.multiplier), np.asarray(rq.shift)
                if case.numerics == "scaled":
                    assert rq.kind == "tflm"
                    assert np.all(((m >= 2**30) & (m < 2**31)) | (m == 0))
                    assert np.all((s >= -31) & (s <= 30))
                else:
                    assert rq.kind == "pow2"

    # -- agreement with the training path -------------------------------------------------------
    @staticmethod
    def _fake_quant(qm, fn):
        freeze_observers(qm)  # the fake-quant forward must not move the observed ranges
        qm.train()
        try:
            with torch.no_grad():
                return fn(qm)
        finally:
            freeze_observers(qm, False)
            qm.eval()

    def test_eval_close_to_fake_quant(self, case):
        """End to end, the same model with ``MODEL_BITS`` everywhere (same granularity)."""
        qm = copy.deepcopy(case.qm)
        for q in [*qm.act_quantizers.values(), *(layer.quantizer for layer in qm.layers.values())]:
            q.set_bits(torch.full_like(q.bits(), float(MODEL_BITS)))
        qm.eval()
        ig = qm.lower()
        lsb = node_lsb(ig, qm.graph, ig.output, exact_inputs=False)
        for kind, x in case.inputs.items():
            y_int = qm(x).double()
            y_fq = self._fake_quant(qm, lambda m: m(x)).double()
            err = ((y_int - y_fq).abs() / lsb).max().item()
            tol = self.model_lsb_tol.get(case.name, MODEL_LSB_TOL)
            assert err <= tol + 1e-3, f"{kind} input: {err:.2f} LSB from the fake-quant path"

    def test_each_layer_close_to_fake_quant(self, case):
        """Feed each layer the reference integers of its inputs and compare one layer at a time."""
        ig, graph = case.ig, case.qm.graph
        scale = {n.name: ig[graph.grid_source(n.name)].grid.scale for n in graph}
        lsb = {n.name: node_lsb(ig, graph, n.name) for n in graph}
        for kind, x in case.inputs.items():
            _, env = execute.reference(ig, x.numpy(), keep=True)
            real = {k: torch.from_numpy(v).to(torch.float64) * scale[k] for k, v in env.items()}

            def layer_outputs(qm):
                out = {}
                for node in graph:
                    args = [x] if node.op == "input" else [real[i].to(torch.float32) for i in node.inputs]
                    out[node.name] = qm._fake_quant_step(node, args)
                return out

            fq = self._fake_quant(case.qm, layer_outputs)
            for node in graph:
                err = ((fq[node.name].double() - real[node.name]).abs() / lsb[node.name]).max().item()
                assert err <= LAYER_LSB_TOL + 1e-3, f"{kind} input: node {node.name!r} is {err:.2f} LSB off"
