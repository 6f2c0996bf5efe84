"""``manage.py saga_migrate``: saga's tables in the database of ``SAGA['DATABASE']``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from saga.contrib.django import engine
from saga.db import migrate


class Command(BaseCommand):  # type: ignore[misc]
    """Migrate saga's schema (its own Alembic migrations, not Django's) up to its head."""

    help = "Migrate saga's schema in the database of SAGA['DATABASE'] to the newest revision."

    def add_arguments(self, parser: Any) -> None:
        """``--database`` picks another alias than ``SAGA['DATABASE']``."""
        parser.add_argument("--database", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        """Migrate, then say where the schema is."""
        saga = engine(options["database"])
        migrate.upgrade(saga.engine, schema=saga.settings.schema)
        now = migrate.current(saga.engine, schema=saga.settings.schema)
        self.stdout.write(f"saga schema {saga.settings.schema}: at revision {now}")
