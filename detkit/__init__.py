"""detkit: a plugin-based two-stage object-detection toolkit on PyTorch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("detkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
