"""Reusable NNX building blocks."""
