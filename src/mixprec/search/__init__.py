"""Search methods behind one interface: ``method(SearchContext) -> (QuantModel, history)``."""
from .config import METHODS, RunConfig
from .context import SearchContext
from .run import load_run, run_search
from .dq import DQOptions, search_dq
from .hgq import HGQOptions, search_hgq
from .methods import METHOD_OPTIONS, SEARCH_METHODS
from .uniform import search_uniform

__all__ = ["METHODS", "METHOD_OPTIONS", "RunConfig", "SearchContext", "SEARCH_METHODS", "DQOptions", "HGQOptions",
           "load_run", "run_search", "search_dq", "search_hgq", "search_uniform"]
