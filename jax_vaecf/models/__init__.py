"""The model registry and the models, each one file and one registry entry."""
