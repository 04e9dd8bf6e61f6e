"""glmlab's version, recorded in every run directory it writes (``config.json["glmlab_version"]``)."""

__version__ = "0.1.0"
