"""`distrain.ray.fit(...)` and `python -m distrain.ray`: see distrain.integrations.ray."""
from .integrations.ray import check_world_sizes, fit, main, train_loop

__all__ = ["check_world_sizes", "fit", "main", "train_loop"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
