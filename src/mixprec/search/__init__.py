"""Search methods behind one interface: ``method(SearchContext) -> (QuantModel, history)``."""
from .config import METHODS, RunConfig
from .context import SearchContext
from .run import load_run, run_search
from .dq import DQOptions, search_dq
from .hgq import HGQOptions, search_hgq
from .uniform import search_uniform

SEARCH_METHODS = {"uniform": search_uniform, "hgq": search_hgq, "dq": search_dq}
METHOD_OPTIONS = {"hgq": HGQOptions, "dq": DQOptions}

__all__ = ["METHODS", "RunConfig", "SearchContext", "SEARCH_METHODS", "load_run", "run_search"]
