"""Decoders: encoded bytes and records in, numpy arrays out (no Beam here)."""
