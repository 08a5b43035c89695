"""Built-in datasets: importing this package registers them."""
from harness.data import synthetic  # noqa: F401
from harness.data import cifar100, features, homoglyphs, random_images  # noqa: F401
