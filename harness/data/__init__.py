"""Built-in datasets: importing this package registers them."""
from harness.data import synthetic  # noqa: F401
