"""Drop-in integrations with the platforms that start Dask clusters (dask-gateway)."""
