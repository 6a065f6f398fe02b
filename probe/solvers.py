"""How a linear probe is fit (`--solver`), named without importing torch: the command lines check the name first.

- `lbfgs`: a (multinomial) logistic regression on standardized features, solved to convergence with L-BFGS, its L2
  strength chosen on validation over `C_GRID` (`probe.logreg`), as DINOv2's and CLIP_benchmark's linear evaluations do.
- `adamw`: the study's recipe (`training.recipe.STUDY`: AdamW, 100 epochs, raw features unless --standardize;
  `probe.train.fit`).
- `auto` (the default): lbfgs for the linear head on the cache's eval view under medfm's protocol; adamw for the DeiT
  head, under `--protocol study` (the study's recipe stays exact) and on augmented train views (one view per epoch is an
  epoch-by-epoch recipe).
"""

from __future__ import annotations

from common.errors import MedfmError
from common.registry import unknown

SOLVERS = ("auto", "lbfgs", "adamw")
# The inverse L2 strengths tried (scikit-learn's C: C x the summed loss + ||W||^2 / 2), one decade apart. On standardized
# features 1e-4 shrinks the head almost to the class prior and 1e4 leaves it almost unregularised; DINOv2 tries 45 values
# over 1e-6..1e5, which costs five times the fits for differences below a decade's.
C_GRID = tuple(10.0**k for k in range(-4, 5))


def check_solver(name: str) -> None:
    """An unknown `--solver` is one line, said before torch loads."""
    if name not in SOLVERS:
        raise unknown("solver", name, SOLVERS)


def default_solver(head: str, protocol: str, views: int) -> str:
    """What `auto` means for a head: lbfgs for the linear head on the eval view under medfm's protocol, else adamw."""
    return "lbfgs" if head == "linear" and protocol == "medfm" and views == 0 else "adamw"


def check_lbfgs(head: str, protocol: str, views: int, c_grid: tuple[float, ...]) -> None:
    """What `--solver lbfgs` can fit: a linear head, on the eval view, outside the study's protocol, over positive Cs."""
    if head != "linear":
        raise MedfmError(f"--solver lbfgs fits a linear head; the {head} head trains with --solver adamw (or auto)")
    if protocol != "medfm":
        raise MedfmError("--solver lbfgs is not the study's recipe; --protocol study trains the linear head with AdamW "
                         "(--solver auto or adamw)")
    if views:
        raise MedfmError(f"--solver lbfgs fits the cache's eval view; train on {views} augmented views with --solver adamw, "
                         "or pass --views 0")
    if not c_grid or not all(0 < c < float("inf") for c in c_grid):
        raise MedfmError(f"the C grid must be positive numbers, got {list(c_grid)}")
