"""jaxlm's tests, as one package: `from tests.conftest import ...` then names the module pytest
imported (a second import of conftest would read the XLA flags it had already changed, and the
long fine-tuning runs would compile at -O0)."""
