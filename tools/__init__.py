"""hessd's applications: the `hessd` command line, the load generator and the spectrum
batch job. They use hessd.client and hessd.proto only; `hessd serve` imports the server
lazily."""
