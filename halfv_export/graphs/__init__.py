"""Backbone adapters, the eager HalfV reference and the pruning / TME building blocks."""

from .adapter import ADAPTERS, BackboneAdapter, get_adapter

__all__ = ["ADAPTERS", "BackboneAdapter", "get_adapter"]
