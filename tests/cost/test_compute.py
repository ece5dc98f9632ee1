import pytest
import torch

from mixprec.cost import compute
from mixprec.cost.targets import load_target

from .graphs import cnn, depthwise, dense

MPIC, M4 = load_target("mpic"), load_target("cortex-m4")


def test_macs():
    g = cnn()
    assert g["c1"].macs == 36 * 64  # 36 weights at 8*8 positions
    assert g["fc"].macs == 640


def test_bops_and_ebops_conv_per_tensor():
    node = cnn()["c1"]
    w, a = torch.tensor([4.0]), torch.tensor([8.0])
    assert compute.ebops(node, w, a).item() == 36 * 4 * 8  # each multiplier once
    assert compute.bops(node, w, a).item() == 2304 * 4 * 8  # every MAC


def test_ebops_dense_matches_double_loop():
    g = dense(16, 5)
    node = g["fc"]
    torch.manual_seed(0)
    w_bits = torch.randint(0, 9, (5, 16)).float()  # per element
    in_bits = torch.randint(1, 9, (16,)).float()  # per input element
    brute = sum(in_bits[i] * w_bits[j, i] for i in range(16) for j in range(5))
    assert compute.ebops(node, w_bits, in_bits).item() == brute.item()
    assert compute.bops(node, w_bits, in_bits).item() == brute.item()  # dense: 1 position


@pytest.mark.parametrize("groups, cout", [(4, 4), (2, 4), (1, 4), (4, 8)])
def test_ebops_grouped_conv_matches_brute_force(groups, cout):
    node = depthwise(groups, cout)["dw"]  # input (4, 6, 6)
    torch.manual_seed(groups)
    w_bits = torch.randint(0, 9, node.weight_shape).float()
    in_bits = torch.tensor([2.0, 4.0, 6.0, 8.0]).reshape(4, 1, 1)  # per input channel
    cin_g, per_group = 4 // groups, cout // groups
    brute = 0.0
    for o in range(cout):
        for j in range(cin_g):
            cin = (o // per_group) * cin_g + j  # the input channel weight slot j of output o reads
            brute += float(w_bits[o, j].sum() * in_bits[cin, 0, 0])
    assert compute.ebops(node, w_bits, in_bits).item() == pytest.approx(brute)
    assert compute.bops(node, w_bits, in_bits).item() == pytest.approx(brute * 36)


def test_depthwise_per_channel_hand_figure():
    node = depthwise()["dw"]
    w = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(4, 1, 1, 1)
    a = torch.tensor([2.0, 4.0, 6.0, 8.0]).reshape(4, 1, 1)
    assert compute.ebops(node, w, a).item() == 9 * (2 + 8 + 18 + 32)


def test_per_element_input_bits_take_channel_max_for_conv():
    node = depthwise()["dw"]
    a = torch.full((4, 6, 6), 2.0)
    a[1, 3, 3] = 7.0  # one wide element makes channel 1's multipliers 7 bits wide
    expected = 9 * 8 * (2 + 7 + 2 + 2)
    assert compute.ebops(node, torch.tensor([8.0]), a).item() == expected


def test_effective_bits():
    k = torch.tensor([0, 1, -1, 2, 3, -4, 7, 8, 127, -128, 6, -12, 40, 32767])
    assert compute.effective_bits(k).tolist() == [0, 1, 1, 1, 2, 1, 3, 1, 7, 1, 2, 2, 3, 15]
    # the same value on a 2^3 finer grid costs the same: trailing zeros are shifts
    assert torch.equal(compute.effective_bits(k * 8), compute.effective_bits(k))


def test_mpic_cycles_per_channel_with_pruning():
    node = cnn()["c1"]  # 576 MACs per output channel
    w = torch.tensor([2.0, 4.0, 8.0, 0.0]).reshape(4, 1, 1, 1)
    cycles = compute.mac_cycles(node, w, torch.tensor([8.0]), MPIC)
    assert cycles.item() == pytest.approx(576 / 2.5 + 576 / 2.3 + 576 / 2.1 + 0)


def test_cycles_between_table_widths_use_next_up():
    node = cnn()["fc"]  # 640 MACs
    assert compute.mac_cycles(node, torch.tensor([[3.0]]), torch.tensor([5.0]), MPIC).item() == pytest.approx(640 / 2.3)


def test_cycles_gradient_exists_and_forward_exact():
    node = cnn()["fc"]
    w = torch.tensor([[4.0]], requires_grad=True)
    a = torch.tensor([4.0], requires_grad=True)
    cycles = compute.mac_cycles(node, w, a, MPIC)
    assert cycles.item() == pytest.approx(640 / 3.5)
    cycles.backward()
    # at a table width the slope is that of the segment below: act row 4, weights 2 -> 4: 1/3.9 -> 1/3.5
    assert w.grad.item() == pytest.approx(640 * (1 / 3.5 - 1 / 3.9) / 2)
    assert a.grad.item() != 0


def test_elementwise_and_energy():
    g = cnn()
    assert compute.elementwise_ops(g["pool"]) == 64 * 4  # 64 outputs, 2x2 window
    assert compute.elementwise_ops(g["flat"]) == 0
    assert compute.energy_uj(1e6, MPIC) == pytest.approx(1e6 / 250e6 * 5.4e-3 * 1e6)  # s * W -> J -> uJ
    assert compute.energy_uj(80e6, M4) == pytest.approx(26.4e3)  # 1 s at 26.4 mW = 26.4 mJ
