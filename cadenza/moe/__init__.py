"""Mixture-of-experts machinery shared by every family: routing functions and the expert seam."""
