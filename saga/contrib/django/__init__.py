"""saga in a Django project (``pip install saga[django]``; Django 4.2+ with psycopg 3).

Runs start in Django's own transaction, on Django's own connection, so the order a view saves
and the run that fulfils it commit together, or neither does::

    from django.db import transaction
    from saga.contrib import django as saga_django

    with transaction.atomic():
        order = Order.objects.create(email=email)
        started = saga_django.start("shop.checkout", {"order_id": order.id},
                                    key=f"order-{order.id}")

Configuration is the ``SAGA`` setting::

    INSTALLED_APPS = [..., "saga.contrib.django"]     # the management commands
    SAGA = {
        "REGISTRY": "shop.workflows:registry",       # module:attribute of your Registry
        "DATABASE": "default",                       # the alias whose database has saga's schema
        "SCHEMA": "saga",
        "CELERY_APP": "shopsite.celery:app",          # for manage.py saga_relay
        "SETTINGS": {"heartbeat_timeout": 15},       # saga.Settings fields (optional)
    }

``manage.py saga_migrate`` migrates saga's schema into that database, ``manage.py saga_relay``
runs the relay. In the Celery app module: ``saga.install(app, saga_django.engine())``.

Signals too are sent in Django's transaction (:func:`signal`): the webhook a view records and
the signal that wakes the waiting run commit together::

    with transaction.atomic():
        Delivery.objects.create(order=order, carrier_ref=ref)
        saga_django.signal(f"order-{order.id}", "parcel_delivered", {"ref": ref})

Anything saga does in the caller's transaction takes :func:`connection` as its target
(``engine().start(connection(), ...)`` is what :func:`start` does).
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import TextClause
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.engine import URL

from saga.app import Saga
from saga.context import JSON
from saga.definition import Workflow
from saga.keys import KeyPolicy
from saga.registry import Registry
from saga.settings import Settings
from saga.starting import Started

_DJANGO_ONLY_OPTIONS = frozenset(
    {"server_side_binding", "pool", "isolation_level", "assume_role", "cursor_factory"}
)
_DIALECT = pg_psycopg.dialect()  # type: ignore[no-untyped-call]
_JSON_OIDS = frozenset({114, 3802})  # json, jsonb


def config() -> dict[str, Any]:
    """The ``SAGA`` setting, with its defaults."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    raw = getattr(settings, "SAGA", None)
    if not isinstance(raw, Mapping) or not raw.get("REGISTRY"):
        raise ImproperlyConfigured(
            "settings.SAGA must be a dict naming at least 'REGISTRY': 'module:attribute'"
        )
    return {"DATABASE": "default", "SCHEMA": "saga", "SETTINGS": {}, **raw}


def _import(spec: str, what: str) -> Any:
    from django.core.exceptions import ImproperlyConfigured

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ImproperlyConfigured(f"SAGA[{what!r}] must look like 'module:attribute'")
    value: Any = importlib.import_module(module)
    for part in attr.split("."):
        value = getattr(value, part)
    return value


def database_url(using: str) -> URL:
    """An SQLAlchemy URL (psycopg 3) of the database of Django's connection ``using``."""
    from django.core.exceptions import ImproperlyConfigured
    from django.db import connections

    conf = connections[using].settings_dict
    if "postgresql" not in conf["ENGINE"]:
        raise ImproperlyConfigured(f"saga needs PostgreSQL; DATABASES[{using!r}] is not")
    options = conf.get("OPTIONS") or {}
    query = {
        k: str(v) for k, v in options.items()
        if k not in _DJANGO_ONLY_OPTIONS and isinstance(v, str | int)
    }
    return URL.create(
        "postgresql+psycopg",
        username=conf.get("USER") or None,
        password=conf.get("PASSWORD") or None,
        host=conf.get("HOST") or None,
        port=int(conf["PORT"]) if conf.get("PORT") else None,
        database=conf.get("NAME"),
        query=query,
    )


def engine(using: str | None = None) -> Saga:
    """This process's saga engine for the configured registry, on the database of Django's
    connection ``using`` (``SAGA['DATABASE']`` by default). Made once per alias."""
    return _engine(using or config()["DATABASE"])


@functools.cache
def _engine(alias: str) -> Saga:
    from django.core.exceptions import ImproperlyConfigured

    conf = config()
    registry = _import(conf["REGISTRY"], "REGISTRY")
    if not isinstance(registry, Registry):
        raise ImproperlyConfigured(f"SAGA['REGISTRY'] is a {type(registry).__name__}")
    settings = Settings.from_env(schema=conf["SCHEMA"], **dict(conf["SETTINGS"]))
    url = database_url(alias).render_as_string(hide_password=False)
    return Saga(registry, database_url=url, settings=settings)


@dataclass(frozen=True)
class _Rows:
    names: Sequence[str]
    rows: Sequence[Any]

    def mappings(self) -> _Rows:
        return _Rows(self.names, [dict(zip(self.names, r, strict=True)) for r in self.rows])

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def all(self) -> list[Any]:
        return list(self.rows)

    def scalar(self) -> Any:
        first = self.first()
        if first is None:
            return None
        return next(iter(first.values())) if isinstance(first, dict) else first[0]


@dataclass(frozen=True)
class DjangoConnection:
    """saga's statements on Django's connection ``using``, in its current transaction: inside
    ``transaction.atomic()`` they commit or roll back with it (outside one, Django's
    autocommit commits each at once). Pass it wherever saga takes the caller's connection."""

    using: str = "default"

    def execute(self, statement: TextClause, parameters: Mapping[str, Any] | None = None, /) -> Any:
        """Run ``statement`` through Django's cursor; its rows (``.mappings().first()``)."""
        from django.db import connections

        compiled = statement.compile(dialect=_DIALECT)
        params = compiled.construct_params(dict(parameters or {}))
        with connections[self.using].cursor() as cursor:
            cursor.execute(str(compiled), params)
            if cursor.description is None:
                return _Rows([], [])
            names = [c[0] for c in cursor.description]
            # Django loads json and jsonb as text (its JSONField decodes them itself); saga's
            # statements expect them decoded, as SQLAlchemy's psycopg connections give them.
            decode = [c[1] in _JSON_OIDS for c in cursor.description]
            rows = [
                tuple(json.loads(v) if d and isinstance(v, str) else v
                      for v, d in zip(row, decode, strict=True))
                for row in cursor.fetchall()
            ]
            return _Rows(names, rows)

    def on_commit(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` once Django's current transaction commits (at once in
        autocommit): how a run started here has its first steps published promptly."""
        from django.db import transaction

        transaction.on_commit(callback, using=self.using)


def connection(using: str | None = None) -> DjangoConnection:
    """Django's connection ``using`` (``SAGA['DATABASE']`` by default) as saga's target."""
    return DjangoConnection(using or config()["DATABASE"])


def start(
    workflow: Workflow | str,
    input: JSON,
    *,
    key: str | None = None,
    version: int | None = None,
    key_policy: KeyPolicy | str | None = None,
    using: str | None = None,
) -> Started:
    """Start a run in Django's current transaction on connection ``using``: inside
    ``transaction.atomic()`` it exists once the block commits, and not at all if it rolls
    back. The arguments are :meth:`saga.Saga.start`'s."""
    return engine(using).start(
        connection(using), workflow, input, key=key, version=version, key_policy=key_policy
    )


def signal(run_or_key: str, name: str, payload: JSON = None, *, using: str | None = None) -> str:
    """Send the signal ``name`` with ``payload`` to the run whose id or business key is
    ``run_or_key``, in Django's current transaction on connection ``using``: inside
    ``transaction.atomic()`` it is delivered once the block commits, and never if it rolls
    back. Returns and raises what :meth:`saga.Saga.signal` does (``"delivered"``,
    ``"stored"`` or ``"duplicate"``; :class:`~saga.errors.SignalRefusedError`)."""
    return engine(using).signal(connection(using), run_or_key, name, payload)
