"""`pconv.zoo:NAME` is how files and commands name pconv's own architectures; they live in pconv.models.zoo."""

from .models.zoo import *  # noqa: F401,F403
from .models.zoo import __all__  # noqa: F401
