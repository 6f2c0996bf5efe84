"""The shop's Django project package."""
