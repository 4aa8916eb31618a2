"""Recommendations: the in-process recommender, bulk lists, the exported artefact, its loader and the HTTP server."""
