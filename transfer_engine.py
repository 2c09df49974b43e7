"""In a checkout, `import transfer_engine` finds this file first (launch.py's folder is on sys.path when it
runs, and the tests put it there): it makes the checkout's folder the `transfer_engine` package, whatever
the folder is called, and before any installed copy. An installed package has its own __init__.py only."""

import os

__path__ = [os.path.dirname(os.path.abspath(__file__))]  # A module with __path__ is a package.
with open(os.path.join(__path__[0], "__init__.py")) as _init:
    exec(compile(_init.read(), _init.name, "exec"))
