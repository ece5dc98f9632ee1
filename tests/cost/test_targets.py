import pytest
import yaml

from mixprec.cost.rounding import snap_up
from mixprec.cost.targets import list_targets, load_target

SHIPPED = ["cortex-m4", "cortex-m7", "fpga-hls4ml", "generic", "mpic"]


def test_every_shipped_target_loads():
    assert list_targets() == SHIPPED
    for name in SHIPPED:
        assert load_target(name).name == name


def test_mpic_table_is_the_papers():
    t = load_target("mpic")
    assert t.macs_per_cycle == {2: {2: 6.5, 4: 4.0, 8: 2.2}, 4: {2: 3.9, 4: 3.5, 8: 2.1}, 8: {2: 2.5, 4: 2.3, 8: 2.1}}
    assert (t.clock_hz, t.power_mw, t.weight_bits, t.act_bits) == (250e6, 5.4, (0, 2, 4, 8), (2, 4, 8))
    assert t.allows_pruning and t.min_weight_bits == 2


def test_capacities_and_ranges():
    m4, m7, fpga = load_target("cortex-m4"), load_target("cortex-m7"), load_target("fpga-hls4ml")
    assert (m4.flash_bytes, m4.ram_bytes) == (1024 * 1024, 192 * 1024)
    assert (m7.flash_bytes, m7.ram_bytes, m7.clock_hz) == (2 * 1024 * 1024, 512 * 1024, 480e6)
    assert fpga.flash_bytes is None and fpga.weight_bits == tuple(range(17)) and fpga.act_bits == tuple(range(1, 17))
    assert fpga.param_bytes.requant == 0 and m4.param_bytes.requant == 8


def test_throughput_takes_next_width_up():
    t = load_target("mpic")
    assert t.throughput(3, 3) == 3.5  # -> (4, 4)
    assert t.throughput(1, 8) == 2.2  # -> (2, 8)
    assert t.throughput(16, 16) == 2.1  # above the table: largest entry
    assert load_target("fpga-hls4ml").throughput(5, 7) == 64.0


def test_snap_up():
    assert [snap_up(b, (2, 4, 8)) for b in (0, 1, 2, 3, 4, 5, 8)] == [0, 2, 2, 4, 4, 8, 8]


def _write(tmp_path, **changes):
    with open(_shipped_path("cortex-m4")) as f:
        data = yaml.safe_load(f)
    data.update(changes)
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def _shipped_path(name):
    from importlib import resources
    return str(resources.files("mixprec.cost").joinpath("targets", f"{name}.yaml"))


def test_custom_file_loads(tmp_path):
    path, _ = _write(tmp_path, name="board", flash_bytes="256KiB")
    t = load_target(path)
    assert (t.name, t.flash_bytes) == ("board", 256 * 1024)


def test_unknown_key_names_key_and_file(tmp_path):
    path, _ = _write(tmp_path, flash_size=3)
    with pytest.raises(ValueError, match=r"board\.yaml.*'flash_size'"):
        load_target(path)


def test_missing_key_names_key_and_file(tmp_path):
    path, data = _write(tmp_path)
    del data["clock_hz"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"board\.yaml.*missing.*'clock_hz'"):
        load_target(path)


@pytest.mark.parametrize("key, value", [
    ("weight_bits", "abc"), ("weight_bits", [4, 2]), ("act_bits", [0, 8]), ("clock_hz", -1), ("clock_hz", True),
    ("numerics", "float"), ("act_granularities", ["per-pixel"]), ("param_bytes", {"bias": 4}),
    ("ram_bytes", "12 KB"), ("macs_per_cycle", {8: {8: 0}}), ("weight_containers", [2, 4]),
])
def test_bad_values_name_key_and_file(tmp_path, key, value):
    path, _ = _write(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=rf"board\.yaml.*{key}"):
        load_target(path)


def test_unknown_name_lists_shipped():
    with pytest.raises(ValueError, match="cortex-m4, cortex-m7, fpga-hls4ml, generic, mpic"):
        load_target("cortex-m99")


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_target(tmp_path / "nope.yaml")
