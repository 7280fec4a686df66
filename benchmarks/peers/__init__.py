"""Peer systems (pfl-research, Flower) running the benchmark workloads, each in its own virtualenv."""
