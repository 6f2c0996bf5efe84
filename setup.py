"""Package discovery for setuptools (everything else is in pyproject.toml).

Every package under ``saga/`` is found, so a new one cannot be left out of a wheel; the
Alembic migrations live in ``migrations/`` at the top of the repository and ship as
``saga.migrations`` (``package-dir`` in pyproject.toml maps the name to the directory).
"""

from setuptools import find_packages, setup

saga = find_packages(include=["saga", "saga.*"])
migrations = ["saga." + name for name in find_packages(include=["migrations", "migrations.*"])]

setup(packages=saga + migrations)
