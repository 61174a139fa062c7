"""Small shared helpers: atomic outputs and plots."""
