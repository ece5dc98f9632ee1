"""A trial: one run's configuration and the folder it runs into, named by what decides its result.

``Trial.id`` hashes the configuration as the result depends on it: budgets by their values (``16KiB``
and ``16384`` are one budget), method options with their defaults filled in, and the float model
by what made it (``float_id``: the settings of the float stage, followed through ``float_from`` to
the run that trained it, or the checkpoint's bytes when it came from elsewhere), never by
machine-local paths (``data_dir``, where ``float_from`` lies). Two machines planning the same sweep
give its trials the same ids; a finished trial returns its stored result (``stored_result``)
without loading a model or data.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .config import RunConfig

log = logging.getLogger(__name__)

#: The fields a float model depends on: trials that agree on them can share one float stage
FLOAT_FIELDS = ("model", "data", "seed", "float_epochs", "lr", "weight_decay", "batch_size", "optimizer")
#: Fields that say where things lie on this machine, not what the result is
MACHINE_LOCAL = ("data_dir", "float_from")
ID_LENGTH = 16


def _digest(payload) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]


def float_id(cfg: RunConfig) -> str:
    """What the float model of ``cfg`` is: the float settings of the run that trained it, or, for a
    checkpoint that no run folder around it describes, a hash of its bytes."""
    if not cfg.float_from:
        return _digest({k: getattr(cfg, k) for k in FLOAT_FIELDS})
    source = Path(cfg.float_from)
    run_dir = float_run_dir(source)
    if (run_dir / "config.yaml").is_file():
        return float_id(RunConfig.load(run_dir / "config.yaml"))
    if source.is_file():
        return "file-" + hashlib.sha256(source.read_bytes()).hexdigest()[:ID_LENGTH]
    raise FileNotFoundError(f"--float-from {cfg.float_from}: no float model there (a run directory that finished "
                            f"its float phase, or its checkpoints/float.pt)")


def float_run_dir(float_from: Path) -> Path:
    """The run folder a ``float_from`` names: the folder itself, or RUN for RUN/checkpoints/float.pt."""
    return float_from.parent.parent if float_from.suffix == ".pt" else float_from


def config_id(cfg: RunConfig) -> str:
    """The trial id of ``cfg`` (see the module docstring)."""
    from ..cost import Budget
    from .learned import parse_options
    from .methods import get_method

    payload = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in MACHINE_LOCAL}
    if cfg.budget_fill is None:  # the method's default: ids of runs from before the option stay as they were
        del payload["budget_fill"]
    payload["budget"] = Budget.from_strings(**cfg.budget).limits()
    options = get_method(cfg.method).options
    if options is not None:
        payload["options"] = asdict(parse_options(options, cfg.options, cfg.method))
    payload["float"] = float_id(cfg)
    return _digest(payload)


@dataclass(frozen=True)
class Trial:
    """A run to make: ``config`` into folder ``out`` (``mixprec.search.run_search`` runs it)."""

    config: RunConfig
    out: Path

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))

    @property
    def id(self) -> str:
        return config_id(self.config)

    @property
    def float_id(self) -> str:
        return float_id(self.config)

    def trains_float(self) -> bool:
        """Whether this trial trains its float model (rather than taking another run's)."""
        return not self.config.float_from

    def has_float(self) -> bool:
        """Whether this trial's own float stage is done (``checkpoints/float.pt``)."""
        return (self.out / "checkpoints" / "float.pt").is_file()

    def stored_result(self) -> dict | None:
        """The result of this very trial when ``out`` holds it finished; None otherwise (not
        started, unfinished, or a run of another configuration)."""
        result_path, config_path = self.out / "result.json", self.out / "config.yaml"
        if not (result_path.is_file() and config_path.is_file()):
            return None
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            return None
        stored_id = result.get("trial")
        if stored_id is None:  # a run from before trials had ids: compare the configurations
            same = RunConfig.load(config_path) == self.config
        else:
            same = stored_id == self.id
        return result if same else None
