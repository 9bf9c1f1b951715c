"""Command-line entry points, kept out of the library modules they drive."""
