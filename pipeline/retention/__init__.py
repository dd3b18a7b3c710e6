"""Retention: the policy, its enforcement, erasure requests and the service."""
