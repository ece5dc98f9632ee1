"""The search methods by name (``method(SearchContext) -> (QuantModel, history)``) and the options
class of each method that takes options (``-o KEY=VALUE``)."""
from .dq import DQOptions, search_dq
from .hgq import HGQOptions, search_hgq
from .uniform import search_uniform

SEARCH_METHODS = {"uniform": search_uniform, "hgq": search_hgq, "dq": search_dq}
METHOD_OPTIONS = {"hgq": HGQOptions, "dq": DQOptions}
