"""The shop's Celery app, with saga installed on the engine of Django's database."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shopsite.settings")

import django

django.setup()

from celery import Celery  # noqa: E402

import saga  # noqa: E402
from saga.celery_adapter import WORKER_SETTINGS  # noqa: E402
from saga.contrib import django as saga_django  # noqa: E402

app = Celery("shopsite", broker=os.environ.get("SHOP_BROKER_URL", "redis://127.0.0.1:6379/5"))
app.conf.update(WORKER_SETTINGS, broker_connection_retry_on_startup=True)
saga.install(app, saga_django.engine())
