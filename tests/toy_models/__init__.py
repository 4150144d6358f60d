"""A user's own model classes, importable as `toy_models.nets:TinyNet` in recipes of the tests."""
