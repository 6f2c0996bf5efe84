"""The shop's orders and their checkout workflow."""
