"""Persistence, split by table. Every function takes the connection it must run on (the caller's
transaction); none commits."""
