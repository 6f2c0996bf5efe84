"""A minimal Django project that uses saga: a shop whose orders start a checkout run."""
