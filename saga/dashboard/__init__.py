"""The web dashboard (``saga dashboard``): server-rendered pages and a JSON API over the same
reads as the ``saga`` CLI, and operator actions behind a token."""
