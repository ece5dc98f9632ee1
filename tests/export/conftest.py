"""Trained digits runs shared by the export tests: each configuration trains once per session and
every test module gets its own copy of the run directory (so exports never collide)."""
import shutil

import pytest

RUNS = {
    "cortex-m4": dict(target="cortex-m4", budget={"flash": "12KiB"}),
    "fpga-hls4ml": dict(target="fpga-hls4ml", bits=6),
}


@pytest.fixture(scope="session")
def _trained(tmp_path_factory, digits_float):
    from mixprec.search import RunConfig, run_search

    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"trained-{name}") / "run"
            run_search(RunConfig(model="digits-cnn", data="digits", qat_epochs=1,
                                 float_from=str(digits_float), **RUNS[name]), out)
            cache[name] = out
        return cache[name]
    return get


@pytest.fixture(scope="module")
def trained_run(_trained, tmp_path_factory):
    """``trained_run(name)``: a fresh copy of the trained run ``name`` (see RUNS)."""
    def copy(name):
        dst = tmp_path_factory.mktemp(f"copy-{name}") / "run"
        shutil.copytree(_trained(name), dst)
        return dst
    return copy


@pytest.fixture(scope="session")
def _exported(_trained, tmp_path_factory):
    """Each (trained run, format) exported once per session (an hls4ml export compiles its
    project: about 20 s), into its own copy of the run."""
    from mixprec.export import export_run
    from mixprec.search import load_run

    cache = {}

    def get(name, fmt):
        if (name, fmt) not in cache:
            out = tmp_path_factory.mktemp(f"exported-{name}-{fmt}") / "run"
            shutil.copytree(_trained(name), out)
            artifact = export_run(out, fmt)
            _, qm, result = load_run(out)
            cache[name, fmt] = out, artifact, qm, result
        return cache[name, fmt]
    return get


@pytest.fixture(scope="module")
def exported_run(_exported):
    """``exported_run(name, fmt)``: trained run ``name`` exported to ``fmt``, as ``(run_dir,
    artifact, quantized model, result)``; shared by the tests of the session: read it, do not
    change it."""
    return _exported


def export_exactly(fmt: str, model, shape: tuple, numerics: str, act_granularity: str, tmp_path, n_inputs: int,
                   n_sample: int = 8):
    """``model`` converted (6-bit per-channel weights, 7-bit activations), calibrated, exported to ``fmt``
    and run on random inputs: returns the artifact after checking its output and every tensor it exposes
    against the NumPy reference (``array_equal``)."""
    import numpy as np
    import torch

    from mixprec.convert import convert
    from mixprec.execute import reference
    from mixprec.export import ExportInput, get_exporter

    qm = convert(model, shape, numerics, 6, 7, "per-channel", act_granularity)
    qm.calibrate([torch.randn(64, *shape)])
    qm.eval()
    ig = qm.lower()
    xs = (torch.randn(n_inputs, *shape) * 1.5).numpy()
    exporter = get_exporter(fmt)
    artifact = exporter.export(ExportInput(tmp_path, ig, qm, None, shape, xs[:n_sample]), tmp_path / fmt)
    out, ints = exporter.run(artifact, xs, keep=True)
    ref, env = reference(ig, xs, keep=True)
    assert np.array_equal(out, ref)
    assert ints and all(np.array_equal(np.reshape(v, env[n].shape), env[n]) for n, v in ints.items())
    return artifact
