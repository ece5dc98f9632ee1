"""Search methods behind one interface (``mixprec.search.methods``: the registry), a run end to end
(``run_search``) and its configuration (``RunConfig``)."""
from .config import RunConfig
from .context import SearchContext
from .methods import Method, get_method, method_names, methods, register
from .run import load_run, run_search

__all__ = ["Method", "RunConfig", "SearchContext", "get_method", "load_run", "method_names", "methods", "register",
           "run_search"]
