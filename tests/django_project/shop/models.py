"""An order, as a shop keeps it."""

from __future__ import annotations

from django.db import models


class Order(models.Model):
    """One order; its checkout run marks it paid."""

    email = models.CharField(max_length=200)
    status = models.CharField(max_length=20, default="pending")

    class Meta:
        app_label = "shop"
