"""medens: multi-modal medical imaging ensembles on Lightning, Hydra and MONAI."""

from medens.utils.resolvers import register_resolvers

__version__ = "0.1.0"

register_resolvers()
