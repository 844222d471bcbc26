"""Reproducible studies (cost model for Atlas layouts, benchmarks). The library `telechat2_ms` never imports this."""
