"""Built-in losses: importing this package registers every family."""
from losses import softmax  # noqa: F401
