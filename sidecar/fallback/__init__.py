"""Fallbacks for checks the replica cannot answer locally."""

from .base import Fallback, NoFallback

__all__ = ["Fallback", "NoFallback"]
