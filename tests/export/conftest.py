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
