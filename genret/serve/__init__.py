"""The HTTP service (``genret serve``): a saved pipeline behind an API and a results page (the serve extra)."""

from genret.serve.settings import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(pipe, config: ServeConfig | None = None):
    """The FastAPI app serving ``pipe`` (see :mod:`genret.serve.app`; needs ``pip install 'genret[serve]'``)."""
    from genret.serve.app import create_app as _create

    return _create(pipe, config)
