import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec.cost import memory
from mixprec.cost.bits import BitAssignment, uniform
from mixprec.cost.targets import load_target

from .graphs import cnn, conv, residual

M4, MPIC, GENERIC, FPGA = (load_target(n) for n in ("cortex-m4", "mpic", "generic", "fpga-hls4ml"))
CONV = conv("c", "input", (1, 8, 8), 4)  # weights (4, 1, 3, 3): 36 elements, 9 per channel


def flash(bits, target=M4, node=CONV):
    return memory.weight_flash_bytes(node, torch.tensor(bits, dtype=torch.float32), target)


# ----------------------------------------------------------------------------- weights


def test_per_tensor_4_bits():
    assert flash([4.0]).item() == 20  # 4 channels * ceil(9 * 4 / 8) = 4 * 5


def test_3_bits_take_a_4_bit_container_on_mcu_but_exact_bits_on_generic():
    assert flash([3.0]).item() == 20  # 3 -> 4-bit container: as above
    assert flash([3.0], GENERIC).item() == 16  # 4 * ceil(27 / 8) = 4 * 4


def test_per_channel_mixed_with_a_pruned_channel():
    bits = [[[[2.0]]], [[[4.0]]], [[[8.0]]], [[[0.0]]]]  # (4, 1, 1, 1)
    # ceil(18/8) + ceil(36/8) + ceil(72/8) + 0 = 3 + 5 + 9 + 0
    assert memory.channel_weight_bytes(CONV, torch.tensor(bits), MPIC).tolist() == [3, 5, 9, 0]
    assert flash(bits, MPIC).item() == 17


def test_per_slice():
    node = conv("c", "input", (4, 8, 8), 8)  # (8, 4, 3, 3): 36 per channel
    bits = [[[[2.0]]], [[[8.0]]]]  # channels 0-3 at 2 bits, 4-7 at 8 bits
    assert flash(bits, node=node).item() == 4 * 9 + 4 * 36  # ceil(72/8), ceil(288/8)


def test_per_element_fpga_exact_bits():
    bits = torch.arange(36, dtype=torch.float32).remainder(5).reshape(4, 1, 3, 3)  # 0..4 bits
    expected = sum(-(-int(row.sum()) // 8) for row in bits.reshape(4, 9))
    assert flash(bits.tolist(), FPGA).item() == expected


def test_flash_gradient_is_nonzero_and_forward_exact():
    bits = torch.tensor([[[[3.0]]], [[[4.0]]], [[[5.0]]], [[[8.0]]]], requires_grad=True)
    total = memory.weight_flash_bytes(CONV, bits, M4)
    assert total.item() == 5 + 5 + 9 + 9  # 3 -> 4, 5 -> 8 bits
    total.backward()
    assert torch.allclose(bits.grad.flatten(), torch.full((4,), 9 / 8))  # 9 elements * 1/8 byte per bit


def test_param_bytes():
    g = cnn()
    a = uniform(g, 4, 8)
    assert memory.param_flash_bytes(g, a, "c1", M4) == 4 * 4 + 1 * (4 + 4)  # bias per channel + 1 mult/shift
    assert memory.param_flash_bytes(g, a, "fc", M4) == 10 * 4 + 8
    assert memory.param_flash_bytes(g, a, "pool", M4) == 0
    assert memory.param_flash_bytes(g, a, "c1", FPGA) == 4 * 4  # fixed numerics: no multiplier/shift
    a.weight["c1"] = torch.full((4, 1, 1, 1), 4.0)
    assert memory.param_flash_bytes(g, a, "c1", M4) == 4 * 4 + 4 * 8  # one scale per channel


def test_add_requantizes_both_inputs_and_output():
    g = residual()
    assert memory.requant_steps(g, uniform(g, 8, 8), "add") == 3
    assert memory.param_flash_bytes(g, uniform(g, 8, 8), "add", M4) == 3 * 8


# ----------------------------------------------------------------------------- activations


def test_act_bytes():
    assert memory.act_bytes((4, 8, 8), torch.tensor([8.0]), M4).item() == 256
    assert memory.act_bytes((10,), torch.tensor([2.0]), M4).item() == 3  # ceil(20 / 8)
    per_channel = torch.tensor([2.0, 4.0, 8.0, 3.0]).reshape(4, 1, 1)  # 3 -> 4 bits
    assert memory.act_bytes((4, 8, 8), per_channel, M4).item() == 64 * (2 + 4 + 8 + 4) / 8


def test_lifetimes_cnn():
    # steps: input 0, c1 1, pool 2, flat 3 (view of pool), fc 4
    assert memory.lifetimes(cnn()) == {"input": (0, 1), "c1": (1, 2), "pool": (2, 4), "fc": (4, 4)}


def test_residual_tensor_stays_alive_across_the_branch():
    # a is read by b (step 2) and by add (step 4)
    assert memory.lifetimes(residual()) == {"input": (0, 1), "a": (1, 4), "b": (2, 3), "c": (3, 4), "add": (4, 4)}


def _plan(graph, act=8, target=M4):
    a = uniform(graph, 8, act)
    sizes = memory.buffer_bytes(graph, a, target)
    spans = memory.lifetimes(graph)
    plan = memory.plan_arena({b: int(s) for b, s in sizes.items()}, spans, target.alignment)
    return plan, sizes, spans


def test_cnn_arena():
    # bytes at 8 bits: input 64, c1 256, pool 64, fc 10 -> 12 aligned to 4
    plan, sizes, spans = _plan(cnn())
    # c1 (largest) at 0; input and pool overlap c1 in time -> 256; fc overlaps only pool -> 0
    assert plan.offsets == {"input": 256, "c1": 0, "pool": 256, "fc": 0}
    assert plan.arena == 320  # = step 1: input + c1 = step 2: c1 + pool
    assert memory.live_bytes_peak(sizes, spans).item() == 320


def test_residual_arena_liveness():
    # bytes at 8 bits: input 128, a 256, b 512, c 256, add 256
    plan, sizes, spans = _plan(residual())
    # live bytes: step 1: 128+256, 2: a+b = 768, 3: a+b+c = 1024, 4: a+c+add = 768
    assert memory.live_bytes_peak(sizes, spans).item() == 1024
    # greedy: b@0; a overlaps b -> 512; c overlaps b, a -> 768; add overlaps a, c (not b) -> 0; input -> 0
    assert plan.offsets == {"input": 0, "a": 512, "b": 0, "c": 768, "add": 0}
    assert plan.arena == 1024
    # the MCU-paper figure (max of in + out per layer) misses the residual: 768 < 1024
    io = memory.in_out_bytes(residual(), sizes)
    assert {k: int(v) for k, v in io.items()} == {"a": 384, "b": 768, "c": 768, "add": 768}


def test_alignment_rounds_sizes_and_offsets():
    plan = memory.plan_arena({"x": 10, "y": 3}, {"x": (0, 1), "y": (1, 2)}, alignment=4)
    assert plan.sizes == {"x": 12, "y": 4} and plan.offsets == {"x": 0, "y": 12} and plan.arena == 16


def test_arena_torch_is_exact_and_differentiable():
    g = residual()
    a = uniform(g, 8, 8)
    for v in a.act.values():
        v.requires_grad_(True)
    sizes = memory.buffer_bytes(g, a, M4)
    plan = memory.plan_arena({b: int(s) for b, s in sizes.items()}, memory.lifetimes(g), M4.alignment)
    arena = memory.arena_torch(plan, sizes)
    assert arena.item() == plan.arena == 1024
    arena.backward()
    # the stack c on a on b sets the arena: d/d bits = elements / 8
    assert a.act["b"].grad.item() == 512 / 8 and a.act["a"].grad.item() == 256 / 8
    assert a.act["add"].grad is None or a.act["add"].grad.item() == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 8), st.integers(0, 4)), min_size=1, max_size=10),
       st.sampled_from([1, 4, 16]))
def test_greedy_plan_is_valid_and_above_the_lower_bound(buffers, alignment):
    sizes = {f"t{i}": s for i, (s, _, _) in enumerate(buffers)}
    spans = {f"t{i}": (first, first + length) for i, (_, first, length) in enumerate(buffers)}
    plan = memory.plan_arena(sizes, spans, alignment)
    for x in sizes:
        assert plan.offsets[x] % alignment == 0 and plan.offsets[x] + plan.sizes[x] <= plan.arena
        for y in sizes:
            if x < y and memory._overlap(spans[x], spans[y]) and plan.sizes[x] and plan.sizes[y]:
                assert (plan.offsets[x] + plan.sizes[x] <= plan.offsets[y]
                        or plan.offsets[y] + plan.sizes[y] <= plan.offsets[x])
    lower = memory.live_bytes_peak({b: torch.tensor(float(s)) for b, s in plan.sizes.items()}, spans)
    assert lower.item() <= plan.arena
    assert memory.arena_torch(plan, {b: torch.tensor(float(s)) for b, s in sizes.items()}).item() == plan.arena


def test_empty_assignment_key_is_reported():
    g = cnn()
    a = BitAssignment(weight={}, act=uniform(g, 8, 8).act)
    try:
        memory.param_flash_bytes(g, a, "c1", M4)
    except KeyError as err:
        assert "c1" in str(err)
    else:
        raise AssertionError("missing weight bits not reported")
