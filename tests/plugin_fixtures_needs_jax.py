"""A plugin module whose framework is not installed."""

import jax_not_installed_here  # noqa: F401


class Backend:
    pass
