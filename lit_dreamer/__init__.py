"""lit_dreamer: DreamerV3 as a PyTorch Lightning framework."""

import importlib.util as _importlib_util
import os as _os
import sys as _sys

__version__ = "0.1.0"


class _CheckoutCallbacksFinder:
    """Finds `lit_dreamer.callbacks` in the callbacks/ folder at the top of a source checkout.

    An installed package (regular or editable) has it through setuptools' package-dir mapping; a
    checkout used straight from its folder (PYTHONPATH, or pytest from the repository root) has no
    such mapping, so this finder, first on sys.meta_path, points the name at the folder beside the
    lit_dreamer that was imported.
    """

    name = __name__ + ".callbacks"

    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return _importlib_util.spec_from_file_location(
            fullname, _os.path.join(self.folder, "__init__.py"), submodule_search_locations=[self.folder])


def _install_checkout_finder() -> None:
    package = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(package)
    folder = _os.path.join(root, "callbacks")
    # Only in a checkout: an installed package has lit_dreamer/callbacks itself, and a `callbacks`
    # folder beside it in site-packages would be some other project's.
    in_checkout = _os.path.isfile(_os.path.join(root, "pyproject.toml")) and _os.path.isfile(
        _os.path.join(folder, "__init__.py"))
    if in_checkout and not _os.path.isdir(_os.path.join(package, "callbacks")):
        if not any(isinstance(f, _CheckoutCallbacksFinder) for f in _sys.meta_path):
            _sys.meta_path.insert(0, _CheckoutCallbacksFinder(folder))


_install_checkout_finder()


def __getattr__(name: str):
    # `lit_dreamer.Agent` without importing torch (or anything else) on `import lit_dreamer`.
    if name == "Agent":
        from lit_dreamer.agent import Agent
        return Agent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
