"""Settings of the test shop: PostgreSQL from ``SHOP_DATABASE_URL``, saga from ``SAGA``."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

_db = urlsplit(os.environ.get("SHOP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop"))

SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["saga.contrib.django", "shop"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.path.lstrip("/"),
        "USER": _db.username or "",
        "PASSWORD": _db.password or "",
        "HOST": _db.hostname or "",
        "PORT": str(_db.port or ""),
    }
}
SAGA = {
    "REGISTRY": "shop.workflows:registry",
    "CELERY_APP": "shopsite.celery:app",
    "SETTINGS": {"lease_grace": 3.0},
}
