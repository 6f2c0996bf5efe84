"""The Django app of saga's integration: it brings the ``saga_relay`` and ``saga_migrate``
management commands (saga's own tables are migrated by saga, not by Django)."""

from __future__ import annotations

from django.apps import AppConfig


class SagaConfig(AppConfig):  # type: ignore[misc]
    """``INSTALLED_APPS = [..., "saga.contrib.django"]``."""

    name = "saga.contrib.django"
    label = "saga"
    verbose_name = "saga"
