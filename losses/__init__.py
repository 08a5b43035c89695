"""Built-in losses: importing this package registers every family."""
from losses import softmax  # noqa: F401
from losses import difftopk  # noqa: F401
from losses import berrada, hinge  # noqa: F401
from losses import lapin, transition, noised  # noqa: F401
from losses import lapsum, lml, soft_rank, soft_topk, sparse_topk  # noqa: F401
