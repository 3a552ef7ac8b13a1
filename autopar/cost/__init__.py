"""Prices: hardware table, roofline compute time, collective and redistribution time."""
