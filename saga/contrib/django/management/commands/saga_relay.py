"""``manage.py saga_relay``: the outbox relay (and sweeper) of the project's saga engine."""

from __future__ import annotations

import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from saga.contrib.django import config


class Command(BaseCommand):  # type: ignore[misc]
    """Run the relay for ``SAGA['CELERY_APP']`` until SIGTERM (as ``saga relay --app``)."""

    help = "Run saga's outbox relay for SAGA['CELERY_APP'] until SIGTERM."

    def add_arguments(self, parser: Any) -> None:
        """``--batch-size`` and ``--poll-interval``, as ``saga relay`` has them."""
        parser.add_argument("--batch-size", type=int, default=200)
        parser.add_argument("--poll-interval", type=float, default=1.0)

    def handle(self, *args: Any, **options: Any) -> None:
        """Run the relay in this process."""
        from saga import relay

        app = config().get("CELERY_APP")
        if not app:
            raise CommandError("settings.SAGA['CELERY_APP'] must name the Celery app")
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        relay.main(
            str(app), batch_size=options["batch_size"], poll_interval=options["poll_interval"]
        )
