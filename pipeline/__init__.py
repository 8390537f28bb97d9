"""Abliterator Space pipeline: measure, edit, tune, evaluate, card and push models."""
