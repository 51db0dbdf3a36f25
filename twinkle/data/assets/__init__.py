"""Data files bundled with twinkle.data (read through ``twinkle.data.assets_path``)."""
