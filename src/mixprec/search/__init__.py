"""Search methods behind one interface (``mixprec.search.methods``: the registry), a run end to end
(``run_search``) and its configuration (``RunConfig``)."""
from .config import RunConfig
from .context import SearchContext
from .methods import Method, get_method, method_names, methods, register
from .run import STAGES, run_search
from .saved import load_run
from .trial import Trial, config_id, float_id

__all__ = ["Method", "RunConfig", "STAGES", "SearchContext", "Trial", "config_id", "float_id", "get_method", "load_run",
           "method_names", "methods", "register", "run_search"]
