"""Matrix units."""
